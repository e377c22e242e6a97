//! Sidecars as named volumes (spec §4.2 step 3): each sidecar image's filesystem is copied
//! once into a volume named after the image's digest, and that volume is bind-mounted
//! into task containers.
//!
//! Differences from the reference, on purpose:
//! - a sidecar image already present is not pulled again (the volume is keyed by digest,
//!   so a re-pull could only matter for a moving tag, and then only for new volumes), and
//!   with the `Never` policy it is never pulled; when it is pulled, the Docker CLI's
//!   credentials for its registry are used like for the task image (the reference pulls
//!   sidecars anonymously, which fails for a private mirror);
//! - the filesystem is copied with the daemon's archive API (export one never-started
//!   container, extract into another that has the volume at `/target`) instead of running
//!   `tar -x` in a container: no container is started, and the sidecar image needs no shell
//!   or tar;
//! - both helper containers are removed (the reference leaks the export container), and a
//!   volume whose population failed is removed so it is never reused half-filled;
//! - populations of the same volume within one process are serialised, so concurrent
//!   tasks do not fill one volume twice at the same time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use bollard::models::{ContainerCreateBody, HostConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, RemoveContainerOptions, RemoveVolumeOptions, UploadToContainerOptions,
};
use futures::TryStreamExt as _;
use ozfleet_proto::oz::SidecarMount;
use ozfleet_worker_config::ImagePullPolicy;

use super::{Engine, LABEL_MANAGED, LABEL_SIDECAR_IMAGE, daemon_error_text, is_not_found};

/// Where the volume is mounted in the container that receives the copy.
const FILL_TARGET: &str = "/target";

/// One lock per sidecar volume name, held while the volume is looked up or filled. Shared
/// by every backend of the process: they may well talk to the same daemon.
static VOLUME_LOCKS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Mutex::default);

/// A validated sidecar.
#[derive(Debug, Clone)]
pub(super) struct Sidecar {
    pub image: String,
    pub mount_path: String,
    pub read_write: bool,
}

/// Rejects empty images, empty mount paths and duplicate mount paths (reference texts).
pub(super) fn validate(sidecars: &[SidecarMount]) -> Result<Vec<Sidecar>, String> {
    let mut seen = HashSet::new();
    sidecars
        .iter()
        .map(|sidecar| {
            if sidecar.image.trim().is_empty() {
                return Err("additional sidecar has empty image".to_owned());
            }
            if sidecar.mount_path.trim().is_empty() {
                return Err(format!(
                    "additional sidecar {} has empty mount path",
                    sidecar.image
                ));
            }
            if !seen.insert(sidecar.mount_path.as_str()) {
                return Err(format!(
                    "duplicate mount path {} for additional sidecar {}",
                    sidecar.mount_path, sidecar.image
                ));
            }
            Ok(Sidecar {
                image: sidecar.image.clone(),
                mount_path: sidecar.mount_path.clone(),
                read_write: sidecar.read_write,
            })
        })
        .collect()
}

/// `<familiar repository, sanitised>-<first 12 hex chars of the digest>`, e.g.
/// `warpdotdev-warp-agent-0123456789ab`; without a hex digest, the whole digest with ':'
/// replaced.
pub(super) fn volume_name(image: &str, digest: &str) -> String {
    let repository = super::reference::ImageRef::parse(image).familiar_repository();
    let base: String = repository
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    let suffix = if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex[..12].to_owned()
    } else {
        digest.replace(':', "-")
    };
    format!("{base}-{suffix}")
}

/// The bind of a prepared sidecar volume.
pub(super) fn bind(volume: &str, sidecar: &Sidecar) -> String {
    if sidecar.read_write {
        format!("{volume}:{}", sidecar.mount_path)
    } else {
        format!("{volume}:{}:ro", sidecar.mount_path)
    }
}

impl Engine {
    /// Makes a volume for every sidecar and returns the binds, in order.
    pub(super) async fn prepare_sidecars(
        self: Arc<Self>,
        sidecars: Vec<Sidecar>,
        task_id: String,
    ) -> Result<Vec<String>, String> {
        let mut binds = Vec::with_capacity(sidecars.len());
        for sidecar in &sidecars {
            let volume = self
                .sidecar_volume(&sidecar.image, &task_id)
                .await
                .map_err(|error| format!("failed to prepare sidecar {}: {error}", sidecar.image))?;
            binds.push(bind(&volume, sidecar));
        }
        Ok(binds)
    }

