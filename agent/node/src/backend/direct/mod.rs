//! Direct backend: runs `oz` as a host process in a per-task workspace (spec §6).
//!
//! This module owns the backend itself: its configuration, the startup checks and the
//! order of a task's steps. The steps' parts live next to it:
//! - [`workspace`]: the workspace directory, the env file and the git config;
//! - [`environment`]: what each task process sees of the environment;
//! - [`process_group`]: running a step in its own process group and stopping it;
//! - [`go_errors`]: the reference worker's (Go's) wording of errors.
//!
//! Behaviour follows the reference worker, with deliberate improvements:
//! - the setup command, the agent and the teardown command each run in their own process
//!   group; cancellation sends SIGTERM to the group, then SIGKILL after a grace period, and
//!   once the group leader has exited the group is SIGKILLed so no grandchild survives;
//! - dropping a running `execute` future kills the process group too;
//! - the teardown command still runs after a cancellation (bounded by its own timeout);
//! - `shutdown` removes only the workspaces this backend used, not every entry of a
//!   workspace root that other node agents may share.
//!
//! Task environment values are credentials: only names are ever logged.

mod environment;
mod go_errors;
mod process_group;
mod workspace;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use ozfleet_proto::oz::FailureReason;
use ozfleet_proto::v1::BackendKind;
use ozfleet_worker_config::DirectSettings;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use self::environment::{
    Env, EnvValue, apply, git_config_entry, harness_env, oz_script_env, restrict_to_host_basics,
    secrets,
};
use self::go_errors::go_path_error;
use self::process_group::{StepError, interpret, run_in_process_group};
use self::workspace::{
    EnvFile, GitConfig, Workspace, blocking, remove_dir_all_if_exists, validate_task_id,
};
use super::{
    TaskBackend, TaskEnv, TaskFailure, TaskRun, cancelled, merged_env, workspace_root_or_default,
};
use crate::task_env::dedupe_last_wins;

/// Default SIGTERM → SIGKILL grace period when a task is cancelled.
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(10);
/// Upper bound on a teardown command's run time.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);

const SHELL: &str = "/bin/sh";

/// Configuration of the direct backend: the file's `backend.direct` settings plus what
/// applies to every backend.
#[derive(Debug, Clone)]
pub struct DirectConfig {
    /// Workspace root (empty means the default), target dir, oz CLI (`None` looks up
    /// `oz` on `PATH` at construction), setup and teardown commands.
    pub settings: DirectSettings,
    /// Operator environment for tasks, already resolved.
    pub environment: TaskEnv,
    /// Remove each per-task workspace when its task ends.
    pub cleanup: bool,
    /// How long a cancelled process group gets between SIGTERM and SIGKILL.
    pub cancel_grace: Duration,
    /// The task shim (`ozfleet __task-shim`), when available: it leads each task's process
    /// group and kills the group if the agent dies, so no task process outlives the agent.
    /// `None` runs task processes directly (they may then outlive an agent killed with
    /// SIGKILL).
    pub task_shim: Option<PathBuf>,
}

impl Default for DirectConfig {
    fn default() -> Self {
        Self {
            settings: DirectSettings::default(),
            environment: Vec::new(),
            cleanup: true,
            cancel_grace: DEFAULT_CANCEL_GRACE,
            task_shim: None,
        }
    }
}

/// Why the direct backend could not start (texts as the reference words them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectSetupError {
    #[error("oz CLI not found in PATH: exec: \"oz\": executable file not found in $PATH")]
    OzNotFound,
    #[error("target directory {} does not exist: {detail}", .path.display())]
    TargetDirMissing { path: PathBuf, detail: String },
    #[error("target directory {} is not a directory", .path.display())]
    TargetDirNotADirectory { path: PathBuf },
    #[error("failed to create workspace root {}: {detail}", .path.display())]
    WorkspaceRoot { path: PathBuf, detail: String },
}

/// Runs tasks as host processes.
pub struct DirectBackend {
    config: DirectConfig,
    oz_path: PathBuf,
    /// Per-task workspaces this backend created or reused and has not removed yet.
    workspaces: Mutex<HashSet<PathBuf>>,
}

impl DirectBackend {
    /// A command for a task process, through the task shim when configured.
    fn task_command(&self, program: &Path) -> Command {
        shimmed(self.config.task_shim.as_deref(), program)
    }

