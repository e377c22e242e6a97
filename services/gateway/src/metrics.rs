//! The gateway's metrics: the reference worker's catalog for the whole fleet, with the
//! same names, instruments, units, labels and priming, so its dashboards and alert rules
//! work unchanged (spec §10.3), plus fleet metrics the reference cannot have.
//!
//! How the fleet maps onto the catalog: `oz_worker_tasks_active` counts tasks running
//! across the fleet; `oz_worker_tasks_max_concurrent` is the summed capacity of attached,
//! non-draining nodes, 0 (the reference's "unlimited") when any of them is unlimited; an
//! operator cancel counts as `completed{result="failed"}` and
//! `failures{phase="backend",reason="task_cancelled"}`, like the `task_failed` Oz gets;
//! `oz_worker_info{backend}` is `fleet`.
//!
//! Counters follow the fleet's events synchronously (they can never miss one); gauges are
//! read from the fleet at collection time (one pass, shared by all of them), so they are right by construction.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use ozfleet_proto::oz::FailureReason;

use crate::fleet::{Fleet, FleetEvent, FleetReadings, NodeState, TaskResult};

/// The instrumentation scope the reference's dashboards filter on.
pub const SCOPE: &str = "github.com/warpdotdev/oz-agent-worker";
/// `service.name` of the gateway (dashboards filter on it).
pub const SERVICE_NAME: &str = "oz-agent-worker";
/// `worker.backend` and `oz_worker_info{backend}` of a fleet.
pub const BACKEND: &str = "fleet";

const RESULTS: [&str; 4] = ["succeeded", "failed", "cancelled", "dispatched"];
const PHASES: [&str; 3] = ["assignment", "backend", "cleanup"];
/// Buckets for sub-millisecond dispatch, up to the offer timeout.
const DISPATCH_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The counters and histograms events update.
struct EventInstruments {
    claimed: Counter<u64>,
    rejected: Counter<u64>,
    completed: Counter<u64>,
    duration: Histogram<f64>,
    failures: Counter<u64>,
    reconnects: Counter<u64>,
    dispatch_latency: Histogram<f64>,
    node_reconnects: Counter<u64>,
    node_drains: Counter<u64>,
    operator_cancels: Counter<u64>,
}

impl EventInstruments {
    fn new(meter: &Meter) -> Self {
        Self {
            claimed: meter
                .u64_counter("oz_worker_tasks_claimed_total")
                .with_description("Total tasks the worker has claimed since process start.")
                .build(),
            rejected: meter
                .u64_counter("oz_worker_tasks_rejected_total")
                .with_description("Total tasks the worker has rejected since process start.")
                .build(),
            completed: meter
                .u64_counter("oz_worker_tasks_completed_total")
                .with_description("Total tasks the worker has finished, labeled by terminal result.")
                .build(),
            duration: meter
                .f64_histogram("oz_worker_task_duration_seconds")
                .with_unit("s")
                .with_description(
                    "Wall-clock duration of task execution on the worker, labeled by terminal result.",
                )
                .build(),
            failures: meter
                .u64_counter("oz_worker_task_failures_total")
                .with_description("Task failures labeled by bounded execution phase and reason.")
                .build(),
            reconnects: meter
                .u64_counter("oz_worker_websocket_reconnects_total")
                .with_description("Total WebSocket reconnect attempts since process start.")
                .build(),
            dispatch_latency: meter
                .f64_histogram("ozfleet_dispatch_latency_seconds")
                .with_unit("s")
                .with_boundaries(DISPATCH_BUCKETS.to_vec())
                .with_description(
                    "From a task assignment arriving from Oz to its task_claimed being queued.",
                )
                .build(),
            node_reconnects: meter
                .u64_counter("ozfleet_node_reconnects_total")
                .with_description("Node agents that attached again with a known node id.")
                .build(),
            node_drains: meter
                .u64_counter("ozfleet_node_drains_total")
                .with_description("Nodes an operator drained.")
                .build(),
            operator_cancels: meter
                .u64_counter("ozfleet_operator_cancels_total")
                .with_description("Tasks an operator cancelled through the admin API.")
                .build(),
        }
    }

