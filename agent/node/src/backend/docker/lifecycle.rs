//! A task container's life: create and start, follow to its exit (surviving a broken
//! wait), stop on cancellation, log its output, remove it.

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::{
    CreateContainerOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use std::time::Duration;

use futures::StreamExt as _;
use ozfleet_proto::oz::FailureReason;
use tokio_util::sync::CancellationToken;

use super::errors::{daemon_error_text, is_not_found};
use super::naming::container_name;
use super::{DockerBackend, spec};
use crate::backend::{TaskFailure, TaskRun, cancelled};

/// Fresh budget for removing a container, whatever happened before (reference value).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Container output lines logged when a task fails.
const LOG_TAIL_LINES: &str = "100";
/// How often a broken wait is retried while the daemon cannot be asked.
const WAIT_RETRIES: u32 = 5;
const WAIT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// A task container and the ids it runs for (for logs).
pub(super) struct Target<'a> {
    pub id: String,
    pub task_id: &'a str,
    pub execution_id: &'a str,
}

impl DockerBackend {
    /// Creates and starts `task`'s container under its deterministic name. When this
    /// execution already has a container (a duplicate assignment, or an agent that stopped
    /// between create and start), that one is followed instead of starting a second.
    pub(super) async fn create_and_start<'a>(
        &self,
        task: &'a TaskRun,
        sidecar_binds: Vec<String>,
    ) -> Result<Target<'a>, TaskFailure> {
        let name = container_name(&self.config.node_id, &task.task_id, &task.execution_id);
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let body = spec::container_body(&self.config, task, sidecar_binds);
        match self
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
                Ok(target)
            }
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
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
                Ok(target)
            }
            Err(error) => Err(TaskFailure::new(
                FailureReason::ContainerCreate,
                format!("failed to create container: {}", daemon_error_text(&error)),
            )),
        }
    }

    /// Starts a container that was created but never started (the agent stopped in
    /// between); others are left as they are.
    pub(super) async fn start_if_created(&self, target: &Target<'_>) -> Result<(), TaskFailure> {
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
    pub(super) async fn supervise(
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
    pub(super) async fn wait_for_exit(&self, id: &str) -> Result<i32, TaskFailure> {
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
    pub(super) async fn stop(&self, target: &Target<'_>) -> TaskFailure {
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
    pub(super) async fn log_output(&self, target: &Target<'_>, exit_code: i32) {
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
    pub(super) async fn remove(&self, target: &Target<'_>) {
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

    pub(super) async fn inspect(&self, id: &str) -> Result<ContainerInspectResponse, DockerError> {
        self.engine.docker.inspect_container(id, None).await
    }
}

fn status(info: &ContainerInspectResponse) -> Option<ContainerStateStatusEnum> {
    info.state.as_ref().and_then(|state| state.status)
}

/// Whether the container's process is alive (also while paused or restarting).
pub(super) fn is_running(info: &ContainerInspectResponse) -> bool {
    info.state
        .as_ref()
        .and_then(|state| state.running)
        .unwrap_or(false)
}

/// Docker's status code as-is (already 128+signal for signal deaths).
pub(super) fn exit_code_i32(code: i64) -> i32 {
    i32::try_from(code).unwrap_or(if code < 0 { i32::MIN } else { i32::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_saturate() {
        assert_eq!(exit_code_i32(137), 137);
        assert_eq!(exit_code_i32(i64::MAX), i32::MAX);
        assert_eq!(exit_code_i32(i64::MIN), i32::MIN);
    }
}