    /// Resolves the oz CLI and prepares the workspace root (or checks the target dir).
    /// Touches the filesystem: call it where blocking is allowed (startup, or
    /// `spawn_blocking` as [`from_settings`](super::from_settings) does).
    pub fn new(mut config: DirectConfig) -> Result<Self, DirectSetupError> {
        let settings = &mut config.settings;
        let oz_path = match settings
            .oz_path
            .as_ref()
            .filter(|path| !path.as_os_str().is_empty())
        {
            Some(path) => path.clone(),
            None => look_path("oz", std::env::var_os("PATH").as_deref())
                .ok_or(DirectSetupError::OzNotFound)?,
        };
        tracing::info!(oz = %oz_path.display(), "using oz CLI");

        settings.target_dir = settings
            .target_dir
            .take()
            .filter(|dir| !dir.as_os_str().is_empty());
        if let Some(target) = &settings.target_dir {
            let metadata =
                std::fs::metadata(target).map_err(|error| DirectSetupError::TargetDirMissing {
                    path: target.clone(),
                    detail: go_path_error("stat", target, &error),
                })?;
            if !metadata.is_dir() {
                return Err(DirectSetupError::TargetDirNotADirectory {
                    path: target.clone(),
                });
            }
            tracing::info!(
                target_dir = %target.display(),
                "using shared target directory (per-task workspace isolation disabled)"
            );
        } else {
            settings.workspace_root = workspace_root_or_default(&settings.workspace_root);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&settings.workspace_root)
                .map_err(|error| DirectSetupError::WorkspaceRoot {
                    path: settings.workspace_root.clone(),
                    detail: go_path_error("mkdir", &settings.workspace_root, &error),
                })?;
        }

