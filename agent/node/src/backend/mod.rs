//! Task execution backends. Each backend runs one task to its end and reports how it
//! ended; the node agent turns that into an outcome for the gateway.
//!
//! - [`TaskBackend`] is what the node drives; a backend implements it in its own module
//!   ([`direct`], [`docker`]) and plugs in here through [`from_settings`] only, so a new
//!   backend touches neither the node nor the other backends.
//! - What every backend shares lives here once: the task description ([`TaskRun`]), the
//!   failure of a cancelled task ([`cancelled`]), the operator/task environment merge
//!   ([`merged_env`]) and the default workspace root ([`workspace_root_or_default`]).
//!
//! Configuration comes from `ozfleet-worker-config`, the reference worker's flag and YAML
//! schema: its per-backend settings ([`DirectSettings`], [`DockerSettings`], and
//! `KubernetesSettings` for the next backend) are the backends' own settings, not copies,
//! so a key added to the file reaches its backend without a second type to keep in step.
//! The dependency points from the backends to the schema, never back: the gateway reads
//! the same schema without pulling in any backend.

pub mod direct;
pub mod docker;
pub mod kubernetes;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::future::BoxFuture;
use ozfleet_proto::oz::{FailureReason, InstanceShape, SidecarMount};
use ozfleet_proto::v1::BackendKind;
use ozfleet_worker_config::{BackendName, DEFAULT_WORKSPACE_ROOT, MergedConfig};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

pub use direct::{DirectBackend, DirectConfig};
pub use docker::{DockerBackend, DockerConfig};
pub use kubernetes::{KubernetesBackend, KubernetesConfig};
pub use ozfleet_worker_config::{
    DirectSettings, DockerSettings, ImagePullPolicy, KubernetesSettings,
};

/// A task environment in order, later entries winning. Values are credentials
/// (`WARP_API_KEY`, `GITHUB_ACCESS_TOKEN`, …): they are exposed only where a process or
/// container environment is set, and `Debug` shows names only.
pub type TaskEnv = Vec<(String, SecretString)>;

/// Builds a [`TaskEnv`] from plain pairs (configuration and tests).
pub fn secret_env<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> TaskEnv
where
    N: Into<String>,
    V: Into<String>,
{
    pairs
        .into_iter()
        .map(|(name, value)| (name.into(), SecretString::from(value.into())))
        .collect()
}

/// Everything a backend needs to run one task.
#[derive(Debug, Clone)]
pub struct TaskRun {
    pub task_id: String,
    pub execution_id: String,
    /// `oz` argv after the program name (spec §3.1), e.g. `["agent", "run", …]`.
    pub base_args: Vec<String>,
    /// Common task environment (spec §3.2), in order; later entries win.
    pub env: TaskEnv,
    /// Harness type from the task's agent config, trimmed (`claude`, `codex`, …).
    pub harness: Option<String>,
    /// Task image (spec §3.3): the assignment's `docker_image`, else `ubuntu:22.04`.
    pub image: String,
    /// Sidecars in order (spec §3.4): `sidecar_image` at `/agent`, then
    /// `additional_sidecars`. Not yet validated.
    pub sidecars: Vec<SidecarMount>,
    /// Requested size; non-positive axes mean unset.
    pub instance_shape: Option<InstanceShape>,
}

/// A task that did not run to success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct TaskFailure {
    pub reason: FailureReason,
    /// Normalised exit status (128+signal for signal deaths); 0 when none was observed.
    pub exit_code: i32,
    /// Backend error text (no secrets), e.g. `oz agent exited with error: exit status 3`.
    pub error: String,
}

impl TaskFailure {
    pub fn new(reason: FailureReason, error: impl Into<String>) -> Self {
        Self {
            reason,
            exit_code: 0,
            error: error.into(),
        }
    }

    pub fn with_exit_code(mut self, exit_code: i32) -> Self {
        self.exit_code = exit_code;
        self
    }
}

/// Error text of a cancelled task (Go's `context.Canceled`, as the reference reports it).
pub const CANCELLED_ERROR: &str = "context canceled";

