//! Docker backend (spec §4): one container per task through the Docker Engine API.
//!
//! Behaviour follows the reference worker, with deliberate improvements:
//! - the daemon is found like the Docker CLI finds it (`DOCKER_HOST`, the default socket,
//!   `DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`) and the API version is negotiated;
//! - the task image honours `image_pull_policy` (`Always` is the reference behaviour);
//!   sidecar images are pulled only when absent (see [`sidecars`]);
//! - every task container carries labels (`dev.ozfleet.node-id`, `…task-id`,
//!   `…execution-id`, `dev.ozfleet.managed`) and a name derived from node, task and
//!   execution, so a second create for the same execution is refused by the daemon and the
//!   existing container is followed instead of starting a second copy;
//! - the container outlives its agent: dropping an `execute` future leaves it alone, and a
//!   restarted agent finds its containers with [`DockerBackend::recover`] and follows them
//!   to their end with [`DockerBackend::resume`];
//! - cancellation stops the container gracefully (SIGTERM, then the daemon's SIGKILL after
//!   `stop_grace`) instead of force-removing it at once.
//!
//! This module owns the backend: its configuration, the daemon connection and the order
//! of a task's steps. The parts live next to it: [`lifecycle`] (a container from create
//! to removal), [`spec`] (what a task container is made of), [`naming`], [`errors`],
//! [`pull`] and [`auth`] (making an image available, with the CLI's registry
//! credentials), [`reference`] (image reference parsing) and [`sidecars`] (sidecar
//! volumes).
//!
//! Task environment values are credentials: they go to the daemon only, never to a log.

mod auth;
mod errors;
mod lifecycle;
mod naming;
mod pull;
mod reference;
mod sidecars;
mod spec;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::ListContainersOptions;
use futures::future::BoxFuture;
use ozfleet_proto::oz::FailureReason;
use ozfleet_proto::v1::BackendKind;
use ozfleet_worker_config::{DockerSettings, ImagePullPolicy};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::errors::{daemon_error_text, setup_connect_error};
use self::lifecycle::Target;
pub use self::naming::container_name;
use super::{RecoveredTask, TaskBackend, TaskEnv, TaskFailure, TaskRun, cancelled};

/// Label present on everything this backend creates.
pub const LABEL_MANAGED: &str = "dev.ozfleet.managed";
/// Label naming the node whose task a container runs.
pub const LABEL_NODE_ID: &str = "dev.ozfleet.node-id";
/// Label naming the task (Oz run) a container runs.
pub const LABEL_TASK_ID: &str = "dev.ozfleet.task-id";
/// Label naming the execution of the task a container runs.
pub const LABEL_EXECUTION_ID: &str = "dev.ozfleet.execution-id";
/// Label on sidecar volumes and their helper containers naming the sidecar image.
pub const LABEL_SIDECAR_IMAGE: &str = "dev.ozfleet.sidecar-image";

/// Platforms the reference accepts.
const SUPPORTED_PLATFORMS: [&str; 2] = ["linux/amd64", "linux/arm64"];
/// The reference's daemon ping timeout.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Request timeout for calls whose response may legitimately take long (pulls, copying a
/// sidecar filesystem, a stop that waits out the grace period).
const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Configuration of the Docker backend: the file's `backend.docker` settings plus what
/// applies to every backend.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// This node's stable id; containers are labelled with it so a restarted agent finds
    /// its own containers and only those.
    pub node_id: String,
    /// `HOST:CONTAINER[:ro|rw]` binds (file `volumes` then `-v`), the task image pull
    /// policy and the container network mode (`None` = the daemon's default).
    pub settings: DockerSettings,
    /// Operator environment (`environment` + `-e`), resolved.
    pub environment: TaskEnv,
    pub cleanup: bool,
    /// Cancellation: stop (SIGTERM) with this grace, then kill.
    pub stop_grace: Duration,
}

/// Why the Docker backend could not start (texts as the reference words them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerSetupError {
    #[error("failed to create Docker client: {0}")]
    Client(String),
    #[error("failed to reach Docker daemon: {0}")]
    Unreachable(String),
    #[error("failed to get Docker version: {0}")]
    Version(String),
    #[error("unsupported Docker platform {0} (only linux/amd64 and linux/arm64 are supported)")]
    UnsupportedPlatform(String),
}

