//! Direct backend: runs `oz` as a host process in a per-task workspace (spec §6).
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

use std::borrow::Cow;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use ozfleet_proto::oz::FailureReason;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::{TaskFailure, TaskRun};
use crate::task_env::dedupe_last_wins;

/// Workspace root used when none is configured (the reference default).
pub const DEFAULT_WORKSPACE_ROOT: &str = "/var/lib/oz/workspaces";
/// Default SIGTERM → SIGKILL grace period when a task is cancelled.
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(10);
/// Upper bound on a teardown command's run time.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Value of `OZ_WORKER_BACKEND` for setup and teardown commands.
const BACKEND_NAME: &str = "direct";
/// Host variables handed to the agent; everything else of the node's environment is
/// withheld so node credentials never leak into tasks.
const HOST_ENV_FOR_AGENT: [&str; 3] = ["HOME", "TMPDIR", "PATH"];
/// Error text of a cancelled task (Go's `context.Canceled`).
const CANCELLED_ERROR: &str = "context canceled";
const ENV_FILE_PREFIX: &str = "oz-env-";
const GIT_CONFIG_DIR_PREFIX: &str = "oz-gitconfig-";

/// A task environment: names are UTF-8, values may carry non-UTF-8 paths.
type Env = Vec<(String, OsString)>;

/// Configuration of the direct backend.
#[derive(Clone)]
pub struct DirectConfig {
    /// Parent of the per-task workspaces `<root>/<task id>`; empty means
    /// [`DEFAULT_WORKSPACE_ROOT`]. Unused with a target dir.
    pub workspace_root: PathBuf,
    /// Run every task in this existing directory (no per-task isolation, never deleted).
    pub target_dir: Option<PathBuf>,
    /// The oz CLI; `None` looks up `oz` on `PATH` at construction.
    pub oz_path: Option<PathBuf>,
    /// Run with `/bin/sh -c` in the workspace before the agent.
    pub setup_command: Option<String>,
    /// Run with `/bin/sh -c` in the workspace after the task.
    pub teardown_command: Option<String>,
    /// Operator environment for tasks, already resolved. Holds secrets: never logged.
    pub environment: Vec<(String, String)>,
    /// Remove each per-task workspace when its task ends.
    pub cleanup: bool,
    /// How long a cancelled process group gets between SIGTERM and SIGKILL.
    pub cancel_grace: Duration,
}

impl Default for DirectConfig {
    fn default() -> Self {
        Self {
            workspace_root: PathBuf::from(DEFAULT_WORKSPACE_ROOT),
            target_dir: None,
            oz_path: None,
            setup_command: None,
            teardown_command: None,
            environment: Vec::new(),
            cleanup: true,
            cancel_grace: DEFAULT_CANCEL_GRACE,
        }
    }
}