/// The failure of a task stopped because its cancellation fired; `exit_code` is the
/// stopped process's status when one was observed, else 0.
pub fn cancelled(exit_code: i32) -> TaskFailure {
    TaskFailure::new(FailureReason::TaskCancelled, CANCELLED_ERROR).with_exit_code(exit_code)
}

/// The task's environment followed by the operator's (`environment` + `-e`), duplicates
/// removed with the last value winning at the first name's position (the reference's
/// `mergeEnvVars`): the operator overrides what Oz sends.
pub fn merged_env(task: &TaskEnv, operator: &TaskEnv) -> TaskEnv {
    crate::task_env::dedupe_last_wins(task.iter().chain(operator).cloned().collect())
}

/// The configured workspace root, or [`DEFAULT_WORKSPACE_ROOT`] when none is set.
pub fn workspace_root_or_default(configured: &Path) -> PathBuf {
    if configured.as_os_str().is_empty() {
        PathBuf::from(DEFAULT_WORKSPACE_ROOT)
    } else {
        configured.to_path_buf()
    }
}

/// A task a backend found at startup, left by an earlier run of this node agent:
/// still running, or finished while the agent was down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredTask {
    pub task_id: String,
    pub execution_id: String,
    /// The backend's own reference to it (a container id for Docker).
    pub handle: String,
}

/// A way of running tasks. The node holds one as `Arc<dyn TaskBackend>`; the futures are
/// boxed so the trait stays object safe. Only [`kind`](TaskBackend::kind) and
/// [`execute`](TaskBackend::execute) are required: recovering tasks across restarts and
/// releasing resources at shutdown are capabilities a backend may lack.
pub trait TaskBackend: Send + Sync + 'static {
    /// What the node announces to the gateway.
    fn kind(&self) -> BackendKind;

    /// Runs the task to its end. When `cancel` fires the task is stopped (gracefully,
    /// then forcibly after the backend's grace period) and a [`cancelled`] failure is
    /// returned.
    fn execute(
        &self,
        task: TaskRun,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>>;

    /// Tasks an earlier run of this node agent left behind, to be followed with
    /// [`resume`](TaskBackend::resume). None by default: host processes, for one, do not
    /// outlive their agent.
    fn recover(&self) -> BoxFuture<'_, Vec<RecoveredTask>> {
        Box::pin(async { Vec::new() })
    }

    /// Waits for a recovered task to end, exactly like [`execute`](TaskBackend::execute)
    /// would have. A backend that recovers nothing cannot resume anything.
    fn resume(
        &self,
        task: RecoveredTask,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>> {
        let _ = (task, cancel);
        let error = format!("the {} backend cannot resume tasks", kind_name(self.kind()));
        Box::pin(async move { Err(TaskFailure::new(FailureReason::Unknown, error)) })
    }

    /// Whether tasks keep running while the agent is down (Kubernetes Jobs): the node then
    /// does not cancel them at shutdown but leaves them to be recovered by its next run.
    fn preserves_tasks_on_shutdown(&self) -> bool {
        false
    }

    /// Releases backend resources when the node stops (after its tasks have ended),
    /// bounded by `timeout`. Nothing to release by default.
    fn shutdown(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        let _ = timeout;
        Box::pin(async {})
    }
}

/// The lower-case name of a backend kind, as the `--backend` flag spells it.
pub fn kind_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Direct => "direct",
        BackendKind::Docker => "docker",
        BackendKind::Kubernetes => "kubernetes",
        BackendKind::Unspecified => "unspecified",
    }
}

/// What building a backend needs besides the merged worker configuration.
#[derive(Debug, Clone)]
pub struct BackendContext {
    /// This node's stable id (Docker labels its containers with it, Kubernetes its Jobs).
    pub node_id: String,
    /// SIGTERM → SIGKILL grace for a cancelled task (process group or container).
    pub cancel_grace: Duration,
    /// The task shim for Direct tasks (see [`DirectConfig::task_shim`]).
    pub task_shim: Option<std::path::PathBuf>,
}