/// Runs tasks as Docker containers.
pub struct DockerBackend {
    engine: Arc<Engine>,
    config: DockerConfig,
}

/// The daemon connection and what is shared with work that outlives one call (sidecar
/// volume population runs in its own task so it is never abandoned halfway).
struct Engine {
    docker: Docker,
    /// The same connection with [`LONG_REQUEST_TIMEOUT`].
    long_requests: Docker,
    /// `<os>/<arch>` of the daemon.
    platform: String,
    pull_policy: ImagePullPolicy,
    /// Work that must outlive the call that started it (sidecar volume population, which
    /// must finish or clean up even when its task is dropped); shutdown waits for it.
    tasks: TaskTracker,
}

impl DockerBackend {
    /// Connects to the daemon like the Docker CLI, negotiates the API version and checks
    /// the daemon's platform.
    pub async fn new(config: DockerConfig) -> Result<Self, DockerSetupError> {
        let docker = Docker::connect_with_defaults().map_err(setup_connect_error)?;
        Self::with_client(docker, config).await
    }

    /// Pings, negotiates and checks the platform of the daemon behind `docker`.
    async fn with_client(docker: Docker, config: DockerConfig) -> Result<Self, DockerSetupError> {
        let within = |what: &str| format!("{what} did not answer within {PING_TIMEOUT:?}");
        tokio::time::timeout(PING_TIMEOUT, docker.ping())
            .await
            .map_err(|_| DockerSetupError::Unreachable(within("ping")))?
            .map_err(|error| DockerSetupError::Unreachable(daemon_error_text(&error)))?;
        let docker = tokio::time::timeout(PING_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| DockerSetupError::Unreachable(within("version negotiation")))?
            .map_err(|error| DockerSetupError::Unreachable(daemon_error_text(&error)))?;
        let version = tokio::time::timeout(PING_TIMEOUT, docker.version())
            .await
            .map_err(|_| DockerSetupError::Version(within("version")))?
            .map_err(|error| DockerSetupError::Version(daemon_error_text(&error)))?;
        let platform = format!(
            "{}/{}",
            version.os.as_deref().unwrap_or_default(),
            version.arch.as_deref().unwrap_or_default()
        );
        if !SUPPORTED_PLATFORMS.contains(&platform.as_str()) {
            return Err(DockerSetupError::UnsupportedPlatform(platform));
        }
        let api = docker.client_version();
        tracing::info!(
            server_version = version.version.as_deref().unwrap_or("unknown"),
            api_version = %format!("{}.{}", api.major_version, api.minor_version),
            %platform,
            node_id = %config.node_id,
            "connected to Docker daemon"
        );
        let engine = Engine {
            long_requests: docker.clone().with_timeout(LONG_REQUEST_TIMEOUT),
            docker,
            platform,
            pull_policy: config.settings.image_pull_policy,
            tasks: TaskTracker::new(),
        };
        Ok(Self {
            engine: Arc::new(engine),
            config,
        })
    }

