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
//! Task environment values are credentials: they go to the daemon only, never to a log.

mod auth;
mod images;
mod reference;
mod sidecars;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use futures::StreamExt as _;
use ozfleet_proto::oz::{FailureReason, InstanceShape};
use ozfleet_worker_config::ImagePullPolicy;
use tokio_util::sync::CancellationToken;

use super::{RecoveredTask, TaskFailure, TaskRun};
use crate::task_env::dedupe_last_wins;

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

/// The agent entrypoint inside the `/agent` sidecar; the base args follow it.
const ENTRYPOINT: &str = "/agent/entrypoint.sh";
const WORKING_DIR: &str = "/workspace";
/// Platforms the reference accepts.
const SUPPORTED_PLATFORMS: [&str; 2] = ["linux/amd64", "linux/arm64"];
/// The reference's daemon ping timeout.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Fresh budget for removing a container, whatever happened before (reference value).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request timeout for calls whose response may legitimately take long (pulls, copying a
/// sidecar filesystem, a stop that waits out the grace period).
const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Container output lines logged when a task fails.
const LOG_TAIL_LINES: &str = "100";
/// How often a broken wait is retried while the daemon cannot be asked.
const WAIT_RETRIES: u32 = 5;
const WAIT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Error text of a cancelled task (Go's `context.Canceled`).
const CANCELLED_ERROR: &str = "context canceled";
/// Docker's limit is not documented; this keeps names readable and well within it.
const NAME_PART_MAX: usize = 40;

/// Configuration of the Docker backend.
#[derive(Clone)]
pub struct DockerConfig {
    /// This node's stable id; containers are labelled with it so a restarted agent finds
    /// its own containers and only those.
    pub node_id: String,
    /// `HOST:CONTAINER[:ro|rw]` binds: file `volumes` then `-v`.
    pub volumes: Vec<String>,
    /// Operator environment (`environment` + `-e`), resolved. Holds secrets: never logged.
    pub environment: Vec<(String, String)>,
    pub cleanup: bool,
    pub image_pull_policy: ImagePullPolicy,
    /// Container network mode; `None` = the daemon's default.
    pub network_mode: Option<String>,
    /// Cancellation: stop (SIGTERM) with this grace, then kill.
    pub stop_grace: Duration,
}

impl std::fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerConfig")
            .field("node_id", &self.node_id)
            .field("volumes", &self.volumes)
            .field("environment", &super::env_names(&self.environment))
            .field("cleanup", &self.cleanup)
            .field("image_pull_policy", &self.image_pull_policy)
            .field("network_mode", &self.network_mode)
            .field("stop_grace", &self.stop_grace)
            .finish()
    }
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
}