impl fmt::Debug for DirectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectConfig")
            .field("workspace_root", &self.workspace_root)
            .field("target_dir", &self.target_dir)
            .field("oz_path", &self.oz_path)
            .field("setup_command", &self.setup_command)
            .field("teardown_command", &self.teardown_command)
            .field("environment", &super::env_names(&self.environment))
            .field("cleanup", &self.cleanup)
            .field("cancel_grace", &self.cancel_grace)
            .finish()
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
    /// Resolves the oz CLI and prepares the workspace root (or checks the target dir).
    pub fn new(mut config: DirectConfig) -> Result<Self, DirectSetupError> {
        let oz_path = match config
            .oz_path
            .as_ref()
            .filter(|path| !path.as_os_str().is_empty())
        {
            Some(path) => path.clone(),
            None => look_path("oz", std::env::var_os("PATH").as_deref())
                .ok_or(DirectSetupError::OzNotFound)?,
        };
        tracing::info!(oz = %oz_path.display(), "using oz CLI");

        config.target_dir = config
            .target_dir
            .take()
            .filter(|dir| !dir.as_os_str().is_empty());
        if let Some(target) = &config.target_dir {
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
            if config.workspace_root.as_os_str().is_empty() {
                config.workspace_root = PathBuf::from(DEFAULT_WORKSPACE_ROOT);
            }
            create_private_dir_all(&config.workspace_root).map_err(|error| {
                DirectSetupError::WorkspaceRoot {
                    path: config.workspace_root.clone(),
                    detail: go_path_error("mkdir", &config.workspace_root, &error),
                }
            })?;
        }

        Ok(Self {
            config,
            oz_path,
            workspaces: Mutex::new(HashSet::new()),
        })
    }

    /// Runs one task to its end: workspace, setup command, agent, teardown and cleanup.
    ///
    /// When `cancel` fires, the running process group gets SIGTERM, then SIGKILL after the
    /// grace period, and a `TaskCancelled` failure (`context canceled`) is returned; the
    /// teardown command and cleanup still run.
    pub async fn execute(
        &self,
        task: TaskRun,
        cancel: CancellationToken,
    ) -> Result<(), TaskFailure> {
        validate_task_id(&task.task_id).map_err(|error| {
            TaskFailure::new(
                FailureReason::WorkspaceSetup,
                format!("invalid task ID for workspace path: {error}"),
            )
        })?;
        let workspace = self.prepare_workspace(&task.task_id)?;
        let git_config = GitConfig::prepare(&workspace)?;
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
        outcome
    }

    /// Removes the workspaces this backend used that still exist (those kept because
    /// cleanup is disabled, or whose removal failed). Other entries of the workspace root
    /// are left alone: several node agents may share it.
    pub async fn shutdown(&self, timeout: Duration) {
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
        let removal = tokio::task::spawn_blocking(move || {
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

    fn prepare_workspace(&self, task_id: &str) -> Result<Workspace, TaskFailure> {
        if let Some(target) = &self.config.target_dir {
            return Ok(Workspace {
                dir: target.clone(),
                shared: true,
            });
        }
        let dir = self.config.workspace_root.join(task_id);
        create_private_dir_all(&dir).map_err(|error| {
            TaskFailure::new(
                FailureReason::WorkspaceSetup,
                format!(
                    "failed to create workspace directory: {}",
                    go_path_error("mkdir", &dir, &error)
                ),
            )
        })?;
        self.workspaces().insert(dir.clone());
        tracing::info!(task_id, workspace = %dir.display(), "created workspace");
        Ok(Workspace { dir, shared: false })
    }

    /// Env file, task environment, setup command and agent (spec §6.2 steps 4–9).
    async fn run_in_workspace(
        &self,
        task: &TaskRun,
        workspace: &Workspace,
        git_config: &Path,
        cancel: &CancellationToken,
    ) -> Result<(), TaskFailure> {
        let env_file = EnvFile::create(&workspace.dir)?;
        let git_config_env = (
            "GIT_CONFIG_GLOBAL".to_owned(),
            git_config.as_os_str().to_owned(),
        );

        let mut env: Env = task
            .env
            .iter()
            .chain(&self.config.environment)
            .map(|(name, value)| (name.clone(), OsString::from(value)))
            .collect();
        env.extend(harness_env(task.harness.as_deref(), &workspace.dir));
        env.push(git_config_env.clone());
        let mut env = dedupe_last_wins(env);

        if let Some(setup) = non_empty(self.config.setup_command.as_deref()) {
            if cancel.is_cancelled() {
                return Err(cancelled(0));
            }
            let mut command = shell_command(setup, &workspace.dir);
            command
                .envs(env.iter().map(|(name, value)| (name, value)))
                .envs(oz_script_env(&workspace.dir, &task.task_id))
                .env("OZ_ENVIRONMENT_FILE", &env_file.path);
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

        let exported = read_env_file(&env_file.path);
        if !exported.is_empty() {
            let names: Vec<&str> = exported.iter().map(|(name, _)| name.as_str()).collect();
            tracing::info!(task_id = %task.task_id, ?names, "setup command exported variables");
        }
        env.extend(
            exported
                .into_iter()
                .map(|(name, value)| (name, OsString::from(value))),
        );
        env.push(git_config_env);
        let env = dedupe_last_wins(env);

        let outcome = self.run_agent(task, workspace, env, cancel).await;
        drop(env_file);
        outcome
    }

    async fn run_agent(
        &self,
        task: &TaskRun,
        workspace: &Workspace,
        env: Env,
        cancel: &CancellationToken,
    ) -> Result<(), TaskFailure> {
        if cancel.is_cancelled() {
            return Err(cancelled(0));
        }
        let mut command = Command::new(&self.oz_path);
        command
            .args(&task.base_args)
            .current_dir(&workspace.dir)
            .env_clear();
        for name in HOST_ENV_FOR_AGENT {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.envs(env);
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
        match tokio::task::spawn_blocking(move || remove_dir_all_if_exists(&dir)).await {
            Ok(Ok(_)) => {
                self.workspaces().remove(&workspace.dir);
            }
            Ok(Err(error)) => tracing::warn!(
                task_id,
                workspace = %workspace.dir.display(),
                %error,
                "failed to remove workspace"
            ),
            Err(error) => tracing::warn!(
                task_id,
                workspace = %workspace.dir.display(),
                %error,
                "workspace removal task failed"
            ),
        }
    }

    /// Runs the teardown command, if any. It is not tied to the task's cancellation (so it
    /// also runs after one) but to [`TEARDOWN_TIMEOUT`]; failures are only logged.
    async fn run_teardown(&self, task_id: &str, workspace: &Workspace, git_config: &Path) {
        let Some(teardown) = non_empty(self.config.teardown_command.as_deref()) else {
            return;
        };
        let mut command = shell_command(teardown, &workspace.dir);
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

/// The directory a task runs in.
struct Workspace {
    dir: PathBuf,
    /// The operator's target dir: shared between tasks and never deleted.
    shared: bool,
}

/// The isolated global git config of a task (`GIT_CONFIG_GLOBAL`). In target-dir mode it
/// lives in a temporary `oz-gitconfig-*` directory, removed when this is dropped.
struct GitConfig {
    path: PathBuf,
    temp_dir: Option<PathBuf>,
}

impl GitConfig {
    fn prepare(workspace: &Workspace) -> Result<Self, TaskFailure> {
        if !workspace.shared {
            return Ok(Self {
                path: workspace.dir.join(".gitconfig"),
                temp_dir: None,
            });
        }
        let dir = create_unique(&std::env::temp_dir(), GIT_CONFIG_DIR_PREFIX, |path| {
            DirBuilder::new().mode(0o700).create(path)
        })
        .map(|(path, ())| path)
        .map_err(|(path, error)| {
            TaskFailure::new(
                FailureReason::WorkspaceSetup,
                format!(
                    "failed to create temporary git config directory: {}",
                    go_path_error("mkdir", &path, &error)
                ),
            )
        })?;
        Ok(Self {
            path: dir.join(".gitconfig"),
            temp_dir: Some(dir),
        })
    }
}

impl Drop for GitConfig {
    fn drop(&mut self) {
        if let Some(dir) = self.temp_dir.take()
            && let Err(error) = remove_dir_all_if_exists(&dir)
        {
            tracing::warn!(dir = %dir.display(), %error, "failed to remove temporary git config dir");
        }
    }
}

/// The empty `oz-env-*` file a setup command may write variables to; removed on drop.
struct EnvFile {
    path: PathBuf,
}

impl EnvFile {
    fn create(dir: &Path) -> Result<Self, TaskFailure> {
        let (path, _file) = create_unique(dir, ENV_FILE_PREFIX, |path| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
        })
        .map_err(|(path, error)| {
            TaskFailure::new(
                FailureReason::WorkspaceSetup,
                format!(
                    "failed to create environment file: {}",
                    go_path_error("open", &path, &error)
                ),
            )
        })?;
        Ok(Self { path })
    }
}

impl Drop for EnvFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), %error, "failed to remove environment file");
        }
    }
}

