//! Re-adoption: Jobs outlive their agent, so a restarted agent lists this node's Jobs by
//! label and follows each to its end (the node reports every outcome exactly once, also
//! for Jobs that ended while it was down). A create that finds the Job already there
//! (same execution) adopts it the same way instead of running the task twice.

use kube::api::ListParams;
use ozfleet_proto::oz::FailureReason;

use super::client::{api_code, api_error_text};
use super::job_spec::{
    ANNOTATION_EXECUTION_ID, ANNOTATION_NODE_ID, ANNOTATION_TASK_ID, LABEL_MANAGED,
    LABEL_NODE_HASH, short_hash,
};
use super::{Engine, JobIdentity};
use crate::backend::{RecoveredTask, TaskFailure};

impl Engine {
    /// This node's task Jobs, running or finished (the node skips those it already
    /// reported).
    pub(super) async fn find_jobs(&self) -> Vec<RecoveredTask> {
        let selector = format!(
            "{LABEL_MANAGED}=true,{LABEL_NODE_HASH}={}",
            short_hash(&self.config.node_id)
        );
        let jobs = match self
            .jobs
            .list(&ListParams::default().labels(&selector))
            .await
        {
            Ok(list) => list.items,
            Err(error) => {
                tracing::warn!(
                    error = %api_error_text(&error),
                    "cannot list Jobs to re-adopt; none are resumed"
                );
                return Vec::new();
            }
        };
        jobs.into_iter()
            .filter(|job| job.metadata.deletion_timestamp.is_none())
            .filter_map(|job| {
                let annotations = job.metadata.annotations.unwrap_or_default();
                if annotations.get(ANNOTATION_NODE_ID) != Some(&self.config.node_id) {
                    return None;
                }
                let task_id = annotations.get(ANNOTATION_TASK_ID)?.clone();
                let execution_id = annotations
                    .get(ANNOTATION_EXECUTION_ID)
                    .cloned()
                    .unwrap_or_default();
                let name = job.metadata.name?;
                tracing::info!(
                    task_id,
                    execution_id,
                    job = name,
                    "found Job of an earlier run"
                );
                Some(RecoveredTask {
                    task_id,
                    execution_id,
                    handle: name,
                })
            })
            .collect()
    }

    /// Checks that the recovered Job is still there and this node's, for
    /// [`Engine::follow_job`].
    pub(super) async fn adopt(&self, task: &RecoveredTask) -> Result<JobIdentity, TaskFailure> {
        let identity = self.identity(&task.task_id, &task.execution_id);
        let job = self.jobs.get(&task.handle).await.map_err(|error| {
            let text = if api_code(&error) == Some(404) {
                format!(
                    "kubernetes Job {} in namespace {} no longer exists",
                    task.handle, self.config.settings.namespace
                )
            } else {
                format!(
                    "failed to get Kubernetes Job {}: {}",
                    task.handle,
                    api_error_text(&error)
                )
            };
            TaskFailure::new(FailureReason::JobWatch, text)
        })?;
        if !identity.matches(&job) || identity.job_name() != task.handle {
            return Err(TaskFailure::new(
                FailureReason::Unknown,
                format!(
                    "kubernetes Job {} does not belong to this node",
                    task.handle
                ),
            ));
        }
        Ok(identity)
    }
}