        Ok(Self {
            config,
            oz_path,
            workspaces: Mutex::new(HashSet::new()),
        })
    }

    /// Workspace, setup command, agent, teardown and cleanup (spec §6.2, §6.3).
    async fn run(&self, task: TaskRun, cancel: CancellationToken) -> Result<(), TaskFailure> {
        validate_task_id(&task.task_id).map_err(|error| {
            TaskFailure::new(
                FailureReason::WorkspaceSetup,
                format!("invalid task ID for workspace path: {error}"),
            )
        })?;
        let workspace = self.prepare_workspace(&task.task_id).await?;
        let git_config = GitConfig::prepare(&workspace).await?;
        tracing::info!(
            task_id = %task.task_id,
            execution_id = %task.execution_id,
            workspace = %workspace.dir.display(),
            "starting task"
        );

        let outcome = self
            .run_in_workspace(&task, &workspace, &git_config.path, &cancel)
            .await;
        self.finish_workspace(&task.task_id, &workspace, &git_config.path)
            .await;
        git_config.remove().await;
        outcome
    }

    /// Removes the workspaces this backend used that still exist (those kept because
    /// cleanup is disabled, or whose removal failed). Other entries of the workspace root
    /// are left alone: several node agents may share it.
    async fn remove_workspaces(&self, timeout: Duration) {
        let workspaces: Vec<PathBuf> = self.workspaces().drain().collect();
        if workspaces.is_empty() {
            return;
        }
        // Unlike the reference, --no-cleanup also keeps workspaces across a shutdown: they
        // are kept for inspection, and a restart is when an operator wants to look.
        if !self.config.cleanup {
            tracing::info!(
                count = workspaces.len(),
                "keeping task workspaces (cleanup disabled)"
            );
            return;
        }
        let removal = blocking(move || {
            for dir in workspaces {
                match remove_dir_all_if_exists(&dir) {
                    Ok(true) => tracing::info!(
                        workspace = %dir.display(),
                        "removed lingering workspace on shutdown"
                    ),
                    Ok(false) => {}
                    Err(error) => tracing::warn!(
                        workspace = %dir.display(),
                        %error,
                        "failed to remove workspace during shutdown"
                    ),
                }
            }
            Ok(())
        });
        match tokio::time::timeout(timeout, removal).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "workspace removal on shutdown failed"),
            Err(_) => tracing::warn!(
                ?timeout,
                "workspace removal on shutdown did not finish in time"
            ),
        }
    }

    fn workspaces(&self) -> MutexGuard<'_, HashSet<PathBuf>> {
        self.workspaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn prepare_workspace(&self, task_id: &str) -> Result<Workspace, TaskFailure> {
        if let Some(target) = &self.config.settings.target_dir {
            return Ok(Workspace::shared(target.clone()));
        }
        let workspace = Workspace::create(&self.config.settings.workspace_root, task_id).await?;
        self.workspaces().insert(workspace.dir.clone());
        tracing::info!(task_id, workspace = %workspace.dir.display(), "created workspace");
        Ok(workspace)
    }

    /// Env file, task environment, setup command and agent (spec §6.2 steps 4–9).
    async fn run_in_workspace(
        &self,
        task: &TaskRun,
        workspace: &Workspace,
        git_config: &Path,
        cancel: &CancellationToken,
    ) -> Result<(), TaskFailure> {
        let env_file = EnvFile::create(&workspace.dir).await?;
        let outcome = self
            .setup_and_run_agent(task, workspace, git_config, &env_file, cancel)
            .await;
        env_file.remove().await;
        outcome
    }

    async fn setup_and_run_agent(
        &self,
        task: &TaskRun,
        workspace: &Workspace,
        git_config: &Path,
        env_file: &EnvFile,
        cancel: &CancellationToken,
    ) -> Result<(), TaskFailure> {
        let mut env: Env = secrets(merged_env(&task.env, &self.config.environment)).collect();
        env.extend(harness_env(task.harness.as_deref(), &workspace.dir));
        env.push(git_config_entry(git_config));
        let mut env = dedupe_last_wins(env);

        if let Some(setup) = non_empty(self.config.settings.setup_command.as_deref()) {
            if cancel.is_cancelled() {
                return Err(cancelled(0));
            }
            let mut command =
                shell_command(self.config.task_shim.as_deref(), setup, &workspace.dir);
            apply(&mut command, &env);
            command
                .envs(oz_script_env(&workspace.dir, &task.task_id))
                .env("OZ_ENVIRONMENT_FILE", env_file.path());
            tracing::info!(task_id = %task.task_id, "running setup command");
            let end =
                run_in_process_group(command, cancel.cancelled(), self.config.cancel_grace).await;
            match interpret(end, cancel.is_cancelled(), Path::new(SHELL)) {
                Ok(()) => {}
                Err(StepError::Cancelled { exit_code }) => return Err(cancelled(exit_code)),
                Err(StepError::Failed { text, .. }) => {
                    return Err(TaskFailure::new(
                        FailureReason::SetupCommand,
                        format!("setup command failed: {text}"),
                    ));
                }
            }
        }

        let exported = env_file.read().await;
        if !exported.is_empty() {
            let names: Vec<&str> = exported.iter().map(|(name, _)| name.as_str()).collect();
            tracing::info!(task_id = %task.task_id, ?names, "setup command exported variables");
        }
        env.extend(
            exported
                .into_iter()
                .map(|(name, value)| (name, EnvValue::Secret(value.into()))),
        );
        // The task's own git config wins over whatever the setup command exported.
        env.push(git_config_entry(git_config));
        let env = dedupe_last_wins(env);

        self.run_agent(task, workspace, &env, cancel).await
    }

    async fn run_agent(
        &self,
        task: &TaskRun,
        workspace: &Workspace,
        env: &Env,
        cancel: &CancellationToken,
    ) -> Result<(), TaskFailure> {
        if cancel.is_cancelled() {
            return Err(cancelled(0));
        }
        let mut command = self.task_command(&self.oz_path);
        command.args(&task.base_args).current_dir(&workspace.dir);
        restrict_to_host_basics(&mut command);
        apply(&mut command, env);
        tracing::info!(task_id = %task.task_id, "running oz agent");
        let end = run_in_process_group(command, cancel.cancelled(), self.config.cancel_grace).await;
        match interpret(end, cancel.is_cancelled(), &self.oz_path) {
            Ok(()) => {
                tracing::info!(task_id = %task.task_id, "oz agent completed successfully");
                Ok(())
            }
            Err(StepError::Cancelled { exit_code }) => Err(cancelled(exit_code)),
            Err(StepError::Failed { text, exit_code }) => Err(TaskFailure::new(
                FailureReason::AgentInvocation,
                format!("oz agent exited with error: {text}"),
            )
            .with_exit_code(exit_code)),
        }
    }

    /// Teardown and cleanup (spec §6.3): target-dir mode runs the teardown and keeps the
    /// directory; without cleanup nothing runs (the reference skips teardown too); with
    /// cleanup the teardown runs, then the workspace is removed.
    async fn finish_workspace(&self, task_id: &str, workspace: &Workspace, git_config: &Path) {
        if workspace.shared {
            self.run_teardown(task_id, workspace, git_config).await;
            return;
        }
        if !self.config.cleanup {
            tracing::info!(
                task_id,
                workspace = %workspace.dir.display(),
                "skipping cleanup for workspace"
            );
            return;
        }
        self.run_teardown(task_id, workspace, git_config).await;

        tracing::info!(task_id, workspace = %workspace.dir.display(), "removing workspace");
        let dir = workspace.dir.clone();
        match blocking(move || remove_dir_all_if_exists(&dir)).await {
            Ok(_) => {
                self.workspaces().remove(&workspace.dir);
            }
            Err(error) => tracing::warn!(
                task_id,
                workspace = %workspace.dir.display(),
                %error,
                "failed to remove workspace"
            ),
        }
    }

    /// Runs the teardown command, if any. It is not tied to the task's cancellation (so it
    /// also runs after one) but to [`TEARDOWN_TIMEOUT`]; failures are only logged.
    async fn run_teardown(&self, task_id: &str, workspace: &Workspace, git_config: &Path) {
        let Some(teardown) = non_empty(self.config.settings.teardown_command.as_deref()) else {
            return;
        };
        let mut command = shell_command(self.config.task_shim.as_deref(), teardown, &workspace.dir);
        command
            .env("GIT_CONFIG_GLOBAL", git_config)
            .envs(oz_script_env(&workspace.dir, task_id));
        tracing::info!(task_id, "running teardown command");
        let end = run_in_process_group(
            command,
            tokio::time::sleep(TEARDOWN_TIMEOUT),
            self.config.cancel_grace,
        )
        .await;
        match interpret(end, false, Path::new(SHELL)) {
            Ok(()) => {}
            Err(StepError::Cancelled { .. }) => tracing::warn!(
                task_id,
                timeout = ?TEARDOWN_TIMEOUT,
                "teardown command timed out and was killed"
            ),
            Err(StepError::Failed { text, .. }) => {
                tracing::warn!(task_id, error = %text, "teardown command failed");
            }
        }
    }
}

