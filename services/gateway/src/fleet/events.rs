//! What the fleet tells its observers: a stream of [`FleetEvent`]s on a bounded broadcast
//! and point-in-time [`FleetSnapshot`]s. The admin API, the metrics and the tests consume
//! these instead of log lines. Neither carries task contents (assignments hold
//! credentials): only ids, names and counts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ozfleet_proto::v1::BackendKind;

/// How many events a slow subscriber may fall behind before it misses some (it then gets
/// `RecvError::Lagged` and should re-read a snapshot).
pub const EVENT_BUFFER: usize = 4096;

/// How a task's run ended, as relayed to Oz.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskResult {
    Succeeded,
    /// `reason` is the Oz failure reason (`agent_invocation`, `unknown`, …).
    Failed {
        reason: String,
        exit_code: i32,
    },
    Cancelled,
}

/// Why the gateway sent `task_rejected` upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// No attached node had a free slot (or every candidate refused).
    NoCapacity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    UpstreamConnected,
    /// An established upstream connection ended.
    UpstreamDisconnected,
    /// A dial to Oz failed (refused, handshake rejected, timed out).
    UpstreamDialFailed,
    NodeAttached {
        node_id: Arc<str>,
        epoch: u64,
        /// The node was known (it reconnected); its earlier connection is fenced.
        reattached: bool,
    },
    NodeDetached {
        node_id: Arc<str>,
        epoch: u64,
    },
    NodeDraining {
        node_id: Arc<str>,
        draining: bool,
    },
    /// A node gone past the node-lost grace was dropped from the registry.
    NodeForgotten {
        node_id: Arc<str>,
    },
    /// An attach refused because another process holds the node id.
    NodeRefused {
        node_id: Arc<str>,
    },
    TaskOffered {
        task_id: String,
        execution_id: String,
        node_id: Arc<str>,
    },
    /// The node turned the offer down, or let it expire (`expired`).
    TaskRefused {
        task_id: String,
        node_id: Arc<str>,
        expired: bool,
    },
    TaskRejected {
        task_id: String,
        execution_id: String,
        reason: RejectReason,
    },
    /// `task_claimed` queued for Oz.
    TaskClaimed {
        task_id: String,
        execution_id: String,
        node_id: Arc<str>,
        /// From the assignment's arrival to this claim; `None` for a repeated claim.
        dispatch_latency: Option<Duration>,
    },
    /// The task runs on the node: it accepted the offer, or announced it after a restart
    /// (`adopted`).
    TaskStarted {
        task_id: String,
        execution_id: String,
        node_id: Arc<str>,
        adopted: bool,
    },
    TaskCancelRequested {
        task_id: String,
        /// An operator (admin API) rather than Oz.
        by_operator: bool,
    },
    /// The terminal report for the execution was queued for Oz (once per execution).
    /// `lost`: the gateway reported it because its node disappeared.
    TaskFinished {
        task_id: String,
        execution_id: String,
        node_id: Arc<str>,
        result: TaskResult,
        lost: bool,
        /// How long it ran on its node (zero if it never started).
        ran_for: Duration,
    },
    /// An assignment no node could take (too large for the node link, absurd ids) was
    /// failed upstream without an offer. `task_id` is cut to a loggable length.
    TaskInvalid {
        task_id: String,
        problem: String,
    },
    /// A cancellation dropped a task before any node claimed it: nothing runs or reports.
    TaskDropped {
        task_id: String,
        execution_id: String,
    },
    /// An outcome a node may not report (not given to it, or another node's) was dropped.
    OutcomeFenced {
        task_id: String,
        node_id: Arc<str>,
    },
    /// The terminal report was written to Oz and the node acknowledged.
    OutcomeRelayed {
        task_id: String,
        execution_id: String,
    },
}

impl FleetEvent {
    /// Whether [`super::Fleet::is_ready`] (upstream connected, a node connected) may differ
    /// after this event.
    pub fn may_change_readiness(&self) -> bool {
        matches!(
            self,
            Self::UpstreamConnected
                | Self::UpstreamDisconnected
                | Self::NodeAttached { .. }
                | Self::NodeDetached { .. }
                | Self::NodeForgotten { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Ready,
    Draining,
    Disconnected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub node_id: Arc<str>,
    pub name: String,
    pub backend: BackendKind,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    /// 0 = unlimited.
    pub max_concurrent_tasks: u32,
    pub active_tasks: u32,
    pub state: NodeState,
    /// Kept while the node is away, so a restarted agent stays drained.
    pub draining: bool,
    pub epoch: u64,
    /// When its current (or last) connection started.
    pub connected_since: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Sent to a node, not yet accepted.
    Offered,
    Running,
    /// Its node is gone; reported failed if the node does not return within the grace.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSnapshot {
    pub task_id: String,
    pub execution_id: String,
    pub node_id: Arc<str>,
    pub state: TaskState,
    /// When the task entered its current state.
    pub since: SystemTime,
    pub cancel_requested: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSnapshot {
    pub upstream_connected: bool,
    pub nodes: Vec<NodeSnapshot>,
    pub tasks: Vec<TaskSnapshot>,
}

/// What the metrics read from the fleet: counts and one small record per node, taken in
/// one pass without cloning names, labels or tasks (see [`super::Fleet::readings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetReadings {
    pub upstream_connected: bool,
    /// Tasks running, or held for a node that is away (what a snapshot shows as not
    /// `Offered`).
    pub tasks_active: usize,
    pub nodes: Vec<NodeReading>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReading {
    pub node_id: Arc<str>,
    pub backend: BackendKind,
    pub state: NodeState,
    pub active_tasks: u32,
    /// 0: unlimited.
    pub max_concurrent_tasks: u32,
}