    /// Every series at 0 before anything happens, as the reference does (the duration
    /// histogram is not primed, also as the reference).
    fn prime(&self) {
        self.claimed.add(0, &[]);
        self.rejected
            .add(0, &[KeyValue::new("reason", "at_capacity")]);
        for result in RESULTS {
            self.completed.add(0, &[KeyValue::new("result", result)]);
        }
        for phase in PHASES {
            for reason in FailureReason::ALL {
                self.failures.add(
                    0,
                    &[
                        KeyValue::new("phase", phase),
                        KeyValue::new("reason", reason.as_str()),
                    ],
                );
            }
        }
        for reason in ["dial_failed", "remote_close"] {
            self.reconnects.add(0, &[KeyValue::new("reason", reason)]);
        }
        self.node_reconnects.add(0, &[]);
        self.node_drains.add(0, &[]);
        self.operator_cancels.add(0, &[]);
    }

    fn record(&self, event: &FleetEvent) {
        match event {
            FleetEvent::TaskClaimed {
                dispatch_latency, ..
            } => {
                self.claimed.add(1, &[]);
                if let Some(latency) = dispatch_latency {
                    self.dispatch_latency.record(latency.as_secs_f64(), &[]);
                }
            }
            FleetEvent::TaskRejected { .. } => {
                self.rejected
                    .add(1, &[KeyValue::new("reason", "at_capacity")]);
            }
            FleetEvent::TaskFinished {
                result, ran_for, ..
            } => {
                let name = match result {
                    TaskResult::Succeeded => "succeeded",
                    TaskResult::Failed { .. } => "failed",
                    TaskResult::Cancelled => "cancelled",
                };
                let result_label = [KeyValue::new("result", name)];
                self.completed.add(1, &result_label);
                self.duration.record(ran_for.as_secs_f64(), &result_label);
                if let TaskResult::Failed { reason, .. } = result {
                    self.failures.add(
                        1,
                        &[
                            KeyValue::new("phase", "backend"),
                            KeyValue::new("reason", reason.clone()),
                        ],
                    );
                }
            }
            FleetEvent::TaskInvalid { .. } => {
                // Failed before any node saw it: the reference's assignment phase.
                self.completed.add(1, &[KeyValue::new("result", "failed")]);
                self.failures.add(
                    1,
                    &[
                        KeyValue::new("phase", "assignment"),
                        KeyValue::new("reason", FailureReason::Unknown.as_str()),
                    ],
                );
            }
            FleetEvent::UpstreamDisconnected => {
                self.reconnects
                    .add(1, &[KeyValue::new("reason", "remote_close")]);
            }
            FleetEvent::UpstreamDialFailed => {
                self.reconnects
                    .add(1, &[KeyValue::new("reason", "dial_failed")]);
            }
            FleetEvent::NodeAttached {
                reattached: true, ..
            } => self.node_reconnects.add(1, &[]),
            FleetEvent::NodeDraining { draining: true, .. } => self.node_drains.add(1, &[]),
            FleetEvent::TaskCancelRequested {
                by_operator: true, ..
            } => self.operator_cancels.add(1, &[]),
            _ => {}
        }
    }
}

/// What the gauges read from one pass over the fleet.
struct Gauges {
    connected: i64,
    tasks_active: i64,
    max_concurrent: i64,
    /// (backend, state) → nodes.
    nodes: BTreeMap<(&'static str, &'static str), i64>,
    /// node id → (active tasks, capacity).
    per_node: Vec<(Arc<str>, i64, i64)>,
}

fn backend_name(backend: ozfleet_proto::v1::BackendKind) -> &'static str {
    match backend {
        ozfleet_proto::v1::BackendKind::Direct => "direct",
        ozfleet_proto::v1::BackendKind::Docker => "docker",
        ozfleet_proto::v1::BackendKind::Kubernetes => "kubernetes",
        ozfleet_proto::v1::BackendKind::Unspecified => "unknown",
    }
}

fn gauges(readings: &FleetReadings) -> Gauges {
    let mut max_concurrent = 0i64;
    let mut unlimited = false;
    let mut nodes = BTreeMap::new();
    let mut per_node = Vec::with_capacity(readings.nodes.len());
    for node in &readings.nodes {
        let state = match node.state {
            NodeState::Ready => {
                if node.max_concurrent_tasks == 0 {
                    unlimited = true;
                }
                max_concurrent += i64::from(node.max_concurrent_tasks);
                "ready"
            }
            NodeState::Draining => "draining",
            NodeState::Disconnected => "disconnected",
        };
        *nodes
            .entry((backend_name(node.backend), state))
            .or_insert(0) += 1;
        per_node.push((
            node.node_id.clone(),
            i64::from(node.active_tasks),
            i64::from(node.max_concurrent_tasks),
        ));
    }
    Gauges {
        connected: i64::from(readings.upstream_connected),
        tasks_active: i64::try_from(readings.tasks_active).unwrap_or(i64::MAX),
        max_concurrent: if unlimited { 0 } else { max_concurrent },
        nodes,
        per_node,
    }
}