    /// Image, sidecar volumes, container create and start, wait, outcome, cleanup.
    async fn run(&self, task: TaskRun, cancel: CancellationToken) -> Result<(), TaskFailure> {
        tracing::info!(
            task_id = %task.task_id,
            execution_id = %task.execution_id,
            image = %task.image,
            "starting task"
        );
        let sidecar_binds = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(cancelled(0)),
            prepared = self.prepare(&task) => prepared?,
        };
        if cancel.is_cancelled() {
            return Err(cancelled(0));
        }
        let target = self.create_and_start(&task, sidecar_binds).await?;
        let outcome = self.supervise(&target, &cancel).await;
        self.remove(&target).await;
        outcome
    }

    /// Containers of this node left by an earlier run of the agent, running or exited.
    /// Containers of other nodes are not listed.
    async fn find_containers(&self) -> Vec<RecoveredTask> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_NODE_ID}={}", self.config.node_id),
            ],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let containers = match self.engine.docker.list_containers(Some(options)).await {
            Ok(containers) => containers,
            Err(error) => {
                tracing::warn!(
                    error = %daemon_error_text(&error),
                    "cannot list containers to recover; none are resumed"
                );
                return Vec::new();
            }
        };
        containers
            .into_iter()
            .filter_map(|container| {
                let id = container.id?;
                let labels = container.labels.unwrap_or_default();
                let task_id = labels.get(LABEL_TASK_ID)?.clone();
                let execution_id = labels.get(LABEL_EXECUTION_ID).cloned().unwrap_or_default();
                tracing::info!(
                    task_id,
                    execution_id,
                    container = %id,
                    state = ?container.state,
                    "found container of an earlier run"
                );
                Some(RecoveredTask {
                    task_id,
                    execution_id,
                    handle: id,
                })
            })
            .collect()
    }

    /// Follows a recovered container to its end exactly like [`TaskBackend::execute`]
    /// does after starting it: same outcome, same cancellation, same cleanup. A container
    /// that already exited reports its recorded exit state; one that was created but never
    /// started is started first.
    async fn follow(
        &self,
        task: RecoveredTask,
        cancel: CancellationToken,
    ) -> Result<(), TaskFailure> {
        let target = Target {
            id: task.handle.clone(),
            task_id: &task.task_id,
            execution_id: &task.execution_id,
        };
        let info = self.inspect(&target.id).await.map_err(|error| {
            TaskFailure::new(
                FailureReason::ContainerWait,
                format!(
                    "failed to inspect container {}: {}",
                    target.id,
                    daemon_error_text(&error)
                ),
            )
        })?;
        let owner = info
            .config
            .as_ref()
            .and_then(|config| config.labels.as_ref())
            .and_then(|labels| labels.get(LABEL_NODE_ID));
        if owner != Some(&self.config.node_id) {
            return Err(TaskFailure::new(
                FailureReason::Unknown,
                format!("container {} does not belong to this node", target.id),
            ));
        }
        tracing::info!(
            task_id = %task.task_id,
            execution_id = %task.execution_id,
            container = %target.id,
            "resuming task"
        );
        self.start_if_created(&target).await?;
        let outcome = self.supervise(&target, &cancel).await;
        self.remove(&target).await;
        outcome
    }

    /// Pulls the task image and prepares the sidecar volumes, concurrently. Returns the
    /// sidecar binds.
    async fn prepare(&self, task: &TaskRun) -> Result<Vec<String>, TaskFailure> {
        let sidecar_prep = |error: String| TaskFailure::new(FailureReason::SidecarPrep, error);
        let sidecars = sidecars::validate(&task.sidecars).map_err(sidecar_prep)?;
        // Own task: population must finish (or clean up) even if this call is dropped.
        let sidecar_volumes = self
            .engine
            .tasks
            .spawn(Arc::clone(&self.engine).prepare_sidecars(sidecars, task.task_id.clone()));
        let image = self
            .engine
            .ensure_image(&task.image, self.config.settings.image_pull_policy)
            .await;
        let binds = sidecar_volumes.await;
        // The task image is checked first, as the reference does it first.
        image.map_err(|error| TaskFailure::new(FailureReason::ImagePull, error.to_string()))?;
        binds
            .map_err(|error| sidecar_prep(format!("sidecar preparation failed: {error}")))?
            .map_err(sidecar_prep)
    }
}

impl TaskBackend for DockerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Docker
    }

    /// Runs one task to its end: image, sidecar volumes, container create and start, wait,
    /// outcome, cleanup.
    ///
    /// When `cancel` fires the container is stopped (SIGTERM, SIGKILL after `stop_grace`)
    /// and a `TaskCancelled` failure (`context canceled`) is returned. Dropping the future
    /// leaves a started container running: a crashed agent could not stop it either, and a
    /// restarted one picks it up with [`TaskBackend::recover`].
    fn execute(
        &self,
        task: TaskRun,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>> {
        Box::pin(self.run(task, cancel))
    }

    /// Containers of this node left by an earlier run of the agent, running or exited.
    fn recover(&self) -> BoxFuture<'_, Vec<RecoveredTask>> {
        Box::pin(self.find_containers())
    }

    fn resume(
        &self,
        task: RecoveredTask,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>> {
        Box::pin(self.follow(task, cancel))
    }

    /// Containers keep running while the agent is down (a restart or an upgrade of the
    /// agent must not cut tasks short); the next run of the agent re-adopts them.
    fn preserves_tasks_on_shutdown(&self) -> bool {
        true
    }

    /// Waits (bounded) for sidecar volume fills still running. No container is stopped:
    /// containers left running are recovered by the next run of the agent. The daemon connection is closed when the
    /// backend is dropped.
    fn shutdown(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.engine.tasks.close();
            if tokio::time::timeout(timeout, self.engine.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    ?timeout,
                    "sidecar volume work did not finish before shutdown"
                );
            }
            tracing::debug!("docker backend shut down");
        })
    }
}