/// A task container and the ids it runs for (for logs).
struct Target<'a> {
    id: String,
    task_id: &'a str,
    execution_id: &'a str,
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
            pull_policy: config.image_pull_policy,
        };
        Ok(Self {
            engine: Arc::new(engine),
            config,
        })
    }

    /// Runs one task to its end: image, sidecar volumes, container create and start, wait,
    /// outcome, cleanup.
    ///
    /// When `cancel` fires the container is stopped (SIGTERM, SIGKILL after `stop_grace`)
    /// and a `TaskCancelled` failure (`context canceled`) is returned. Dropping the future
    /// leaves a started container running: a crashed agent could not stop it either, and a
    /// restarted one picks it up with [`DockerBackend::recover`].
    pub async fn execute(
        &self,
        task: TaskRun,
        cancel: CancellationToken,
    ) -> Result<(), TaskFailure> {
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

        let name = container_name(&self.config.node_id, &task.task_id, &task.execution_id);
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let body = self.container_body(&task, sidecar_binds);
        let target = match self
            .engine
            .docker
            .create_container(Some(options), body)
            .await
        {
            Ok(created) => {
                for warning in created.warnings.iter().filter(|w| !w.is_empty()) {
                    tracing::debug!(task_id = %task.task_id, warning, "container create warning");
                }
                let target = Target {
                    id: created.id,
                    task_id: &task.task_id,
                    execution_id: &task.execution_id,
                };
                if let Err(error) = self.engine.docker.start_container(&target.id, None).await {
                    self.remove(&target).await;
                    return Err(TaskFailure::new(
                        FailureReason::ContainerStart,
                        format!("failed to start container: {}", daemon_error_text(&error)),
                    ));
                }
                tracing::info!(
                    task_id = %task.task_id,
                    execution_id = %task.execution_id,
                    container = %target.id,
                    name,
                    "container started"
                );
                target
            }
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                // This execution already has a container (a duplicate assignment, or an
                // agent that stopped between create and start): follow that one.
                tracing::warn!(
                    task_id = %task.task_id,
                    execution_id = %task.execution_id,
                    name,
                    "a container for this execution already exists; following it instead of starting another"
                );
                let target = Target {
                    id: name,
                    task_id: &task.task_id,
                    execution_id: &task.execution_id,
                };
                self.start_if_created(&target).await?;
                target
            }
            Err(error) => {
                return Err(TaskFailure::new(
                    FailureReason::ContainerCreate,
                    format!("failed to create container: {}", daemon_error_text(&error)),
                ));
            }
        };
        let outcome = self.supervise(&target, &cancel).await;
        self.remove(&target).await;
        outcome
    }

    /// Containers of this node left by an earlier run of the agent, running or exited.
    /// Containers of other nodes are not listed.
    pub async fn recover(&self) -> Vec<RecoveredTask> {
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

    /// Follows a recovered container to its end exactly like [`DockerBackend::execute`]
    /// does after starting it: same outcome, same cancellation, same cleanup. A container
    /// that already exited reports its recorded exit state; one that was created but never
    /// started is started first.
    pub async fn resume(
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

    /// Nothing to stop: the node cancels its tasks before shutting the backend down, and
    /// containers it leaves running are meant to be recovered. The daemon connection is
    /// closed when the backend is dropped.
    pub async fn shutdown(&self, _timeout: Duration) {
        tracing::debug!("docker backend shut down");
    }

    /// Pulls the task image and prepares the sidecar volumes, concurrently. Returns the
    /// sidecar binds.
    async fn prepare(&self, task: &TaskRun) -> Result<Vec<String>, TaskFailure> {
        let sidecar_prep = |error: String| TaskFailure::new(FailureReason::SidecarPrep, error);
        let sidecars = sidecars::validate(&task.sidecars).map_err(sidecar_prep)?;
        // Own task: population must finish (or clean up) even if this call is dropped.
        let sidecar_volumes =
            tokio::spawn(Arc::clone(&self.engine).prepare_sidecars(sidecars, task.task_id.clone()));
        let image = self
            .engine
            .ensure_image(&task.image, self.config.image_pull_policy)
            .await;
        let binds = sidecar_volumes.await;
        // The task image is checked first, as the reference does it first.
        image.map_err(|error| TaskFailure::new(FailureReason::ImagePull, error.to_string()))?;
        binds
            .map_err(|error| sidecar_prep(format!("sidecar preparation failed: {error}")))?
            .map_err(sidecar_prep)
    }

    fn container_body(&self, task: &TaskRun, sidecar_binds: Vec<String>) -> ContainerCreateBody {
        let env = dedupe_last_wins(
            task.env
                .iter()
                .chain(&self.config.environment)
                .cloned()
                .collect(),
        )
        .into_iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
        let cmd = std::iter::once(ENTRYPOINT.to_owned())
            .chain(task.base_args.iter().cloned())
            .collect();
        let binds = sidecar_binds
            .into_iter()
            .chain(self.config.volumes.iter().cloned())
            .collect();
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_NODE_ID.to_owned(), self.config.node_id.clone()),
            (LABEL_TASK_ID.to_owned(), task.task_id.clone()),
            (LABEL_EXECUTION_ID.to_owned(), task.execution_id.clone()),
        ]);
        let (nano_cpus, memory) = resources(task.instance_shape);
        ContainerCreateBody {
            image: Some(task.image.clone()),
            cmd: Some(cmd),
            working_dir: Some(WORKING_DIR.to_owned()),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(HostConfig {
                binds: Some(binds),
                nano_cpus,
                memory,
                memory_swap: memory,
                network_mode: self.config.network_mode.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Starts a container that was created but never started (the agent stopped in
    /// between); others are left as they are.
    async fn start_if_created(&self, target: &Target<'_>) -> Result<(), TaskFailure> {
        let info = self.inspect(&target.id).await.map_err(|error| {
            TaskFailure::new(
                FailureReason::ContainerStart,
                format!(
                    "failed to inspect container {}: {}",
                    target.id,
                    daemon_error_text(&error)
                ),
            )
        })?;
        if status(&info) != Some(ContainerStateStatusEnum::CREATED) {
            return Ok(());
        }
        tracing::info!(task_id = target.task_id, container = %target.id, "starting created container");
        self.engine
            .docker
            .start_container(&target.id, None)
            .await
            .map_err(|error| {
                TaskFailure::new(
                    FailureReason::ContainerStart,
                    format!("failed to start container: {}", daemon_error_text(&error)),
                )
            })
    }

    /// Waits for the container to exit, or stops it when `cancel` fires, and classifies
    /// the outcome (spec §4.2 steps 7–9).
    async fn supervise(
        &self,
        target: &Target<'_>,
        cancel: &CancellationToken,
    ) -> Result<(), TaskFailure> {
        let exit_code = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(self.stop(target).await),
            exit = self.wait_for_exit(&target.id) => exit?,
        };
        self.log_output(target, exit_code).await;
        if exit_code == 0 {
            tracing::info!(
                task_id = target.task_id,
                execution_id = target.execution_id,
                "container exited successfully"
            );
            return Ok(());
        }
        // A container removed meanwhile (by a duplicate execute following the same
        // container) reads as not OOM-killed.
        let oom_killed = self.inspect(&target.id).await.ok().is_some_and(|info| {
            info.state
                .and_then(|state| state.oom_killed)
                .unwrap_or(false)
        });
        let reason = if oom_killed {
            FailureReason::ContainerOom
        } else {
            FailureReason::ContainerExit
        };
        Err(TaskFailure::new(
            reason,
            format!("container exited with non-zero status: {exit_code}"),
        )
        .with_exit_code(exit_code))
    }

    /// The container's exit code once it is not running. A broken wait (connection
    /// dropped, daemon restarted) is retried as long as the container still runs.
    async fn wait_for_exit(&self, id: &str) -> Result<i32, TaskFailure> {
        let mut unanswered = 0;
        loop {
            let error = match self.engine.docker.wait_container(id, None).next().await {
                Some(Ok(response)) => return Ok(exit_code_i32(response.status_code)),
                // bollard reports a non-zero exit as an error.
                Some(Err(DockerError::DockerContainerWaitError { code, .. })) => {
                    return Ok(exit_code_i32(code));
                }
                Some(Err(error)) => daemon_error_text(&error),
                None => "the daemon closed the wait without a status".to_owned(),
            };
            match self.inspect(id).await {
                Ok(info) if !is_running(&info) => {
                    let code = info.state.and_then(|state| state.exit_code).unwrap_or(0);
                    return Ok(exit_code_i32(code));
                }
                Ok(_) => {
                    tracing::warn!(container = id, %error, "wait for container broke; waiting again");
                    unanswered = 0;
                }
                Err(inspect_error) => {
                    unanswered += 1;
                    // A container that is gone will not come back: no point in retrying.
                    if is_not_found(&inspect_error) || unanswered >= WAIT_RETRIES {
                        return Err(TaskFailure::new(
                            FailureReason::ContainerWait,
                            format!(
                                "failed waiting for container: {error} ({})",
                                daemon_error_text(&inspect_error)
                            ),
                        ));
                    }
                }
            }
            tokio::time::sleep(WAIT_RETRY_DELAY).await;
        }
    }

    /// Stops the container (SIGTERM, then the daemon's SIGKILL after `stop_grace`) and
    /// returns the cancellation failure with its exit code when known.
    async fn stop(&self, target: &Target<'_>) -> TaskFailure {
        let grace = self.config.stop_grace;
        tracing::info!(
            task_id = target.task_id,
            execution_id = target.execution_id,
            container = %target.id,
            ?grace,
            "task cancelled; stopping container"
        );
        // The API takes whole seconds; round up so the agent gets at least its grace.
        let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let options = StopContainerOptions {
            t: Some(i32::try_from(seconds).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        // The daemon answers once the container is down, at most the grace period plus
        // the kill; the bound only guards against a daemon that never answers.
        let bound = grace + REMOVE_TIMEOUT;
        match tokio::time::timeout(
            bound,
            self.engine
                .long_requests
                .stop_container(&target.id, Some(options)),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                container = %target.id,
                error = %daemon_error_text(&error),
                "failed to stop container"
            ),
            Err(_) => {
                tracing::warn!(container = %target.id, ?bound, "stopping the container timed out")
            }
        }
        let exit_code = match self.inspect(&target.id).await {
            Ok(info) if !is_running(&info) => info
                .state
                .and_then(|state| state.exit_code)
                .map_or(0, exit_code_i32),
            _ => 0,
        };
        cancelled(exit_code)
    }

    /// Logs the tail of the container's output: at info when it failed, at debug otherwise
    /// (read only when debug logging is on).
    async fn log_output(&self, target: &Target<'_>, exit_code: i32) {
        if exit_code == 0 && !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: LOG_TAIL_LINES.to_owned(),
            ..Default::default()
        };
        let mut output = String::new();
        let mut logs = self.engine.docker.logs(&target.id, Some(options));
        while let Some(item) = logs.next().await {
            match item {
                Ok(chunk) => output.push_str(&String::from_utf8_lossy(chunk.as_ref())),
                Err(error) => {
                    tracing::warn!(
                        container = %target.id,
                        error = %daemon_error_text(&error),
                        "failed to read container logs"
                    );
                    break;
                }
            }
        }
        if exit_code == 0 {
            tracing::debug!(task_id = target.task_id, output = %output.trim_end(), "container output");
        } else {
            tracing::info!(
                task_id = target.task_id,
                exit_code,
                output = %output.trim_end(),
                "container output (last {LOG_TAIL_LINES} lines)"
            );
        }
    }

    /// Force-removes the container unless cleanup is disabled, with a fresh timeout.
    async fn remove(&self, target: &Target<'_>) {
        if !self.config.cleanup {
            tracing::info!(task_id = target.task_id, container = %target.id, "keeping container (cleanup disabled)");
            return;
        }
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        let removal = self
            .engine
            .docker
            .remove_container(&target.id, Some(options));
        match tokio::time::timeout(REMOVE_TIMEOUT, removal).await {
            Ok(Ok(())) => {
                tracing::debug!(task_id = target.task_id, container = %target.id, "container removed");
            }
            Ok(Err(error)) if is_not_found(&error) => {}
            Ok(Err(error)) => tracing::warn!(
                task_id = target.task_id,
                container = %target.id,
                error = %daemon_error_text(&error),
                "failed to remove container"
            ),
            Err(_) => tracing::warn!(
                task_id = target.task_id,
                container = %target.id,
                "removing the container timed out"
            ),
        }
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInspectResponse, DockerError> {
        self.engine.docker.inspect_container(id, None).await
    }
}

/// A socket that does not exist means no daemon runs there, not a bad client setup.
fn setup_connect_error(error: DockerError) -> DockerSetupError {
    match error {
        DockerError::SocketNotFoundError(socket) => DockerSetupError::Unreachable(format!(
            "Cannot connect to the Docker daemon at unix://{socket}. Is the docker daemon running?"
        )),
        other => DockerSetupError::Client(other.to_string()),
    }
}

/// The deterministic container name of one execution on one node:
/// `ozfleet-<task>-<execution>-<hash>`, the ids sanitised to Docker's name alphabet and
/// shortened, the hash (of the unsanitised node, task and execution ids) keeping names of
/// different executions apart after sanitising.
pub fn container_name(node_id: &str, task_id: &str, execution_id: &str) -> String {
    fn part(id: &str) -> String {
        let sanitised: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(NAME_PART_MAX)
            .collect();
        if sanitised.is_empty() {
            "none".to_owned()
        } else {
            sanitised
        }
    }
    let hash = fnv1a64(&[node_id, task_id, execution_id]);
    format!(
        "ozfleet-{}-{}-{:012x}",
        part(task_id),
        part(execution_id),
        hash & 0xffff_ffff_ffff
    )
}

/// FNV-1a over the parts, each followed by a NUL: stable across builds and processes
/// (unlike std's hasher), which a restarted agent relies on to find the same name.
fn fnv1a64(parts: &[&str]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    parts
        .iter()
        .flat_map(|part| part.bytes().chain(std::iter::once(0)))
        .fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

/// NanoCPUs and Memory (= MemorySwap, so no extra swap) of a shape; non-positive axes are
/// unset.
fn resources(shape: Option<InstanceShape>) -> (Option<i64>, Option<i64>) {
    let Some(shape) = shape else {
        return (None, None);
    };
    let nano_cpus = (shape.vcpus > 0).then(|| shape.vcpus.saturating_mul(1_000_000_000));
    let memory = (shape.memory_gb > 0).then(|| shape.memory_gb.saturating_mul(1 << 30));
    (nano_cpus, memory)
}

fn status(info: &ContainerInspectResponse) -> Option<ContainerStateStatusEnum> {
    info.state.as_ref().and_then(|state| state.status)
}

/// Whether the container's process is alive (also while paused or restarting).
fn is_running(info: &ContainerInspectResponse) -> bool {
    info.state
        .as_ref()
        .and_then(|state| state.running)
        .unwrap_or(false)
}

/// Docker's status code as-is (already 128+signal for signal deaths).
fn exit_code_i32(code: i64) -> i32 {
    i32::try_from(code).unwrap_or(if code < 0 { i32::MIN } else { i32::MAX })
}

fn cancelled(exit_code: i32) -> TaskFailure {
    TaskFailure::new(FailureReason::TaskCancelled, CANCELLED_ERROR).with_exit_code(exit_code)
}

fn is_not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A daemon error as the Docker CLI prints it (`Error response from daemon: …`); other
/// errors by their own text.
fn daemon_error_text(error: &DockerError) -> String {
    match error {
        DockerError::DockerResponseServerError { message, .. } => {
            format!("Error response from daemon: {message}")
        }
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_bounded_and_distinct() {
        let name = container_name("node-1", "019f-run", "exec-1");
        assert!(name.starts_with("ozfleet-019f-run-exec-1-"), "{name}");
        assert_eq!(name, container_name("node-1", "019f-run", "exec-1"));
        assert_ne!(name, container_name("node-2", "019f-run", "exec-1"));
        assert_ne!(name, container_name("node-1", "019f-run", "exec-2"));
        // Sanitising maps both to the same text; the hash keeps them apart.
        assert_ne!(
            container_name("n", "a/b", "e"),
            container_name("n", "a:b", "e")
        );
        let long = "x".repeat(500);
        let weird = container_name("n", &long, "é t/\u{0}");
        assert!(weird.len() <= 8 + NAME_PART_MAX * 2 + 2 + 12, "{weird}");
        assert!(
            weird
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')),
            "{weird}"
        );
        assert!(container_name("n", "", "").starts_with("ozfleet-none-none-"));
    }

    #[test]
    fn shape_to_resources() {
        assert_eq!(resources(None), (None, None));
        assert_eq!(
            resources(Some(InstanceShape {
                vcpus: 2,
                memory_gb: 1
            })),
            (Some(2_000_000_000), Some(1 << 30))
        );
        assert_eq!(
            resources(Some(InstanceShape {
                vcpus: 0,
                memory_gb: -1
            })),
            (None, None)
        );
        assert_eq!(
            resources(Some(InstanceShape {
                vcpus: i64::MAX,
                memory_gb: 0
            })),
            (Some(i64::MAX), None)
        );
    }

    #[test]
    fn errors_read_like_the_docker_cli() {
        let error = DockerError::DockerResponseServerError {
            status_code: 404,
            message: "No such image: x:1".into(),
        };
        assert!(is_not_found(&error));
        assert_eq!(
            daemon_error_text(&error),
            "Error response from daemon: No such image: x:1"
        );
        assert_eq!(
            daemon_error_text(&DockerError::DockerStreamError {
                error: "manifest unknown".into()
            }),
            "manifest unknown"
        );
        assert_eq!(exit_code_i32(137), 137);
        assert_eq!(exit_code_i32(i64::MAX), i32::MAX);
        assert_eq!(
            DockerSetupError::UnsupportedPlatform("windows/amd64".into()).to_string(),
            "unsupported Docker platform windows/amd64 (only linux/amd64 and linux/arm64 are supported)"
        );
    }

    fn test_config() -> DockerConfig {
        DockerConfig {
            node_id: "n".into(),
            volumes: vec![],
            environment: vec![],
            cleanup: true,
            image_pull_policy: ImagePullPolicy::IfNotPresent,
            network_mode: None,
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
    /// version).
    fn fake_daemon(socket: &std::path::Path, body: &'static str) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
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
    }

    #[tokio::test]
    async fn only_linux_amd64_and_arm64_daemons_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let windows = dir.path().join("windows.sock");
        fake_daemon(
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
        fake_daemon(
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
            node_id: "n".into(),
            volumes: vec![],
            environment: vec![("API_KEY".into(), "sk-secret".into())],
            cleanup: true,
            image_pull_policy: ImagePullPolicy::IfNotPresent,
            network_mode: None,
            stop_grace: Duration::from_secs(10),
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("API_KEY"), "{shown}");
        assert!(!shown.contains("sk-secret"), "{shown}");
    }
}