/// How long one reading of the fleet serves the gauges: far less than any export
/// interval, far more than one collection takes.
const READING_REUSE: Duration = Duration::from_millis(500);

/// The fleet's gauges, read at most once per [`READING_REUSE`].
struct SharedReading {
    fleet: Weak<Fleet>,
    last: Mutex<Option<(Instant, Arc<Gauges>)>>,
}

impl SharedReading {
    fn gauges(&self) -> Option<Arc<Gauges>> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((taken, gauges)) = last.as_ref()
            && taken.elapsed() < READING_REUSE
        {
            return Some(gauges.clone());
        }
        let gauges = Arc::new(gauges(&self.fleet.upgrade()?.readings()));
        *last = Some((Instant::now(), gauges.clone()));
        Some(gauges)
    }
}

/// Registers the catalog and the fleet metrics on `meter`, fed by `fleet`.
pub fn register(meter: &Meter, fleet: &Arc<Fleet>, worker_id: &str) {
    let events = EventInstruments::new(meter);
    events.prime();
    fleet.observe(Box::new(move |event| events.record(event)));

    // One collection runs every callback below in a row: they share one reading.
    let shared = Arc::new(SharedReading {
        fleet: Arc::downgrade(fleet),
        last: Mutex::new(None),
    });
    let read = || {
        let shared = shared.clone();
        move || shared.gauges()
    };
    let gauges_now = read();
    meter
        .i64_observable_gauge("oz_worker_connected")
        .with_description(
            "1 while the worker has an active WebSocket connection to warp-server, 0 otherwise.",
        )
        .with_callback(move |observer| {
            if let Some(gauges) = gauges_now() {
                observer.observe(gauges.connected, &[]);
            }
        })
        .build();
    let gauges_now = read();
    meter
        .i64_observable_up_down_counter("oz_worker_tasks_active")
        .with_description("Number of tasks the worker is currently executing.")
        .with_callback(move |observer| {
            if let Some(gauges) = gauges_now() {
                observer.observe(gauges.tasks_active, &[]);
            }
        })
        .build();
    let gauges_now = read();
    meter
        .i64_observable_gauge("oz_worker_tasks_max_concurrent")
        .with_description(
            "Configured upper bound on concurrent tasks for this worker. 0 means unlimited.",
        )
        .with_callback(move |observer| {
            if let Some(gauges) = gauges_now() {
                observer.observe(gauges.max_concurrent, &[]);
            }
        })
        .build();
    let info = [
        KeyValue::new("version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("backend", BACKEND),
        KeyValue::new("worker_id", worker_id.to_owned()),
    ];
    meter
        .i64_observable_gauge("oz_worker_info")
        .with_description("Constant 1 with build/runtime metadata as labels.")
        .with_callback(move |observer| observer.observe(1, &info))
        .build();
    let gauges_now = read();
    meter
        .i64_observable_gauge("ozfleet_nodes_attached")
        .with_description("Nodes known to the gateway, by backend and state.")
        .with_callback(move |observer| {
            let Some(gauges) = gauges_now() else { return };
            for backend in ["direct", "docker", "kubernetes"] {
                for state in ["ready", "draining", "disconnected"] {
                    let count = gauges.nodes.get(&(backend, state)).copied().unwrap_or(0);
                    observer.observe(
                        count,
                        &[
                            KeyValue::new("backend", backend),
                            KeyValue::new("state", state),
                        ],
                    );
                }
            }
        })
        .build();
    let gauges_now = read();
    meter
        .i64_observable_gauge("ozfleet_node_tasks_active")
        .with_description("Tasks offered to or running on each node.")
        .with_callback(move |observer| {
            let Some(gauges) = gauges_now() else { return };
            for (node_id, active, _) in &gauges.per_node {
                observer.observe(*active, &[KeyValue::new("node_id", node_id.to_string())]);
            }
        })
        .build();
    let gauges_now = read();
    meter
        .i64_observable_gauge("ozfleet_node_capacity")
        .with_description("Each node's maximum concurrent tasks (0 = unlimited).")
        .with_callback(move |observer| {
            let Some(gauges) = gauges_now() else { return };
            for (node_id, _, capacity) in &gauges.per_node {
                observer.observe(*capacity, &[KeyValue::new("node_id", node_id.to_string())]);
            }
        })
        .build();
}
