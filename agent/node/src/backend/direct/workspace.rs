//! The files a direct task runs with: its workspace directory, the env file a setup
//! command exports variables through, and the isolated global git config.
//!
//! All filesystem work runs on the blocking pool ([`blocking`]), never on a runtime
//! thread. Temporary files come from [`tempfile::Builder`]; they are removed explicitly
//! (off the runtime) when a task ends, and by their own `Drop` only when a run is dropped
//! halfway.

use std::borrow::Cow;
use std::fs::{OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ozfleet_proto::oz::FailureReason;
use tempfile::{TempDir, TempPath};

use super::go_errors::go_path_error;
use crate::backend::TaskFailure;

const ENV_FILE_PREFIX: &str = "oz-env-";
const GIT_CONFIG_DIR_PREFIX: &str = "oz-gitconfig-";

/// Runs blocking filesystem work on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| Err(io::Error::other(error)))
}

/// The directory a task runs in.
pub(super) struct Workspace {
    pub dir: PathBuf,
    /// The operator's target dir: shared between tasks and never deleted.
    pub shared: bool,
}

impl Workspace {
    /// The operator's target dir, used as is.
    pub fn shared(dir: PathBuf) -> Self {
        Self { dir, shared: true }
    }

    /// Creates (or reuses) `<root>/<task id>`, private to the node's user.
    pub async fn create(root: &Path, task_id: &str) -> Result<Self, TaskFailure> {
        let dir = root.join(task_id);
        create_private_dir_all(&dir).await.map_err(|error| {
            TaskFailure::new(
                FailureReason::WorkspaceSetup,
                format!(
                    "failed to create workspace directory: {}",
                    go_path_error("mkdir", &dir, &error)
                ),
            )
        })?;
        Ok(Self { dir, shared: false })
    }
}

/// The isolated global git config of a task (`GIT_CONFIG_GLOBAL`): `.gitconfig` in the
/// workspace, or in target-dir mode in a temporary `oz-gitconfig-*` directory (the shared
/// directory must not carry one task's git identity into the next).
pub(super) struct GitConfig {
    pub path: PathBuf,
    temp_dir: Option<TempDir>,
}

impl GitConfig {
    pub async fn prepare(workspace: &Workspace) -> Result<Self, TaskFailure> {
        if !workspace.shared {
            return Ok(Self {
                path: workspace.dir.join(".gitconfig"),
                temp_dir: None,
            });
        }
        let dir = blocking(|| {
            tempfile::Builder::new()
                .prefix(GIT_CONFIG_DIR_PREFIX)
                .permissions(Permissions::from_mode(0o700))
                .tempdir_in(std::env::temp_dir())
        })
        .await
        .map_err(|error| {
            TaskFailure::new(
                FailureReason::WorkspaceSetup,
                format!("failed to create temporary git config directory: {error}"),
            )
        })?;
        Ok(Self {
            path: dir.path().join(".gitconfig"),
            temp_dir: Some(dir),
        })
    }

    /// Removes the temporary directory, if there is one.
    pub async fn remove(self) {
        let Some(dir) = self.temp_dir else { return };
        let shown = dir.path().display().to_string();
        if let Err(error) = blocking(move || dir.close()).await {
            tracing::warn!(dir = shown, %error, "failed to remove temporary git config dir");
        }
    }
}

/// The empty `oz-env-*` file (mode 0600) a setup command may write variables to.
pub(super) struct EnvFile {
    path: TempPath,
}

