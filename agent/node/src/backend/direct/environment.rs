//! The environment of each direct task process: what the agent, the setup command and the
//! teardown command see, and which host variables pass through.
//!
//! Values from Oz, the operator and the env file are credentials: they stay
//! [`SecretString`]s until [`apply`] hands them to the process being started.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use secrecy::{ExposeSecret as _, SecretString};
use tokio::process::Command;

use crate::backend::TaskEnv;

/// Value of `OZ_WORKER_BACKEND` for setup and teardown commands.
const BACKEND_NAME: &str = "direct";
/// Host variables handed to the agent; everything else of the node's environment is
/// withheld so node credentials never leak into tasks.
const HOST_ENV_FOR_AGENT: [&str; 3] = ["HOME", "TMPDIR", "PATH"];

/// One value of a task process's environment.
#[derive(Debug, Clone)]
pub(super) enum EnvValue {
    /// From Oz, the operator or the env file: possibly a credential.
    Secret(SecretString),
    /// A path the backend chose (not secret, possibly not UTF-8).
    Path(OsString),
}

/// A task process environment in order, later entries winning (see
/// [`dedupe_last_wins`](crate::task_env::dedupe_last_wins)).
pub(super) type Env = Vec<(String, EnvValue)>;

/// Secrets of a [`TaskEnv`] as process environment entries.
pub(super) fn secrets(env: TaskEnv) -> impl Iterator<Item = (String, EnvValue)> {
    env.into_iter()
        .map(|(name, value)| (name, EnvValue::Secret(value)))
}

/// Sets `env` on `command`: the one place the values are exposed.
pub(super) fn apply(command: &mut Command, env: &Env) {
    for (name, value) in env {
        match value {
            EnvValue::Secret(secret) => command.env(name, secret.expose_secret()),
            EnvValue::Path(path) => command.env(name, path),
        };
    }
}

/// Clears the agent's environment down to the host variables it may see.
pub(super) fn restrict_to_host_basics(command: &mut Command) {
    command.env_clear();
    for name in HOST_ENV_FOR_AGENT {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
}

/// `GIT_CONFIG_GLOBAL`, pointing at the task's own git config.
pub(super) fn git_config_entry(path: &Path) -> (String, EnvValue) {
    (
        "GIT_CONFIG_GLOBAL".to_owned(),
        EnvValue::Path(path.as_os_str().to_owned()),
    )
}

/// `OZ_*` variables for setup and teardown commands.
pub(super) fn oz_script_env<'a>(
    workspace: &'a Path,
    task_id: &'a str,
) -> [(&'static str, &'a OsStr); 3] {
    [
        ("OZ_WORKSPACE_ROOT", workspace.as_os_str()),
        ("OZ_WORKER_BACKEND", OsStr::new(BACKEND_NAME)),
        ("OZ_RUN_ID", OsStr::new(task_id)),
    ]
}

/// Points a third-party harness's state at the workspace so concurrent tasks do not
/// share it.
pub(super) fn harness_env(harness: Option<&str>, workspace: &Path) -> Option<(String, EnvValue)> {
    let (name, dir) = match harness.map(str::trim)? {
        "claude" => ("CLAUDE_CONFIG_DIR", ".claude"),
        "codex" => ("CODEX_HOME", ".codex"),
        _ => return None,
    };
    Some((
        name.to_owned(),
        EnvValue::Path(workspace.join(dir).into_os_string()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_entry(entry: Option<(String, EnvValue)>) -> Option<(String, OsString)> {
        entry.map(|(name, value)| match value {
            EnvValue::Path(path) => (name, path),
            EnvValue::Secret(_) => panic!("a harness dir is a path"),
        })
    }

    #[test]
    fn harness_state_dirs() {
        let ws = Path::new("/w/t1");
        assert_eq!(
            path_entry(harness_env(Some("claude"), ws)),
            Some(("CLAUDE_CONFIG_DIR".into(), "/w/t1/.claude".into()))
        );
        assert_eq!(
            path_entry(harness_env(Some(" codex "), ws)),
            Some(("CODEX_HOME".into(), "/w/t1/.codex".into()))
        );
        assert!(harness_env(Some("gemini"), ws).is_none());
        assert!(harness_env(Some("oz"), ws).is_none());
        assert!(harness_env(None, ws).is_none());
    }

    #[test]
    fn debug_output_hides_secret_values() {
        let env: Env = secrets(crate::backend::secret_env([("API_KEY", "sk-secret")])).collect();
        let shown = format!("{env:?}");
        assert!(shown.contains("API_KEY"), "{shown}");
        assert!(!shown.contains("sk-secret"), "{shown}");
    }
}