/// Creates `<dir>/<prefix><random>` with `create`, retrying names that already exist.
fn create_unique<T>(
    dir: &Path,
    prefix: &str,
    create: impl Fn(&Path) -> io::Result<T>,
) -> Result<(PathBuf, T), (PathBuf, io::Error)> {
    const ATTEMPTS: usize = 10_000;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let path = dir.join(format!("{prefix}{}", rand::random::<u32>()));
        match create(&path) {
            Ok(created) => return Ok((path, created)),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                last = Some((path, error))
            }
            Err(error) => return Err((path, error)),
        }
    }
    Err(last.unwrap_or_else(|| {
        (
            dir.join(format!("{prefix}*")),
            io::Error::from(io::ErrorKind::AlreadyExists),
        )
    }))
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

/// `OZ_*` variables for setup and teardown commands.
fn oz_script_env<'a>(workspace: &'a Path, task_id: &'a str) -> [(&'static str, &'a OsStr); 3] {
    [
        ("OZ_WORKSPACE_ROOT", workspace.as_os_str()),
        ("OZ_WORKER_BACKEND", OsStr::new(BACKEND_NAME)),
        ("OZ_RUN_ID", OsStr::new(task_id)),
    ]
}

/// Points a third-party harness's state at the workspace so concurrent tasks do not
/// share it.
fn harness_env(harness: Option<&str>, workspace: &Path) -> Option<(String, OsString)> {
    let (name, dir) = match harness.map(str::trim)? {
        "claude" => ("CLAUDE_CONFIG_DIR", ".claude"),
        "codex" => ("CODEX_HOME", ".codex"),
        _ => return None,
    };
    Some((name.to_owned(), workspace.join(dir).into_os_string()))
}

