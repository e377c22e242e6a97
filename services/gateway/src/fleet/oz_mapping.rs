//! Node outcomes → the messages Oz gets (spec §1.9): `task_completed`, `task_cancelled`
//! or `task_failed` with the reference's failure reasons and texts.

use ozfleet_proto::oz::{self, FailureReason, WorkerMessage};
use ozfleet_proto::v1::{TaskOutcome, task_outcome};
use tracing::warn;

use super::events::TaskResult;

/// The message Oz gets for a node's outcome.
pub fn upstream_message(outcome: &TaskOutcome) -> WorkerMessage {
    let task_id = outcome.task_id.as_str();
    match &outcome.result {
        Some(task_outcome::Result::Succeeded(_)) => WorkerMessage::completed(task_id),
        Some(task_outcome::Result::Cancelled(_)) => WorkerMessage::cancelled(task_id),
        Some(task_outcome::Result::Failed(failed)) => {
            let reason = FailureReason::parse(&failed.failure_reason).unwrap_or_else(|| {
                warn!(
                    task_id,
                    reason = failed.failure_reason,
                    "Unknown failure reason from node"
                );
                FailureReason::Unknown
            });
            WorkerMessage::failed(task_id, reason, failed.message.clone(), failed.exit_code)
        }
        None => WorkerMessage::failed(
            task_id,
            FailureReason::Unknown,
            oz::failed_to_execute_message("the node reported an outcome without a result"),
            0,
        ),
    }
}

/// What Oz is told when an operator cancelled the task (`ozfleet cancel`, the admin API).
pub const OPERATOR_CANCELLED_MESSAGE: &str =
    "Task cancelled by an operator of this worker (ozfleet admin API).";

/// The message Oz gets for the outcome of a task an operator cancelled: a stop caused by
/// the cancellation is a `task_failed` with reason `task_cancelled`; a task that ended on
/// its own before the cancellation landed keeps its true outcome.
pub fn operator_cancelled_message(outcome: &TaskOutcome) -> WorkerMessage {
    let stopped_by_cancel = match &outcome.result {
        Some(task_outcome::Result::Cancelled(_)) => true,
        Some(task_outcome::Result::Failed(failed)) => {
            failed.failure_reason == FailureReason::TaskCancelled.as_str()
        }
        _ => false,
    };
    if stopped_by_cancel {
        operator_cancelled(&outcome.task_id)
    } else {
        upstream_message(outcome)
    }
}

pub fn operator_cancelled(task_id: &str) -> WorkerMessage {
    WorkerMessage::failed(
        task_id,
        FailureReason::TaskCancelled,
        OPERATOR_CANCELLED_MESSAGE.to_owned(),
        0,
    )
}

/// The `task_failed` Oz gets for a task whose node lost it.
pub fn lost_message(task_id: &str, why: &str) -> WorkerMessage {
    WorkerMessage::failed(
        task_id,
        FailureReason::Unknown,
        oz::failed_to_execute_message(why),
        0,
    )
}

/// How an upstream message ends a task, for events.
pub fn result_of(message: &WorkerMessage) -> TaskResult {
    match message {
        WorkerMessage::TaskFailed(failed) => TaskResult::Failed {
            reason: failed.failure_reason.clone(),
            exit_code: failed.exit_code.unwrap_or(0),
        },
        WorkerMessage::TaskCompleted(completed) if completed.task_state.is_some() => {
            TaskResult::Cancelled
        }
        _ => TaskResult::Succeeded,
    }
}

#[cfg(test)]
mod tests {
    use ozfleet_proto::v1;

    use super::*;

    fn outcome(result: Option<task_outcome::Result>) -> TaskOutcome {
        TaskOutcome {
            task_id: "run-1".into(),
            execution_id: "exec-1".into(),
            result,
        }
    }

    #[test]
    fn each_outcome_maps_to_its_message_and_result() {
        let succeeded = upstream_message(&outcome(Some(task_outcome::Result::Succeeded(
            v1::TaskSucceeded {},
        ))));
        assert_eq!(succeeded, WorkerMessage::completed("run-1"));
        assert_eq!(result_of(&succeeded), TaskResult::Succeeded);

        let cancelled = upstream_message(&outcome(Some(task_outcome::Result::Cancelled(
            v1::TaskCancelled {},
        ))));
        assert_eq!(result_of(&cancelled), TaskResult::Cancelled);

        let failed = upstream_message(&outcome(Some(task_outcome::Result::Failed(
            v1::TaskFailed {
                failure_reason: "setup_command".into(),
                exit_code: 2,
                message: "Failed to execute task: setup".into(),
            },
        ))));
        assert_eq!(
            failed,
            WorkerMessage::failed(
                "run-1",
                FailureReason::SetupCommand,
                "Failed to execute task: setup".into(),
                2
            )
        );
        assert_eq!(
            result_of(&failed),
            TaskResult::Failed {
                reason: "setup_command".into(),
                exit_code: 2
            }
        );
    }

    #[test]
    fn an_operator_cancel_fails_the_task_as_cancelled_unless_it_ended_on_its_own() {
        let cancelled = outcome(Some(task_outcome::Result::Cancelled(v1::TaskCancelled {})));
        let message = operator_cancelled_message(&cancelled);
        assert_eq!(
            result_of(&message),
            TaskResult::Failed {
                reason: "task_cancelled".into(),
                exit_code: 0
            }
        );
        assert!(matches!(&message, WorkerMessage::TaskFailed(failed)
            if failed.message == OPERATOR_CANCELLED_MESSAGE));
        let succeeded = outcome(Some(task_outcome::Result::Succeeded(v1::TaskSucceeded {})));
        assert_eq!(
            operator_cancelled_message(&succeeded),
            WorkerMessage::completed("run-1")
        );
    }

    #[test]
    fn unknown_reasons_and_missing_results_become_unknown_failures() {
        let odd = upstream_message(&outcome(Some(task_outcome::Result::Failed(
            v1::TaskFailed {
                failure_reason: "made_up".into(),
                exit_code: 1,
                message: "m".into(),
            },
        ))));
        let unknown = TaskResult::Failed {
            reason: "unknown".into(),
            exit_code: 1,
        };
        assert_eq!(result_of(&odd), unknown);
        let empty = upstream_message(&outcome(None));
        assert_eq!(
            result_of(&empty),
            TaskResult::Failed {
                reason: "unknown".into(),
                exit_code: 0
            }
        );
    }
}
