//! What a node agent tells an OTLP collector or Prometheus, under `ozfleet_agent_*` (the
//! gateway alone exports the reference's `oz_worker_*` catalog, so nothing is counted
//! twice), and its part of each task's trace: a span around the backend execution whose
//! parent is the gateway's `oz_worker.task` span, carried in the assignment.

use std::collections::HashMap;

use opentelemetry::KeyValue;
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::trace::Tracer as _;
use ozfleet_proto::v1::task_outcome;
use ozfleet_telemetry::task_span::{TaskEnd, end_task_span};

/// `service.name` of node agents.
pub const SERVICE_NAME: &str = "ozfleet-agent";
/// The node agents' instrumentation scope.
pub const SCOPE: &str = "github.com/ozfleet/ozfleet/agent";

/// What a node agent tells the world: metrics, traces, and whether it is attached to the
/// gateway (subscribe to `attached` for health probes).
pub struct NodeTelemetry {
    pub meter: Meter,
    pub tracer: Option<BoxedTracer>,
    pub attached: tokio::sync::watch::Sender<bool>,
}

impl NodeTelemetry {
    /// Records nothing.
    pub fn disabled() -> Self {
        Self {
            meter: opentelemetry::global::meter_provider().meter("ozfleet-agent-disabled"),
            tracer: None,
            attached: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// The node's counters and histograms; its gauges are callbacks registered in `node.rs`.
pub(crate) struct NodeMetrics {
    started: Counter<u64>,
    finished: Counter<u64>,
    duration: Histogram<f64>,
    failures: Counter<u64>,
    pub(crate) reconnects: Counter<u64>,
}

/// `succeeded`, `failed` or `cancelled`, as the gateway's catalog names results.
pub(crate) fn result_name(result: &task_outcome::Result) -> &'static str {
    match result {
        task_outcome::Result::Succeeded(_) => "succeeded",
        task_outcome::Result::Failed(_) => "failed",
        task_outcome::Result::Cancelled(_) => "cancelled",
    }
}

impl NodeMetrics {
    pub(crate) fn new(meter: &Meter) -> Self {
        let metrics = Self {
            started: meter
                .u64_counter("ozfleet_agent_tasks_started_total")
                .with_description(
                    "Task executions this node agent started (resumed ones included).",
                )
                .build(),
            finished: meter
                .u64_counter("ozfleet_agent_tasks_finished_total")
                .with_description("Task executions this node agent finished, by result.")
                .build(),
            duration: meter
                .f64_histogram("ozfleet_agent_task_duration_seconds")
                .with_unit("s")
                .with_description("Wall-clock duration of task executions on this node, by result.")
                .build(),
            failures: meter
                .u64_counter("ozfleet_agent_task_failures_total")
                .with_description("Failed task executions on this node, by failure reason.")
                .build(),
            reconnects: meter
                .u64_counter("ozfleet_agent_gateway_reconnects_total")
                .with_description(
                    "Attach streams to the gateway that ended and were dialled again.",
                )
                .build(),
        };
        for result in ["succeeded", "failed", "cancelled"] {
            metrics.finished.add(0, &[KeyValue::new("result", result)]);
        }
        metrics.started.add(0, &[]);
        metrics.reconnects.add(0, &[]);
        metrics
    }

    pub(crate) fn started(&self) {
        self.started.add(1, &[]);
    }

    pub(crate) fn finished(&self, result: &task_outcome::Result, seconds: f64) {
        let label = [KeyValue::new("result", result_name(result))];
        self.finished.add(1, &label);
        self.duration.record(seconds, &label);
        if let task_outcome::Result::Failed(failed) = result {
            self.failures
                .add(1, &[KeyValue::new("reason", failed.failure_reason.clone())]);
        }
    }
}

/// The node's span for one task execution, child of the gateway's span when the
/// assignment carried its context.
pub(crate) fn execution_span(
    tracer: Option<&BoxedTracer>,
    trace_context: &HashMap<String, String>,
    attributes: Vec<KeyValue>,
) -> Option<BoxedSpan> {
    let tracer = tracer?;
    let parent = ozfleet_telemetry::propagation::extract(trace_context);
    Some(
        tracer.build_with_context(
            tracer
                .span_builder("ozfleet_agent.task")
                .with_attributes(attributes),
            &parent,
        ),
    )
}

/// Ends an execution span with the reference's closing event and status.
pub(crate) fn end_span(span: Option<BoxedSpan>, result: &task_outcome::Result) {
    let end = match result {
        task_outcome::Result::Succeeded(_) => TaskEnd::Completed,
        task_outcome::Result::Cancelled(_) => TaskEnd::Cancelled,
        task_outcome::Result::Failed(failed) => TaskEnd::Failed {
            reason: &failed.failure_reason,
            message: &failed.message,
        },
    };
    end_task_span(span, end);
}
