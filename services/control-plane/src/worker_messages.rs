//! What the control plane does with each worker → server message (spec
//! `oz-agent-worker.md` §1.8).
//!
//! A worker's messages are never trusted to be well-formed or timely: malformed frames,
//! messages about unknown runs, runs offered elsewhere or runs already finished are logged
//! and ignored, and the connection stays open.

use ozfleet_proto::oz::{
    CANCELLED_TASK_STATE, FailureReason, TaskClaimed, TaskCompleted, TaskFailed, TaskRejected,
    WorkerMessage, cancellation_frame, parse_worker_message,
};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::dispatch::Dispatcher;
use crate::store::{Outcome, RunState, StoreError, Timestamp};
use crate::worker_registry::ConnectionId;

/// The connection a message arrived on.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub connection: ConnectionId,
    pub worker_id: &'a str,
}

impl Dispatcher {
    pub fn handle_worker_frame(&self, origin: Origin<'_>, frame: &str) {
        let message = match parse_worker_message(frame) {
            Ok(message) => message,
            Err(error) => {
                warn!(
                    "ignoring a malformed frame from worker {} (connection {}): {error}",
                    origin.worker_id, origin.connection
                );
                return;
            }
        };
        let message_type = message.message_type();
        let run_id = message.task_id().to_owned();
        let handled = match message {
            WorkerMessage::TaskClaimed(claimed) => self.on_task_claimed(origin, claimed),
            WorkerMessage::TaskRejected(rejected) => {
                self.on_task_rejected(origin, rejected);
                Ok(())
            }
            WorkerMessage::TaskCompleted(completed) => {
                self.on_task_finished(origin, &run_id, completion_outcome(&completed))
            }
            WorkerMessage::TaskFailed(failed) => {
                self.on_task_finished(origin, &run_id, failure_outcome(failed))
            }
        };
        if let Err(error) = handled {
            error!(
                "cannot record {message_type} for run {run_id} from worker {}: {error}",
                origin.worker_id
            );
        }
    }

    fn on_task_claimed(&self, origin: Origin<'_>, claimed: TaskClaimed) -> Result<(), StoreError> {
        let Origin {
            connection,
            worker_id,
        } = origin;
        let run_id = claimed.task_id.as_str();
        let mut workers = self.lock_workers();
        let Some(run) = self.store.get(run_id)? else {
            warn!("ignoring task_claimed from worker {worker_id} for unknown run {run_id}");
            return Ok(());
        };
        if run.state == RunState::Cancelled {
            info!(
                "worker {worker_id} claimed run {run_id} after it was cancelled; telling it to cancel"
            );
            workers.send(connection, cancellation_frame(run_id));
            return Ok(());
        }
        let Some(offer) = workers.take_offer(run_id, connection) else {
            warn!(
                "ignoring task_claimed from worker {worker_id} (connection {connection}) for run \
                 {run_id}: it is {} and was not offered to this connection",
                run.state
            );
            return Ok(());
        };
        if self
            .store
            .claim(run_id, worker_id, &offer.execution_id, Timestamp::now())?
        {
            workers.set_holder(run_id, connection);
            info!("run {run_id} QUEUED -> CLAIMED by worker {worker_id}");
        }
        Ok(())
    }

    fn on_task_rejected(&self, origin: Origin<'_>, rejected: TaskRejected) {
        let Origin {
            connection,
            worker_id,
        } = origin;
        let run_id = rejected.task_id.as_str();
        let mut workers = self.lock_workers();
        if workers.take_offer(run_id, connection).is_none() {
            warn!(
                "ignoring task_rejected from worker {worker_id} (connection {connection}) for run \
                 {run_id}: it was not offered to this connection"
            );
            return;
        }
        workers.delay_reoffer(run_id, worker_id, Instant::now() + self.reoffer_delay);
        drop(workers);
        info!(
            "worker {worker_id} rejected run {run_id} ({:?}); it stays QUEUED and is offered \
             again in {:?} at the latest after a run of that worker ends",
            rejected.reason, self.reoffer_delay
        );
        // The dispatch loop must learn the new earliest re-offer time.
        self.wake();
    }

    fn on_task_finished(
        &self,
        origin: Origin<'_>,
        run_id: &str,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        let worker_id = origin.worker_id;
        let mut workers = self.lock_workers();
        let Some(run) = self.store.get(run_id)? else {
            warn!("ignoring a report from worker {worker_id} for unknown run {run_id}");
            return Ok(());
        };
        if run.state.is_terminal() {
            debug!(
                "ignoring a repeated report from worker {worker_id} for run {run_id}: it is \
                 already {}",
                run.state
            );
            return Ok(());
        }
        let held_by_sender = run.state.is_active() && run.claimed_by.as_deref() == Some(worker_id);
        if !held_by_sender {
            warn!(
                "ignoring a report from worker {worker_id} for run {run_id}: it is {} and claimed \
                 by {}",
                run.state,
                run.claimed_by.as_deref().unwrap_or("no worker")
            );
            return Ok(());
        }
        if self.store.finish(run_id, &outcome, Timestamp::now())? {
            info!(
                "run {run_id} {} -> {} reported by worker {worker_id}",
                run.state,
                outcome.state()
            );
        }
        workers.release_holder(run_id);
        workers.end_reoffer_delays_for(worker_id);
        drop(workers);
        self.wake();
        Ok(())
    }
}

fn completion_outcome(completed: &TaskCompleted) -> Outcome {
    match completed.task_state.as_deref() {
        Some(CANCELLED_TASK_STATE) => Outcome::Cancelled,
        _ => Outcome::Succeeded,
    }
}

fn failure_outcome(failed: TaskFailed) -> Outcome {
    // The reference worker always names a reason; a missing one is reported as such.
    let failure_reason = if failed.failure_reason.is_empty() {
        FailureReason::Unknown.to_string()
    } else {
        failed.failure_reason
    };
    Outcome::Failed {
        message: failed.message,
        failure_reason,
        exit_code: failed.exit_code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_are_successes_unless_the_worker_says_cancelled() {
        let completed = |task_state: Option<&str>| TaskCompleted {
            task_id: "t".into(),
            message: String::new(),
            task_state: task_state.map(str::to_owned),
        };
        assert_eq!(completion_outcome(&completed(None)), Outcome::Succeeded);
        assert_eq!(
            completion_outcome(&completed(Some(CANCELLED_TASK_STATE))),
            Outcome::Cancelled
        );
    }

    #[test]
    fn failures_keep_reason_and_exit_code_and_default_the_reason() {
        let failed = TaskFailed {
            task_id: "t".into(),
            message: "boom".into(),
            failure_reason: "container_exit".into(),
            exit_code: Some(137),
        };
        assert_eq!(
            failure_outcome(failed.clone()),
            Outcome::Failed {
                message: "boom".into(),
                failure_reason: "container_exit".into(),
                exit_code: Some(137)
            }
        );
        let unexplained = TaskFailed {
            failure_reason: String::new(),
            exit_code: None,
            ..failed
        };
        assert!(matches!(
            failure_outcome(unexplained),
            Outcome::Failed { failure_reason, exit_code: None, .. } if failure_reason == "unknown"
        ));
    }
}