/// Accepts only a single, safe path component.
fn validate_task_id(task_id: &str) -> Result<(), &'static str> {
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

fn create_private_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Removes a directory tree; `Ok(false)` when it was already gone. A symlink is removed
/// itself, never followed.
fn remove_dir_all_if_exists(path: &Path) -> io::Result<bool> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
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

fn cancelled(exit_code: i32) -> TaskFailure {
    TaskFailure::new(FailureReason::TaskCancelled, CANCELLED_ERROR).with_exit_code(exit_code)
}

const SHELL: &str = "/bin/sh";

fn shell_command(script: &str, dir: &Path) -> Command {
    let mut command = Command::new(SHELL);
    command.arg("-c").arg(script).current_dir(dir);
    command
}

/// Where task processes read and write. Like the reference, output goes to the node's own
/// stdout/stderr; every task process is wired here so capturing output is one change.
fn attach_task_stdio(command: &mut Command) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
}

/// How a task process ended.
#[derive(Debug)]
enum ProcessEnd {
    Exited(ExitStatus),
    /// `stop` fired and the group was terminated; the leader's status if it was reaped.
    Stopped(Option<ExitStatus>),
    SpawnFailed(io::Error),
    WaitFailed(io::Error),
}

/// Runs `command` as the leader of a new process group. When `stop` completes first the
/// group gets SIGTERM, then SIGKILL after `grace`. Once the leader has exited, the group
/// is SIGKILLed so no descendant survives; dropping the returned future does the same.
async fn run_in_process_group(
    mut command: Command,
    stop: impl Future<Output = ()>,
    grace: Duration,
) -> ProcessEnd {
    attach_task_stdio(&mut command);
    command.process_group(0).kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return ProcessEnd::SpawnFailed(error),
    };
    let mut group = ProcessGroup::led_by(&child);
    let end = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => ProcessEnd::Exited(status),
            Err(error) => ProcessEnd::WaitFailed(error),
        },
        () = stop => ProcessEnd::Stopped(group.terminate(&mut child, grace).await),
    };
    group.kill_remaining();
    end
}

