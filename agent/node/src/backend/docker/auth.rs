//! Registry credentials from the Docker CLI's config file, like `docker pull` finds them:
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. A credential helper
//! (`credHelpers[<registry>]`, else `credsStore`) is asked first; the `auths` entry of the
//! registry (base64 `user:password` in `auth`, or `username`/`password`, plus an optional
//! `identitytoken`) is the fallback.
//!
//! Credentials are secrets: nothing here logs them, errors name only the registry (a parse
//! error of the file has the values serde would quote blanked), and the `Debug` output of
//! the parsed file shows which credentials are set, never their values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use bollard::auth::DockerCredentials;
use ozfleet_proto::oz::redacted_serde_error;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::reference::ImageRef;

/// Upper bound for one credential helper run.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// What a helper answers as the user name when the secret is an identity token.
const HELPER_TOKEN_USER: &str = "<token>";

#[derive(Default, Deserialize)]
struct CliConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl std::fmt::Debug for CliConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Registry names and helper names are not secrets; the entries redact themselves.
        f.debug_struct("CliConfig")
            .field("auths", &self.auths)
            .field("creds_store", &self.creds_store)
            .field("cred_helpers", &self.cred_helpers)
            .finish()
    }
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry")
            .field("auth", &Redacted(&self.auth))
            .field("username", &Redacted(&self.username))
            .field("password", &Redacted(&self.password))
            .field("identitytoken", &Redacted(&self.identitytoken))
            .finish()
    }
}

/// Debug-formats whether a credential is set, never its value.
struct Redacted<'a>(&'a Option<String>);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(<redacted>)"
        } else {
            "None"
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// The config file the Docker CLI would read.
pub(super) fn cli_config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG").filter(|dir| !dir.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir).join("config.json")),
        None => std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(|home| PathBuf::from(home).join(".docker").join("config.json")),
    }
}

/// Credentials for pulling `image`, if the config at `config_path` has any for its
/// registry. `Err` says why they could not be read (without any secret); a missing file is
/// simply no credentials.
pub(super) async fn credentials_for(
    config_path: &Path,
    image: &ImageRef,
) -> Result<Option<DockerCredentials>, String> {
    let text = match tokio::fs::read_to_string(config_path).await {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("reading {}: {error}", config_path.display())),
    };
    // serde's message quotes offending values, which may be credentials.
    let config: CliConfig = serde_json::from_str(&text).map_err(|error| {
        format!(
            "parsing {}: {}",
            config_path.display(),
            redacted_serde_error(&error)
        )
    })?;
    let key = image.auth_key();

    let helper = lookup(&config.cred_helpers, key)
        .map(String::as_str)
        .or(config.creds_store.as_deref())
        .filter(|helper| !helper.is_empty());
    if let Some(helper) = helper {
        match from_helper(helper, key).await {
            Ok(Some(credentials)) => return Ok(Some(credentials)),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(registry = key, helper, %error, "credential helper failed");
            }
        }
    }
    lookup(&config.auths, key)
        .map(|entry| from_entry(entry, key))
        .transpose()
        .map(Option::flatten)
}

/// The entry filed under `key`, else under a key naming the same host (the CLI also
/// accepts `https://host/...` and, for Docker Hub, the bare host names).
fn lookup<'a, T>(entries: &'a HashMap<String, T>, key: &str) -> Option<&'a T> {
    if let Some(entry) = entries.get(key) {
        return Some(entry);
    }
    let wanted = host_of(key);
    let hub = key == super::reference::DOCKER_HUB_AUTH_KEY;
    entries.iter().find_map(|(candidate, entry)| {
        let host = host_of(candidate);
        let same = host == wanted
            || (hub
                && matches!(
                    host,
                    "docker.io" | "index.docker.io" | "registry-1.docker.io"
                ));
        same.then_some(entry)
    })
}

/// `https://host:port/v1/` → `host:port`.
fn host_of(key: &str) -> &str {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    without_scheme.split('/').next().unwrap_or(without_scheme)
}

fn from_entry(entry: &AuthEntry, key: &str) -> Result<Option<DockerCredentials>, String> {
    let (username, password) = match entry.auth.as_deref().filter(|auth| !auth.is_empty()) {
        Some(auth) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| format!("the auth entry for {key} is not valid base64"))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| format!("the auth entry for {key} is not UTF-8"))?;
            let (username, password) = decoded
                .split_once(':')
                .ok_or_else(|| format!("the auth entry for {key} is not user:password"))?;
            (username.to_owned(), password.to_owned())
        }
        None => (
            entry.username.clone().unwrap_or_default(),
            entry.password.clone().unwrap_or_default(),
        ),
    };
    let identitytoken = entry
        .identitytoken
        .clone()
        .filter(|token| !token.is_empty());
    if username.is_empty() && identitytoken.is_none() {
        return Ok(None);
    }
    Ok(Some(DockerCredentials {
        username: Some(username),
        password: Some(password),
        identitytoken,
        serveraddress: Some(key.to_owned()),
        ..Default::default()
    }))
}