impl EnvFile {
    pub async fn create(dir: &Path) -> Result<Self, TaskFailure> {
        let dir = dir.to_path_buf();
        let created = blocking(move || {
            // The failing name is kept so the error reads like the reference's.
            let mut failed_at = None;
            tempfile::Builder::new()
                .prefix(ENV_FILE_PREFIX)
                .make_in(&dir, |path| {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)
                        .inspect_err(|_| failed_at = Some(path.to_path_buf()))
                })
                .map(tempfile::NamedTempFile::into_temp_path)
                .map_err(|error| {
                    let path = failed_at.unwrap_or_else(|| dir.join(format!("{ENV_FILE_PREFIX}*")));
                    go_path_error("open", &path, &error)
                })
                .map_err(io::Error::other)
        })
        .await;
        let path = created.map_err(|error| {
            TaskFailure::new(
                FailureReason::WorkspaceSetup,
                format!("failed to create environment file: {error}"),
            )
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The variables a setup command exported through the file.
    pub async fn read(&self) -> Vec<(String, String)> {
        let path = self.path.to_path_buf();
        tokio::task::spawn_blocking(move || read_env_file(&path))
            .await
            .unwrap_or_default()
    }

    pub async fn remove(self) {
        let shown = self.path.display().to_string();
        let path = self.path;
        if let Err(error) = blocking(move || path.close()).await
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = shown, %error, "failed to remove environment file");
        }
    }
}

/// Reads the env file as dotenv. Like the reference, a file that does not parse exports
/// nothing and the problem is only logged (without the offending line: it may be a secret).
fn read_env_file(path: &Path) -> Vec<(String, String)> {
    let parsed =
        dotenvy::from_path_iter(path).and_then(|lines| lines.collect::<Result<Vec<_>, _>>());
    match parsed {
        Ok(vars) => vars,
        Err(error) => {
            let reason = match &error {
                dotenvy::Error::LineParse(_, index) => {
                    Cow::Owned(format!("syntax error at line index {index}"))
                }
                dotenvy::Error::Io(error) => Cow::Owned(error.to_string()),
                dotenvy::Error::EnvVar(error) => Cow::Owned(error.to_string()),
                _ => Cow::Borrowed("unrecognised error"),
            };
            tracing::warn!(path = %path.display(), %reason, "failed to parse environment file");
            Vec::new()
        }
    }
}

/// Accepts only a single, safe path component.
pub(super) fn validate_task_id(task_id: &str) -> Result<(), &'static str> {
    let unsafe_id = task_id.is_empty()
        || task_id == "."
        || task_id == ".."
        || task_id.contains(['/', '\\', '\0']);
    if unsafe_id {
        Err("invalid task ID")
    } else {
        Ok(())
    }
}

pub(super) async fn create_private_dir_all(path: &Path) -> io::Result<()> {
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .await
}

/// Removes a directory tree; `Ok(false)` when it was already gone. A symlink is removed
/// itself, never followed. Blocking: call it through [`blocking`].
pub(super) fn remove_dir_all_if_exists(path: &Path) -> io::Result<bool> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_must_be_one_safe_component() {
        for bad in [
            "",
            ".",
            "..",
            "../escape",
            "a/../../escape",
            "/abs/path",
            "a/b",
            "a\\b",
            "nul\0byte",
        ] {
            assert_eq!(validate_task_id(bad), Err("invalid task ID"), "{bad:?}");
        }
        for good in ["019f-run", "task_1", "...", "a.b", ".hidden"] {
            assert_eq!(validate_task_id(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn env_file_parse_errors_export_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        std::fs::write(&good, "# comment\nexport A=1\nB=\"two words\"\nC='x'\n").unwrap();
        assert_eq!(
            read_env_file(&good),
            vec![
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "two words".to_owned()),
                ("C".to_owned(), "x".to_owned()),
            ]
        );
        let bad = tmp.path().join("bad");
        std::fs::write(&bad, "A=1\nthis is not dotenv\n").unwrap();
        assert_eq!(read_env_file(&bad), vec![]);
        assert_eq!(read_env_file(&tmp.path().join("missing")), vec![]);
    }

    #[tokio::test]
    async fn temporary_files_are_private_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let env_file = EnvFile::create(tmp.path()).await.unwrap();
        let path = env_file.path().to_path_buf();
        assert!(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(ENV_FILE_PREFIX)
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        env_file.remove().await;
        assert!(!path.exists());

        let shared = Workspace::shared(tmp.path().to_path_buf());
        let git_config = GitConfig::prepare(&shared).await.unwrap();
        let dir = git_config.path.parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        git_config.remove().await;
        assert!(!dir.exists());
    }
}