/// A process group led by a spawned child; SIGKILLed on drop unless already killed.
struct ProcessGroup(Option<Pid>);

impl ProcessGroup {
    fn led_by(child: &Child) -> Self {
        Self(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw),
        )
    }

    fn signal(&self, signal: Signal) {
        let Some(group) = self.0 else { return };
        match killpg(group, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => tracing::warn!(%group, %signal, %error, "failed to signal process group"),
        }
    }

    /// SIGTERM, wait up to `grace` for the leader, then SIGKILL.
    async fn terminate(&self, child: &mut Child, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
            return status.ok();
        }
        tracing::warn!(?grace, "process group ignored SIGTERM; sending SIGKILL");
        self.signal(Signal::SIGKILL);
        child.wait().await.ok()
    }

    fn kill_remaining(&mut self) {
        self.signal(Signal::SIGKILL);
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

/// Outcome of a step that did not succeed.
enum StepError {
    Cancelled {
        exit_code: i32,
    },
    /// `text` is Go's wording of the error (`exit status 3`, `signal: killed`, …).
    Failed {
        text: String,
        exit_code: i32,
    },
}

/// Maps how a process ended to the step result. Like the reference, a failure while the
/// task is being cancelled counts as a cancellation.
fn interpret(end: ProcessEnd, cancel_requested: bool, program: &Path) -> Result<(), StepError> {
    match end {
        ProcessEnd::Exited(status) if status.success() => Ok(()),
        ProcessEnd::Exited(status) if cancel_requested => Err(StepError::Cancelled {
            exit_code: exit_code(status),
        }),
        ProcessEnd::Stopped(status) => Err(StepError::Cancelled {
            exit_code: status.map_or(0, exit_code),
        }),
        _ if cancel_requested => Err(StepError::Cancelled { exit_code: 0 }),
        ProcessEnd::Exited(status) => Err(StepError::Failed {
            text: go_exit_text(status),
            exit_code: exit_code(status),
        }),
        ProcessEnd::SpawnFailed(error) => Err(StepError::Failed {
            text: format!("fork/exec {}: {}", program.display(), go_errno_text(&error)),
            exit_code: 0,
        }),
        ProcessEnd::WaitFailed(error) => Err(StepError::Failed {
            text: format!("wait: {}", go_errno_text(&error)),
            exit_code: 0,
        }),
    }
}

/// The exit status normalised to 128+signal for signal deaths.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(0)
}

/// Go's `ProcessState.String()`: `exit status 3`, `signal: terminated`,
/// `signal: segmentation fault (core dumped)`.
fn go_exit_text(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(signal) => {
            let mut text = format!("signal: {}", go_signal_name(signal));
            if status.core_dumped() {
                text.push_str(" (core dumped)");
            }
            text
        }
        None => status.to_string(),
    }
}

/// Go's names of the Linux signals (`syscall.Signal.String()`).
fn go_signal_name(signal: i32) -> Cow<'static, str> {
    let name = match signal {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGSTKFLT => "stack fault",
        libc::SIGCHLD => "child exited",
        libc::SIGCONT => "continued",
        libc::SIGSTOP => "stopped (signal)",
        libc::SIGTSTP => "stopped",
        libc::SIGTTIN => "stopped (tty input)",
        libc::SIGTTOU => "stopped (tty output)",
        libc::SIGURG => "urgent I/O condition",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        libc::SIGVTALRM => "virtual timer expired",
        libc::SIGPROF => "profiling timer expired",
        libc::SIGWINCH => "window changed",
        libc::SIGIO => "I/O possible",
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGPWR => "power failure",
        libc::SIGSYS => "bad system call",
        other => return Cow::Owned(format!("signal {other}")),
    };
    Cow::Borrowed(name)
}

/// Go's text for an OS error (`no such file or directory`), else the error's own text.
fn go_errno_text(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => {
            let description = Errno::from_raw(code).desc();
            let mut chars = description.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => description.to_owned(),
            }
        }
        None => error.to_string(),
    }
}