#[cfg(test)]
mod tests {
    use bollard::errors::Error as DockerError;
    use tokio::task::JoinSet;

    use super::*;

    #[test]
    fn setup_errors_read_like_the_reference() {
        assert_eq!(
            DockerSetupError::UnsupportedPlatform("windows/amd64".into()).to_string(),
            "unsupported Docker platform windows/amd64 (only linux/amd64 and linux/arm64 are supported)"
        );
    }

    fn test_config() -> DockerConfig {
        DockerConfig {
            node_id: "n".into(),
            settings: DockerSettings {
                volumes: vec![],
                image_pull_policy: ImagePullPolicy::IfNotPresent,
                network_mode: None,
            },
            environment: vec![],
            cleanup: true,
            stop_grace: Duration::from_secs(10),
        }
    }

    fn unix_client(socket: &std::path::Path) -> Result<Docker, DockerError> {
        Docker::connect_with_unix(
            &socket.display().to_string(),
            5,
            bollard::API_DEFAULT_VERSION,
        )
    }

    #[tokio::test]
    async fn an_absent_daemon_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("no.sock");
        let error = setup_connect_error(unix_client(&socket).expect_err("no socket"));
        assert_eq!(
            error.to_string(),
            format!(
                "failed to reach Docker daemon: Cannot connect to the Docker daemon at unix://{}. Is the docker daemon running?",
                socket.display()
            )
        );

        // A socket nobody listens on any more: the ping fails.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let error = DockerBackend::with_client(unix_client(&socket).unwrap(), test_config())
            .await
            .err()
            .expect("no daemon");
        assert!(
            error
                .to_string()
                .starts_with("failed to reach Docker daemon: "),
            "{error}"
        );
    }

    /// A daemon that answers every request with HTTP 200 and `body` (enough for ping and
    /// version), serving until the returned set is dropped.
    fn fake_daemon(socket: &std::path::Path, body: &'static str) -> JoinSet<()> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let mut daemon = JoinSet::new();
        daemon.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                connections.spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    loop {
                        let Ok(read) = stream.read(&mut buffer).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        request.extend_from_slice(&buffer[..read]);
                        if request.windows(4).any(|window| window == b"\r\n\r\n") {
                            request.clear();
                            let response = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nApi-Version: 1.41\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if stream.write_all(response.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        daemon
    }

    #[tokio::test]
    async fn only_linux_amd64_and_arm64_daemons_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let windows = dir.path().join("windows.sock");
        let _windows_daemon = fake_daemon(
            &windows,
            r#"{"Os":"windows","Arch":"amd64","ApiVersion":"1.41","Version":"20.10.24"}"#,
        );
        let error = DockerBackend::with_client(unix_client(&windows).unwrap(), test_config())
            .await
            .err()
            .expect("windows is refused");
        assert_eq!(
            error,
            DockerSetupError::UnsupportedPlatform("windows/amd64".into())
        );

        let arm = dir.path().join("arm.sock");
        let _arm_daemon = fake_daemon(
            &arm,
            r#"{"Os":"linux","Arch":"arm64","ApiVersion":"1.41","Version":"20.10.24"}"#,
        );
        let backend = DockerBackend::with_client(unix_client(&arm).unwrap(), test_config())
            .await
            .expect("linux/arm64 is accepted");
        assert_eq!(backend.engine.platform, "linux/arm64");
        let api = backend.engine.docker.client_version();
        assert_eq!(
            (api.major_version, api.minor_version),
            (1, 41),
            "negotiated down"
        );
    }

    #[test]
    fn config_debug_hides_environment_values() {
        let config = DockerConfig {
            environment: crate::backend::secret_env([("API_KEY", "sk-secret")]),
            ..test_config()
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("API_KEY"), "{shown}");
        assert!(!shown.contains("sk-secret"), "{shown}");
    }
}