/// Runs `docker-credential-<helper> get` with the registry on stdin.
async fn from_helper(helper: &str, key: &str) -> Result<Option<DockerCredentials>, String> {
    let program = format!("docker-credential-{helper}");
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("running {program}: {error}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(key.as_bytes())
            .await
            .map_err(|error| format!("writing to {program}: {error}"))?;
    }
    let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not answer within {HELPER_TIMEOUT:?}"))?
        .map_err(|error| format!("running {program}: {error}"))?;
    if !output.status.success() {
        // The helper's "credentials not found" is a non-zero exit too: no credentials.
        return Ok(None);
    }
    let answer: HelperAnswer = serde_json::from_slice(&output.stdout)
        .map_err(|_| format!("{program} gave an answer that is not credentials JSON"))?;
    if answer.username.is_empty() {
        return Ok(None);
    }
    let credentials = if answer.username == HELPER_TOKEN_USER {
        DockerCredentials {
            identitytoken: Some(answer.secret),
            serveraddress: Some(key.to_owned()),
            ..Default::default()
        }
    } else {
        DockerCredentials {
            username: Some(answer.username),
            password: Some(answer.secret),
            serveraddress: Some(key.to_owned()),
            ..Default::default()
        }
    };
    Ok(Some(credentials))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn creds(config: &str, image: &str) -> Result<Option<DockerCredentials>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, config).unwrap();
        credentials_for(&path, &ImageRef::parse(image)).await
    }

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[tokio::test]
    async fn auth_entries_decode_to_username_and_password() {
        let config = format!(
            r#"{{"auths":{{"ghcr.io":{{"auth":"{}"}},"https://index.docker.io/v1/":{{"auth":"{}"}}}}}}"#,
            b64("octo:ghp_secret"),
            b64("hubuser:hub:pass")
        );
        let ghcr = creds(&config, "ghcr.io/org/img:1").await.unwrap().unwrap();
        assert_eq!(ghcr.username.as_deref(), Some("octo"));
        assert_eq!(ghcr.password.as_deref(), Some("ghp_secret"));
        assert_eq!(ghcr.serveraddress.as_deref(), Some("ghcr.io"));

        // Docker Hub images use the special key; only the first ':' splits.
        let hub = creds(&config, "warpdotdev/warp-agent")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hub.username.as_deref(), Some("hubuser"));
        assert_eq!(hub.password.as_deref(), Some("hub:pass"));
        assert_eq!(
            hub.serveraddress.as_deref(),
            Some("https://index.docker.io/v1/")
        );

        assert!(creds(&config, "quay.io/x/y").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn host_spellings_and_plain_fields() {
        let config = r#"{"auths":{"https://registry.example.com/v2/":{"username":"u","password":"p"},
                                   "docker.io":{"identitytoken":"tok"}}}"#;
        let found = creds(config, "registry.example.com/a:1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.username.as_deref(), Some("u"));
        assert_eq!(found.password.as_deref(), Some("p"));
        let hub = creds(config, "ubuntu:22.04").await.unwrap().unwrap();
        assert_eq!(hub.identitytoken.as_deref(), Some("tok"));
    }

    #[tokio::test]
    async fn missing_or_empty_config_means_no_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        assert!(
            credentials_for(&missing, &ImageRef::parse("ubuntu"))
                .await
                .unwrap()
                .is_none()
        );
        assert!(creds("{}", "ubuntu").await.unwrap().is_none());
        assert!(
            creds(r#"{"auths":{"ghcr.io":{}}}"#, "ghcr.io/a")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn bad_entries_are_errors_without_secrets() {
        let error = creds(r#"{"auths":{"ghcr.io":{"auth":"%%%"}}}"#, "ghcr.io/a")
            .await
            .unwrap_err();
        assert_eq!(error, "the auth entry for ghcr.io is not valid base64");
        let no_colon = format!(
            r#"{{"auths":{{"ghcr.io":{{"auth":"{}"}}}}}}"#,
            b64("secretonly")
        );
        let error = creds(&no_colon, "ghcr.io/a").await.unwrap_err();
        assert!(!error.contains("secretonly"), "{error}");
        assert!(creds("not json", "ghcr.io/a").await.is_err());
    }

    #[tokio::test]
    async fn parse_errors_do_not_quote_credentials() {
        let secret = b64("user:hunter2-password");
        // An entry that is a string instead of an object.
        let error = creds(
            &format!(r#"{{"auths":{{"ghcr.io":"{secret}"}}}}"#),
            "ghcr.io/a",
        )
        .await
        .unwrap_err();
        assert!(!error.contains(&secret), "{error}");
        assert!(!error.contains(&secret[..8]), "{error}");
        assert!(error.contains("invalid type: string"), "{error}");
        assert!(error.contains("at line 1 column"), "{error}");
        // Values of other types are quoted by serde too.
        let error = creds(
            r#"{"auths":{"ghcr.io":{"username":"u","password":987654321}}}"#,
            "ghcr.io/a",
        )
        .await
        .unwrap_err();
        assert!(!error.contains("987654321"), "{error}");
        assert!(error.contains("invalid type: integer"), "{error}");
    }

    #[test]
    fn debug_output_redacts_credentials() {
        let config: CliConfig = serde_json::from_str(&format!(
            r#"{{"credsStore":"desktop","auths":{{"ghcr.io":{{"auth":"{}","username":"octo",
                "password":"pw-secret","identitytoken":"tok-secret"}}}}}}"#,
            b64("octo:auth-secret")
        ))
        .unwrap();
        let debug = format!("{config:?}");
        for secret in [
            b64("octo:auth-secret").as_str(),
            "octo",
            "pw-secret",
            "tok-secret",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("ghcr.io"), "{debug}");
        assert!(debug.contains("desktop"), "{debug}");
        assert!(debug.contains("password: Some(<redacted>)"), "{debug}");
    }

    #[tokio::test]
    async fn a_missing_helper_falls_back_to_auths() {
        let config = format!(
            r#"{{"credsStore":"ozfleet-test-no-such-helper","auths":{{"ghcr.io":{{"auth":"{}"}}}}}}"#,
            b64("octo:pw")
        );
        let found = creds(&config, "ghcr.io/a").await.unwrap().unwrap();
        assert_eq!(found.username.as_deref(), Some("octo"));
    }
}