/// Go's `*PathError` text: `<op> <path>: <errno text>`.
fn go_path_error(op: &str, path: &Path, error: &io::Error) -> String {
    format!("{op} {}: {}", path.display(), go_errno_text(error))
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
    fn exit_texts_follow_go() {
        let exited = ExitStatus::from_raw(3 << 8);
        assert_eq!(go_exit_text(exited), "exit status 3");
        assert_eq!(exit_code(exited), 3);

        let exited_143 = ExitStatus::from_raw(143 << 8);
        assert_eq!(go_exit_text(exited_143), "exit status 143");
        assert_eq!(exit_code(exited_143), 143);

        let terminated = ExitStatus::from_raw(libc::SIGTERM);
        assert_eq!(go_exit_text(terminated), "signal: terminated");
        assert_eq!(exit_code(terminated), 143);

        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(go_exit_text(killed), "signal: killed");
        assert_eq!(exit_code(killed), 137);

        let interrupted = ExitStatus::from_raw(libc::SIGINT);
        assert_eq!(go_exit_text(interrupted), "signal: interrupt");
        assert_eq!(exit_code(interrupted), 130);

        let core = ExitStatus::from_raw(libc::SIGSEGV | 0x80);
        assert_eq!(
            go_exit_text(core),
            "signal: segmentation fault (core dumped)"
        );
        assert_eq!(exit_code(core), 139);

        assert_eq!(go_signal_name(40), "signal 40");
    }

    #[test]
    fn step_interpretation() {
        let oz = Path::new("/opt/oz");
        assert!(interpret(ProcessEnd::Exited(ExitStatus::from_raw(0)), true, oz).is_ok());
        assert!(matches!(
            interpret(ProcessEnd::Exited(ExitStatus::from_raw(2 << 8)), false, oz),
            Err(StepError::Failed { text, exit_code: 2 }) if text == "exit status 2"
        ));
        assert!(matches!(
            interpret(ProcessEnd::Exited(ExitStatus::from_raw(2 << 8)), true, oz),
            Err(StepError::Cancelled { exit_code: 2 })
        ));
        assert!(matches!(
            interpret(ProcessEnd::Stopped(None), false, oz),
            Err(StepError::Cancelled { exit_code: 0 })
        ));
        let missing = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(matches!(
            interpret(ProcessEnd::SpawnFailed(missing), false, oz),
            Err(StepError::Failed { text, exit_code: 0 })
                if text == "fork/exec /opt/oz: no such file or directory"
        ));
        let missing = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(matches!(
            interpret(ProcessEnd::SpawnFailed(missing), true, oz),
            Err(StepError::Cancelled { exit_code: 0 })
        ));
    }

    #[test]
    fn go_error_texts() {
        let error = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(
            go_path_error("mkdir", Path::new("/x"), &error),
            "mkdir /x: permission denied"
        );
        let custom = io::Error::other("boom");
        assert_eq!(go_errno_text(&custom), "boom");
    }

    #[test]
    fn harness_state_dirs() {
        let ws = Path::new("/w/t1");
        assert_eq!(
            harness_env(Some("claude"), ws),
            Some(("CLAUDE_CONFIG_DIR".into(), "/w/t1/.claude".into()))
        );
        assert_eq!(
            harness_env(Some(" codex "), ws),
            Some(("CODEX_HOME".into(), "/w/t1/.codex".into()))
        );
        assert_eq!(harness_env(Some("gemini"), ws), None);
        assert_eq!(harness_env(Some("oz"), ws), None);
        assert_eq!(harness_env(None, ws), None);
    }

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

    #[test]
    fn config_debug_hides_environment_values() {
        let config = DirectConfig {
            environment: vec![("API_KEY".into(), "sk-secret".into())],
            ..DirectConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("API_KEY"), "{shown}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert_eq!(config.cancel_grace, DEFAULT_CANCEL_GRACE);
        assert!(config.cleanup);
    }
}