/// Builds the backend the merged flags and config file select. ozfleet's own overrides
/// (`--workspace-root`, `--oz-path`, `--image-pull-policy`, `--docker-network`) are applied
/// by the caller to `config.direct` / `config.docker` beforehand.
pub async fn from_settings(
    config: MergedConfig,
    context: BackendContext,
) -> anyhow::Result<Arc<dyn TaskBackend>> {
    let environment = secret_env(config.env);
    match config.backend {
        BackendName::Direct => {
            if !config.docker.volumes.is_empty() {
                tracing::warn!("--volumes applies to the Docker backend only; ignoring it");
            }
            let direct = DirectConfig {
                settings: config.direct,
                environment,
                cleanup: config.cleanup,
                cancel_grace: context.cancel_grace,
                task_shim: context.task_shim.clone(),
            };
            // Resolving the oz CLI and creating the workspace root touch the filesystem.
            let backend = tokio::task::spawn_blocking(move || DirectBackend::new(direct))
                .await
                .context("creating the direct backend did not finish")?
                .context("Failed to create worker")?;
            Ok(Arc::new(backend))
        }
        BackendName::Docker => {
            let docker = DockerConfig {
                node_id: context.node_id,
                settings: config.docker,
                environment,
                cleanup: config.cleanup,
                stop_grace: context.cancel_grace,
            };
            let backend = DockerBackend::new(docker)
                .await
                .context("Failed to create worker")?;
            Ok(Arc::new(backend))
        }
        BackendName::Kubernetes => {
            let settings = config
                .kubernetes
                .context("the kubernetes backend was selected without its settings")?;
            if !config.docker.volumes.is_empty() {
                tracing::warn!("--volumes applies to the Docker backend only; ignoring it");
            }
            let kubernetes = KubernetesConfig {
                worker_id: config
                    .worker_id
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(|| context.node_id.clone()),
                node_id: context.node_id,
                settings,
                environment,
                cleanup: config.cleanup,
                cancel_grace: context.cancel_grace,
            };
            let backend = KubernetesBackend::new(kubernetes)
                .await
                .context("Failed to create worker")?;
            Ok(Arc::new(backend))
        }
        other => bail!(
            "the {} backend is not available in this ozfleet build yet; use --backend direct, docker or kubernetes",
            other.as_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    fn exposed(env: &TaskEnv) -> Vec<(&str, &str)> {
        env.iter()
            .map(|(name, value)| (name.as_str(), value.expose_secret()))
            .collect()
    }

    #[test]
    fn operator_environment_wins_at_the_task_position() {
        let task = secret_env([("A", "task"), ("B", "task")]);
        let operator = secret_env([("C", "op"), ("A", "op")]);
        assert_eq!(
            exposed(&merged_env(&task, &operator)),
            [("A", "op"), ("B", "task"), ("C", "op")]
        );
    }

    #[test]
    fn task_debug_shows_env_names_only() {
        let task = TaskRun {
            task_id: "run-1".into(),
            execution_id: "exec-1".into(),
            base_args: Vec::new(),
            env: secret_env([("WARP_API_KEY", "sk-live-secret")]),
            harness: None,
            image: String::new(),
            sidecars: Vec::new(),
            instance_shape: None,
        };
        let shown = format!("{task:?}");
        assert!(shown.contains("WARP_API_KEY"), "{shown}");
        assert!(!shown.contains("sk-live-secret"), "{shown}");
    }

    #[test]
    fn empty_workspace_root_means_the_default() {
        assert_eq!(
            workspace_root_or_default(Path::new("")),
            Path::new(DEFAULT_WORKSPACE_ROOT)
        );
        assert_eq!(workspace_root_or_default(Path::new("/w")), Path::new("/w"));
    }

    #[tokio::test]
    async fn unimplemented_backends_are_refused_by_name() {
        let mut config = ozfleet_worker_config::merge(
            ozfleet_worker_config::WorkerFlags {
                backend: Some("direct".into()),
                ..Default::default()
            },
            None,
            &|_| None,
        )
        .unwrap();
        config.backend = BackendName::Command;
        let context = BackendContext {
            node_id: "n".into(),
            cancel_grace: Duration::from_secs(1),
            task_shim: None,
        };
        let error = from_settings(config, context).await.err().unwrap();
        assert!(
            error
                .to_string()
                .contains("the command backend is not available"),
            "{error}"
        );
    }
}
