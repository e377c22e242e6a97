//! Image references as the Docker CLI reads them (`distribution/reference` normalisation):
//! `[domain/]path[:tag][@digest]`, with Docker Hub as the default domain and `library/` as
//! the default namespace of single-component Hub names.

/// Docker Hub's canonical domain.
const DOCKER_HUB: &str = "docker.io";
/// The key the Docker CLI files Docker Hub credentials under.
pub(super) const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ImageRef {
    /// Registry host (`docker.io`, `ghcr.io`, `localhost:5999`).
    pub domain: String,
    /// Repository path inside the registry (`library/ubuntu`, `warpdotdev/warp-agent`).
    pub path: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(image: &str) -> Self {
        let (name, digest) = match image.split_once('@') {
            Some((name, digest)) => (name, Some(digest.to_owned())),
            None => (image, None),
        };
        let (domain, remainder) = match name.split_once('/') {
            Some((first, rest)) if is_domain(first) => (first, rest),
            _ => (DOCKER_HUB, name),
        };
        // A ':' after the last '/' starts the tag; one before it belongs to a host:port.
        let (path, tag) = match remainder.rfind(':') {
            Some(colon) if !remainder[colon..].contains('/') => {
                (&remainder[..colon], Some(remainder[colon + 1..].to_owned()))
            }
            _ => (remainder, None),
        };
        let domain = if domain == "index.docker.io" {
            DOCKER_HUB
        } else {
            domain
        };
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        Self {
            domain: domain.to_owned(),
            path,
            tag,
            digest,
        }
    }

    /// `domain/path`, the `fromImage` of a pull.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// What a pull asks for: the digest, else the tag, else `latest` (an empty tag would
    /// make the daemon pull every tag of the repository).
    pub fn pull_tag(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The repository as the Docker CLI shows it: `ubuntu`, `warpdotdev/warp-agent`,
    /// `localhost:5999/oz-demo-sidecar`.
    pub fn familiar_repository(&self) -> String {
        if self.domain == DOCKER_HUB {
            self.path
                .strip_prefix("library/")
                .filter(|rest| !rest.contains('/'))
                .unwrap_or(&self.path)
                .to_owned()
        } else {
            self.repository()
        }
    }

    /// The key of this registry in the Docker CLI's credential store.
    pub fn auth_key(&self) -> &str {
        if self.domain == DOCKER_HUB {
            DOCKER_HUB_AUTH_KEY
        } else {
            &self.domain
        }
    }
}

/// Whether the first path component names a registry rather than a Hub namespace: it has
/// a '.' or a ':', is `localhost`, or has upper-case letters (never valid in a path).
fn is_domain(component: &str) -> bool {
    component.contains(['.', ':'])
        || component == "localhost"
        || component.chars().any(|c| c.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(image: &str) -> (String, String, Option<String>, Option<String>) {
        let r = ImageRef::parse(image);
        (r.domain, r.path, r.tag, r.digest)
    }

    #[test]
    fn normalises_like_the_docker_cli() {
        assert_eq!(
            parts("ubuntu"),
            ("docker.io".into(), "library/ubuntu".into(), None, None)
        );
        assert_eq!(
            parts("ubuntu:22.04"),
            (
                "docker.io".into(),
                "library/ubuntu".into(),
                Some("22.04".into()),
                None
            )
        );
        assert_eq!(
            parts("warpdotdev/warp-agent:latest"),
            (
                "docker.io".into(),
                "warpdotdev/warp-agent".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(
            parts("index.docker.io/library/busybox"),
            ("docker.io".into(), "library/busybox".into(), None, None)
        );
        assert_eq!(
            parts("localhost:5999/busybox:1"),
            (
                "localhost:5999".into(),
                "busybox".into(),
                Some("1".into()),
                None
            )
        );
        assert_eq!(
            parts("localhost/a/b"),
            ("localhost".into(), "a/b".into(), None, None)
        );
        assert_eq!(
            parts("ghcr.io/org/img@sha256:abc"),
            (
                "ghcr.io".into(),
                "org/img".into(),
                None,
                Some("sha256:abc".into())
            )
        );
        assert_eq!(
            parts("registry:5000/img:v1@sha256:abc"),
            (
                "registry:5000".into(),
                "img".into(),
                Some("v1".into()),
                Some("sha256:abc".into())
            )
        );
    }

    #[test]
    fn pull_and_naming_helpers() {
        let hub = ImageRef::parse("ubuntu");
        assert_eq!(hub.repository(), "docker.io/library/ubuntu");
        assert_eq!(hub.pull_tag(), "latest");
        assert_eq!(hub.familiar_repository(), "ubuntu");
        assert_eq!(hub.auth_key(), DOCKER_HUB_AUTH_KEY);

        let agent = ImageRef::parse("docker.io/warpdotdev/warp-agent:1.2");
        assert_eq!(agent.pull_tag(), "1.2");
        assert_eq!(agent.familiar_repository(), "warpdotdev/warp-agent");

        let pinned = ImageRef::parse("localhost:5999/oz-demo-sidecar:1@sha256:0123");
        assert_eq!(pinned.pull_tag(), "sha256:0123");
        assert_eq!(
            pinned.familiar_repository(),
            "localhost:5999/oz-demo-sidecar"
        );
        assert_eq!(pinned.auth_key(), "localhost:5999");
    }
}