impl TaskBackend for DirectBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Direct
    }

    /// Runs one task to its end: workspace, setup command, agent, teardown and cleanup.
    ///
    /// When `cancel` fires, the running process group gets SIGTERM, then SIGKILL after the
    /// grace period, and a `TaskCancelled` failure (`context canceled`) is returned; the
    /// teardown command and cleanup still run.
    fn execute(
        &self,
        task: TaskRun,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>> {
        Box::pin(self.run(task, cancel))
    }

    fn shutdown(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.remove_workspaces(timeout))
    }
}

/// Go's `exec.LookPath` for a bare name: the first executable regular file named `name` in
/// the absolute entries of `path_var` (relative entries are refused, like Go's `ErrDot`).
fn look_path(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path_var?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|metadata| {
                !metadata.is_dir() && metadata.permissions().mode() & 0o111 != 0
            })
        })
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|value| !value.trim().is_empty())
}

fn shell_command(shim: Option<&Path>, script: &str, dir: &Path) -> Command {
    let mut command = shimmed(shim, Path::new(SHELL));
    command.arg("-c").arg(script).current_dir(dir);
    command
}

/// `program`, run through the task shim when there is one (see [`DirectConfig::task_shim`]).
fn shimmed(shim: Option<&Path>, program: &Path) -> Command {
    match shim {
        Some(shim) => {
            let mut command = Command::new(shim);
            command.arg(TASK_SHIM_ARGUMENT).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// The argument that makes the `ozfleet` binary act as the task shim.
pub const TASK_SHIM_ARGUMENT: &str = "__task-shim";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_path_finds_only_absolute_executable_files() {
        let tmp = tempfile::tempdir().unwrap();
        let not_exec = tmp.path().join("a");
        let exec = tmp.path().join("b");
        let dir_named_oz = tmp.path().join("c");
        std::fs::create_dir_all(&not_exec).unwrap();
        std::fs::create_dir_all(&exec).unwrap();
        std::fs::create_dir_all(dir_named_oz.join("oz")).unwrap();
        std::fs::write(not_exec.join("oz"), "").unwrap();
        std::fs::write(exec.join("oz"), "").unwrap();
        std::fs::set_permissions(exec.join("oz"), std::fs::Permissions::from_mode(0o755)).unwrap();

        let path = std::env::join_paths([&not_exec, &dir_named_oz, &exec]).unwrap();
        assert_eq!(look_path("oz", Some(&path)), Some(exec.join("oz")));
        let path = std::env::join_paths([&not_exec, &dir_named_oz]).unwrap();
        assert_eq!(look_path("oz", Some(&path)), None);
        let relative = std::env::join_paths([Path::new("relative"), Path::new("")]).unwrap();
        assert_eq!(look_path("oz", Some(&relative)), None);
        assert_eq!(look_path("oz", None), None);
        assert_eq!(
            DirectSetupError::OzNotFound.to_string(),
            "oz CLI not found in PATH: exec: \"oz\": executable file not found in $PATH"
        );
    }

    #[test]
    fn config_debug_hides_environment_values() {
        let config = DirectConfig {
            environment: crate::backend::secret_env([("API_KEY", "sk-secret")]),
            ..DirectConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("API_KEY"), "{shown}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert_eq!(config.cancel_grace, DEFAULT_CANCEL_GRACE);
        assert!(config.cleanup);
    }
}
