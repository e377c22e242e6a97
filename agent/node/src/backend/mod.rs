//! Task execution backends. Each backend runs one task to its end and reports how it
//! ended; the node agent turns that into an outcome for the gateway.

pub mod direct;
pub mod docker;

use std::time::Duration;

use ozfleet_proto::oz::{FailureReason, InstanceShape, SidecarMount};
use tokio_util::sync::CancellationToken;

pub use direct::{DirectBackend, DirectConfig};
pub use docker::{DockerBackend, DockerConfig};

/// Everything a backend needs to run one task.
#[derive(Clone)]
pub struct TaskRun {
    pub task_id: String,
    pub execution_id: String,
    /// `oz` argv after the program name (spec §3.1), e.g. `["agent", "run", …]`.
    pub base_args: Vec<String>,
    /// Common task environment (spec §3.2), in order; later entries win.
    /// Holds credentials: never log values.
    pub env: Vec<(String, String)>,
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

impl std::fmt::Debug for TaskRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRun")
            .field("task_id", &self.task_id)
            .field("execution_id", &self.execution_id)
            .field("base_args", &self.base_args)
            .field("env", &env_names(&self.env))
            .field("harness", &self.harness)
            .field("image", &self.image)
            .field("sidecars", &self.sidecars)
            .field("instance_shape", &self.instance_shape)
            .finish()
    }
}

/// The names of an environment, for `Debug` output: values may be credentials.
pub(crate) fn env_names(env: &[(String, String)]) -> Vec<&str> {
    env.iter().map(|(name, _)| name.as_str()).collect()
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

/// A task a backend found at startup, left by an earlier run of this node agent:
/// still running, or finished while the agent was down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredTask {
    pub task_id: String,
    pub execution_id: String,
    /// The backend's own reference to it (a container id for Docker).
    pub handle: String,
}

/// The configured backend of this node.
pub enum Backend {
    Direct(DirectBackend),
    Docker(DockerBackend),
}

impl Backend {
    /// Runs the task to its end. When `cancel` fires the task is stopped (gracefully,
    /// then forcibly after the backend's grace period) and a `TaskCancelled` failure is
    /// returned.
    pub async fn execute(
        &self,
        task: TaskRun,
        cancel: CancellationToken,
    ) -> Result<(), TaskFailure> {
        match self {
            Self::Direct(backend) => backend.execute(task, cancel).await,
            Self::Docker(backend) => backend.execute(task, cancel).await,
        }
    }

    /// Tasks an earlier run of this node agent left behind, to be resumed with
    /// [`Backend::resume`]. Host processes (Direct) do not outlive their agent.
    pub async fn recover(&self) -> Vec<RecoveredTask> {
        match self {
            Self::Direct(_) => Vec::new(),
            Self::Docker(backend) => backend.recover().await,
        }
    }

    /// Waits for a recovered task to end, exactly like [`Backend::execute`] would have.
    pub async fn resume(
        &self,
        task: RecoveredTask,
        cancel: CancellationToken,
    ) -> Result<(), TaskFailure> {
        match self {
            Self::Direct(_) => Err(TaskFailure::new(
                FailureReason::Unknown,
                "the direct backend cannot resume tasks",
            )),
            Self::Docker(backend) => backend.resume(task, cancel).await,
        }
    }

    /// Releases backend resources when the node stops (after its tasks have ended).
    pub async fn shutdown(&self, timeout: Duration) {
        match self {
            Self::Direct(backend) => backend.shutdown(timeout).await,
            Self::Docker(backend) => backend.shutdown(timeout).await,
        }
    }

    pub fn kind(&self) -> ozfleet_proto::v1::BackendKind {
        match self {
            Self::Direct(_) => ozfleet_proto::v1::BackendKind::Direct,
            Self::Docker(_) => ozfleet_proto::v1::BackendKind::Docker,
        }
    }
}