    /// The volume holding `image`'s filesystem, created and filled when missing.
    async fn sidecar_volume(&self, image: &str, task_id: &str) -> Result<String, String> {
        let policy = match self.pull_policy {
            ImagePullPolicy::Never => ImagePullPolicy::Never,
            ImagePullPolicy::Always | ImagePullPolicy::IfNotPresent => {
                ImagePullPolicy::IfNotPresent
            }
        };
        let inspect = self
            .ensure_image(image, policy)
            .await
            .map_err(|error| error.to_string())?;
        let digest = inspect
            .repo_digests
            .as_deref()
            .and_then(|digests| digests.first())
            .and_then(|digest| digest.split_once('@'))
            .map(|(_, digest)| digest.to_owned())
            .or(inspect.id)
            .ok_or("the daemon reported neither a digest nor an id for the image")?;
        let volume = volume_name(image, &digest);

        let lock = {
            let mut locks = VOLUME_LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(locks.entry(volume.clone()).or_default())
        };
        let _populating = lock.lock().await;
        match self.docker.inspect_volume(&volume).await {
            Ok(_) => {
                tracing::debug!(task_id, image, volume, "reusing sidecar volume");
                return Ok(volume);
            }
            Err(error) if is_not_found(&error) => {}
            Err(error) => {
                return Err(format!(
                    "failed to inspect volume {volume}: {}",
                    daemon_error_text(&error)
                ));
            }
        }

        tracing::info!(task_id, image, volume, "creating sidecar volume");
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_SIDECAR_IMAGE.to_owned(), image.to_owned()),
        ]);
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(volume.clone()),
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .map_err(|error| {
                format!(
                    "failed to create volume {volume}: {}",
                    daemon_error_text(&error)
                )
            })?;
        if let Err(error) = self.fill_volume(image, &volume).await {
            // An empty or partial volume must not be found by the next task.
            if let Err(remove_error) = self
                .docker
                .remove_volume(&volume, Some(RemoveVolumeOptions { force: true }))
                .await
            {
                tracing::warn!(
                    volume,
                    error = %daemon_error_text(&remove_error),
                    "failed to remove the partly filled sidecar volume"
                );
            }
            return Err(error);
        }
        tracing::info!(task_id, image, volume, "sidecar volume ready");
        Ok(volume)
    }

    /// Copies `image`'s filesystem into `volume`.
    async fn fill_volume(&self, image: &str, volume: &str) -> Result<(), String> {
        let source = self
            .create_helper(image, None)
            .await
            .map_err(|error| format!("failed to create export container: {error}"))?;
        let target = match self
            .create_helper(image, Some(format!("{volume}:{FILL_TARGET}")))
            .await
        {
            Ok(target) => target,
            Err(error) => {
                self.remove_helper(&source).await;
                return Err(format!("failed to create extraction container: {error}"));
            }
        };
        let export = self
            .long_requests
            .export_container(&source)
            .map_err(|error| std::io::Error::other(daemon_error_text(&error)));
        let copied = self
            .long_requests
            .upload_to_container(
                &target,
                Some(UploadToContainerOptions {
                    path: FILL_TARGET.to_owned(),
                    ..Default::default()
                }),
                bollard::body_try_stream(export),
            )
            .await
            .map_err(|error| {
                format!(
                    "failed to copy the sidecar filesystem: {}",
                    daemon_error_text(&error)
                )
            });
        self.remove_helper(&source).await;
        self.remove_helper(&target).await;
        copied
    }

    /// A never-started container of `image` (command `true`), optionally with one bind.
    async fn create_helper(&self, image: &str, bind: Option<String>) -> Result<String, String> {
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_SIDECAR_IMAGE.to_owned(), image.to_owned()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["true".to_owned()]),
            labels: Some(labels),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                binds: bind.map(|bind| vec![bind]),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.docker
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .map(|created| created.id)
            .map_err(|error| daemon_error_text(&error))
    }

    async fn remove_helper(&self, id: &str) {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        if let Err(error) = self.docker.remove_container(id, Some(options)).await
            && !is_not_found(&error)
        {
            tracing::warn!(
                container = id,
                error = %daemon_error_text(&error),
                "failed to remove sidecar helper container"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(image: &str, path: &str) -> SidecarMount {
        SidecarMount {
            image: image.into(),
            mount_path: path.into(),
            read_write: false,
        }
    }

    #[test]
    fn validation_texts() {
        assert_eq!(
            validate(&[mount("", "/agent")]).unwrap_err(),
            "additional sidecar has empty image"
        );
        assert_eq!(
            validate(&[mount("a:1", " ")]).unwrap_err(),
            "additional sidecar a:1 has empty mount path"
        );
        assert_eq!(
            validate(&[mount("a:1", "/agent"), mount("b:1", "/agent")]).unwrap_err(),
            "duplicate mount path /agent for additional sidecar b:1"
        );
        let ok = validate(&[mount("a:1", "/agent"), mount("b:1", "/mnt/b")]).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(validate(&[]).unwrap().is_empty());
    }

    #[test]
    fn volume_names_follow_the_reference() {
        assert_eq!(
            volume_name(
                "docker.io/warpdotdev/warp-agent:latest",
                "sha256:0123456789abcdef0123"
            ),
            "warpdotdev-warp-agent-0123456789ab"
        );
        assert_eq!(
            volume_name(
                "localhost:5999/oz-demo-sidecar:1",
                "sha256:fedcba9876543210"
            ),
            "localhost-5999-oz-demo-sidecar-fedcba987654"
        );
        assert_eq!(volume_name("ubuntu", "weird:xyz"), "ubuntu-weird-xyz");
    }

    #[test]
    fn binds_are_read_only_unless_asked() {
        let mut sidecar = Sidecar {
            image: "a".into(),
            mount_path: "/agent".into(),
            read_write: false,
        };
        assert_eq!(bind("vol", &sidecar), "vol:/agent:ro");
        sidecar.read_write = true;
        assert_eq!(bind("vol", &sidecar), "vol:/agent");
    }
}
