//! How a task's span ends, the same on the gateway and on the node: the reference's
//! closing events (`task.completed`, `task.cancelled`, `task.failed`) and statuses.

use opentelemetry::KeyValue;
use opentelemetry::global::BoxedSpan;
use opentelemetry::trace::{Span as _, Status};

/// How the task ended.
pub enum TaskEnd<'a> {
    Completed,
    Cancelled,
    Failed { reason: &'a str, message: &'a str },
}

/// Records the closing event and status on `span` and ends it.
pub fn end_task_span(span: Option<BoxedSpan>, end: TaskEnd<'_>) {
    let Some(mut span) = span else { return };
    match end {
        TaskEnd::Completed => {
            span.add_event("task.completed", Vec::new());
            span.set_status(Status::Ok);
        }
        TaskEnd::Cancelled => {
            span.add_event("task.cancelled", vec![KeyValue::new("source", "user")]);
            span.set_status(Status::Ok);
        }
        TaskEnd::Failed { reason, message } => {
            span.add_event(
                "task.failed",
                vec![
                    KeyValue::new("failure.phase", "backend"),
                    KeyValue::new("failure.reason", reason.to_owned()),
                    KeyValue::new("error.message", message.to_owned()),
                ],
            );
            span.set_status(Status::error(reason.to_owned()));
        }
    }
    span.end();
}
