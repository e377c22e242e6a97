//! The gateway's fleet: a state machine over the node registry, the task ledger and the
//! placement index, driven by messages from Oz and from nodes and by one deadline loop.
//!
//! Every entry point takes the state lock, applies one transition and queues its effects
//! (messages to Oz through the outbox, messages to nodes through their stream senders,
//! [`FleetEvent`]s to subscribers); no lock is held across an await. Time is tokio's
//! clock, so tests drive offers, grace periods and expiries with paused time and no
//! sockets.
//!
//! Where each job lives:
//! - [`registry`]: attached nodes, connection epochs, identity;
//! - [`placement`]: which node gets a task (ordered index, least-loaded spread);
//! - [`ledger`]: tasks offered and running, finished executions, unsent outcomes, early
//!   cancellations;
//! - [`reconcile`]: what a node's hello (its full state) means for the ledger;
//! - [`deadlines`]: every timer, in one queue;
//! - [`oz_mapping`]: node outcomes → Oz messages;
//! - [`events`]: the event stream and snapshots observers read.
//!
//! Trust rule: a node's word counts only for executions it was given. An outcome is
//! relayed only for an execution this gateway placed on that node, or that the node
//! announced as running in a hello within the reattach window after the gateway started
//! (the tasks nodes keep across a gateway restart). Anything else is logged (ids only)
//! and dropped, so holding the join token is not enough to settle other runs.

mod deadlines;
pub mod events;
pub mod journal;
mod ledger;
mod oz_mapping;
pub mod placement;
mod reconcile;
mod registry;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::trace::{Span as _, Tracer as _};
use ozfleet_proto::oz::{TaskAssignment as OzAssignment, WorkerMessage};
use ozfleet_proto::v1::{
    self, AssignmentAccepted, AssignmentRefused, NodeHello, TaskOutcome, UpstreamSettings,
    attach_response,
};
use ozfleet_telemetry::task_span::{TaskEnd, end_task_span};
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::GatewayError;
use crate::outbox::{Outbox, Queued, Receipt};
use deadlines::{Deadline, Deadlines};
pub use events::{
    EVENT_BUFFER, FleetEvent, FleetReadings, FleetSnapshot, NodeReading, NodeSnapshot, NodeState,
    RejectReason, TaskResult, TaskSnapshot, TaskState,
};
use journal::{Journal, Recovered};
use ledger::{Phase, Task, TaskLedger};
use placement::PlacementIndex;
use registry::Sent;
pub use registry::{NODE_QUEUE, NodeSender, Outgoing};
use registry::{NodeRegistry, Registered};

/// The shortest offer timeout a fast-answering node gets (see [`offer_timeout_for`]).
const MIN_OFFER_TIMEOUT: Duration = Duration::from_secs(2);
/// How many of its usual answer times a node has to answer an offer.
const ANSWER_TIME_FACTOR: u32 = 50;
/// Largest assignment (Oz's `data` object) offered to a node. Nodes refuse gRPC messages
/// over 4 MiB, and an assignment they cannot decode would end their stream on every
/// offer; a bigger one is failed upstream instead, never offered.
pub const MAX_ASSIGNMENT_BYTES: usize = 1024 * 1024;
/// Longest task or execution id accepted from Oz.
pub const MAX_ID_BYTES: usize = 256;

/// How long `node` gets to answer an offer: the configured timeout, shortened for a node
/// that usually answers fast, so an offer to a node that went silent moves on quickly.
fn offer_timeout_for(configured: Duration, answer_time: Option<Duration>) -> Duration {
    match answer_time {
        Some(usual) => {
            (usual * ANSWER_TIME_FACTOR).clamp(MIN_OFFER_TIMEOUT.min(configured), configured)
        }
        None => configured,
    }
}

/// An id cut for logs: a hostile 1 MiB id must not be logged in full.
fn short(id: &str) -> std::borrow::Cow<'_, str> {
    const SHOWN: usize = 64;
    if id.len() <= SHOWN {
        return id.into();
    }
    let mut end = SHOWN;
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &id[..end], id.len()).into()
}
/// How long a cancellation for an unknown task is remembered.
const EARLY_CANCELLATION_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct FleetTimings {
    /// An offer not answered within this time is taken back and placed elsewhere.
    pub offer_timeout: Duration,
    /// A node gone this long has its running tasks reported failed upstream.
    pub node_lost_timeout: Duration,
    /// HTTP/2 ping interval on node connections; a node that does not answer within the
    /// same time is taken as gone. Without it, a node host that dies silently (power
    /// loss, a firewall dropping the flow) would look connected forever.
    pub node_keepalive: Duration,
    /// After the gateway starts, how long nodes may announce running tasks it does not
    /// know (tasks they kept across a gateway restart) and have them adopted. Later, such
    /// a claim is refused: the node is told to stop the task.
    pub reattach_window: Duration,
}

impl Default for FleetTimings {
    fn default() -> Self {
        Self {
            offer_timeout: Duration::from_secs(10),
            node_lost_timeout: Duration::from_secs(60),
            node_keepalive: Duration::from_secs(20),
            reattach_window: Duration::from_secs(60),
        }
    }
}

pub struct Fleet {
    state: Mutex<FleetState>,
    /// Wakes the deadline loop when a deadline was scheduled before the one it sleeps for.
    deadline_scheduled: Notify,
    events: broadcast::Sender<FleetEvent>,
    readiness_inputs: watch::Sender<()>,
}

/// Sees every event as it happens, under the fleet's lock: it must be quick and must not
/// call back into the fleet (metrics counters are the use).
pub type FleetObserver = Box<dyn Fn(&FleetEvent) + Send + Sync>;

struct FleetState {
    /// Synchronous observers: unlike broadcast subscribers they can never miss an event.
    observers: Vec<FleetObserver>,
    registry: NodeRegistry,
    ledger: TaskLedger,
    placement: PlacementIndex,
    deadlines: Deadlines,
    upstream_connected: bool,
    /// End of the window in which unknown running tasks announced by nodes are adopted.
    adopt_until: Instant,
    /// When the deadline loop next reads the queue on its own (`None`: only when woken).
    deadline_loop_reads_at: Option<Instant>,
    /// Set when a transition scheduled a deadline before that, so the loop is woken to
    /// re-read the queue. A later one wakes nothing: every offer schedules its timeout,
    /// and most are later than what the loop already waits for.
    deadline_added: bool,
    outbox: Arc<Outbox>,
    events: broadcast::Sender<FleetEvent>,
    /// Marked changed by the events that can change [`Fleet::is_ready`] only, so whoever
    /// follows readiness is not woken by every task's events.
    readiness_inputs: watch::Sender<()>,
    settings: UpstreamSettings,
    timings: FleetTimings,
    /// Traces one span per task when set ([`Fleet::trace_with`]).
    tracer: Option<BoxedTracer>,
    /// Records what is handed out, for the next start of the gateway.
    journal: Journal,
    /// Executions an earlier run of this gateway handed out and did not settle, by node:
    /// their nodes' word about them is trusted, and Oz's re-offers of them wait for them.
    recovered: Recovered,
    /// Re-offers of recovered executions whose node has not reattached yet.
    held: HashMap<String, Held>,
    /// Most nodes kept; a new node id beyond it is refused.
    max_nodes: usize,
}

/// An assignment held until its execution's node is back (or the node-lost grace ends).
struct Held {
    execution_id: String,
    title: String,
    raw_json: Vec<u8>,
    node_id: Arc<str>,
}

impl Fleet {
    pub fn new(
        outbox: Arc<Outbox>,
        settings: UpstreamSettings,
        timings: FleetTimings,
    ) -> Arc<Self> {
        Self::with_journal(
            outbox,
            settings,
            timings,
            Journal::disabled(),
            Recovered::new(),
        )
    }

    /// A fleet that journals what it hands out, starting from what an earlier run of the
    /// gateway left open (see [`journal`]).
    pub fn with_journal(
        outbox: Arc<Outbox>,
        settings: UpstreamSettings,
        timings: FleetTimings,
        journal: Journal,
        recovered: Recovered,
    ) -> Arc<Self> {
        if !recovered.is_empty() {
            info!(
                executions = recovered.len(),
                "Executions handed out before the restart; waiting for their nodes"
            );
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (readiness_inputs, _) = watch::channel(());
        Arc::new(Self {
            state: Mutex::new(FleetState {
                observers: Vec::new(),
                registry: NodeRegistry::default(),
                ledger: TaskLedger::default(),
                placement: PlacementIndex::default(),
                deadlines: Deadlines::default(),
                upstream_connected: false,
                // With a journal the gateway knows what it handed out and adopts nothing
                // else; without one, it takes nodes at their word for a while after start.
                adopt_until: if journal.is_enabled() {
                    Instant::now()
                } else {
                    Instant::now() + timings.reattach_window
                },
                deadline_loop_reads_at: None,
                deadline_added: false,
                outbox,
                events: events.clone(),
                readiness_inputs: readiness_inputs.clone(),
                settings,
                timings,
                tracer: None,
                journal,
                recovered,
                held: HashMap::new(),
                max_nodes: usize::MAX,
            }),
            deadline_scheduled: Notify::new(),
            events,
            readiness_inputs,
        })
    }

    /// The state, even after a panic interrupted an earlier update: each transition
    /// leaves the state consistent between its steps, and one bad message must not take
    /// the gateway (and every task it relays) down.
    fn lock(&self) -> MutexGuard<'_, FleetState> {
        self.state.lock().unwrap_or_else(|poisoned| {
            error!("A panic interrupted an update of the fleet state; carrying on");
            self.state.clear_poison();
            poisoned.into_inner()
        })
    }

    /// Applies one transition, then wakes the deadline loop if it scheduled a deadline.
    fn apply<R>(&self, transition: impl FnOnce(&mut FleetState) -> R) -> R {
        let mut state = self.lock();
        let result = transition(&mut state);
        let wake = std::mem::take(&mut state.deadline_added);
        drop(state);
        if wake {
            self.deadline_scheduled.notify_one();
        }
        result
    }

    /// Records one `oz_worker.task` span per task from now on, its context carried to the
    /// node in the assignment.
    pub fn trace_with(&self, tracer: BoxedTracer) {
        self.apply(|state| state.tracer = Some(tracer));
    }

    /// Calls `observer` with every event from now on, synchronously (see [`FleetObserver`]).
    pub fn observe(&self, observer: FleetObserver) {
        self.apply(|state| state.observers.push(observer));
    }

    /// Events from now on. A subscriber that falls more than [`EVENT_BUFFER`] events
    /// behind misses some and is told so (`Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }

    /// Changes whenever [`Fleet::is_ready`] may have changed (the upstream connected or
    /// lost, a node attached, detached or forgotten); never for task events.
    pub fn readiness_inputs(&self) -> watch::Receiver<()> {
        self.readiness_inputs.subscribe()
    }

    /// Whether the gateway can take work: connected to Oz, with a node attached. Cheap
    /// (no snapshot): readiness is re-read on every attach and detach, and a snapshot per
    /// attach would cost O(nodes²) while a whole fleet re-attaches.
    pub fn is_ready(&self) -> bool {
        let state = self.lock();
        state.upstream_connected && state.registry.values().any(|node| node.is_connected())
    }

    /// What the metrics read, in one pass under the lock: with 10,000 nodes a full
    /// snapshot (names, labels, sorted) held the lock long enough to show in claim
    /// latency at every metrics collection.
    pub fn readings(&self) -> FleetReadings {
        let state = self.lock();
        let tasks_active = state
            .ledger
            .tasks
            .values()
            .filter(|task| match &task.node_id {
                None => false,
                Some(node_id) => {
                    task.phase == Phase::Running
                        || !state
                            .registry
                            .get(node_id)
                            .is_some_and(|node| node.is_connected())
                }
            })
            .count();
        FleetReadings {
            upstream_connected: state.upstream_connected,
            tasks_active,
            nodes: state.registry.values().map(|node| node.reading()).collect(),
        }
    }

    /// Nodes (attached, or away within the grace) and the tasks they hold.
    pub fn snapshot(&self) -> FleetSnapshot {
        let state = self.lock();
        let mut nodes: Vec<NodeSnapshot> = state
            .registry
            .values()
            .map(|node| node.snapshot())
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let mut tasks = state.ledger.snapshot(|node_id| {
            state
                .registry
                .get(node_id)
                .is_some_and(|node| node.is_connected())
        });
        tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        FleetSnapshot {
            upstream_connected: state.upstream_connected,
            nodes,
            tasks,
        }
    }

    // ---- Oz → gateway -------------------------------------------------------------

    pub fn set_upstream_connected(&self, connected: bool) {
        self.apply(|state| {
            if state.upstream_connected != connected {
                state.upstream_connected = connected;
                state.emit(if connected {
                    FleetEvent::UpstreamConnected
                } else {
                    FleetEvent::UpstreamDisconnected
                });
            }
        });
    }

    /// A dial to Oz failed (for the reconnect metrics).
    pub fn upstream_dial_failed(&self) {
        self.apply(|state| state.emit(FleetEvent::UpstreamDialFailed));
    }

    pub fn on_assignment(&self, assignment: &OzAssignment, raw_json: &[u8]) {
        self.apply(|state| state.on_assignment(assignment, raw_json));
    }

    pub fn on_cancellation(&self, task_id: &str) {
        self.apply(|state| state.on_cancellation(task_id));
    }

    /// Called once `queued` has been written to Oz: acknowledges the outcome it relays.
    pub fn relayed(&self, queued: &Queued) {
        if let Some(receipt) = &queued.receipt {
            self.apply(|state| state.relayed(receipt));
        }
    }

    // ---- nodes → gateway ----------------------------------------------------------

    /// Registers a (re)connected node and reconciles against the full state it announced.
    /// Returns the connection's epoch.
    pub fn attach(&self, hello: &NodeHello, stream: NodeSender) -> Result<u64, GatewayError> {
        self.apply(|state| state.attach(hello, stream))
    }

    pub fn on_accepted(&self, node_id: &str, epoch: u64, accepted: AssignmentAccepted) {
        self.apply(|state| {
            if state.is_current(node_id, epoch) {
                state.on_accepted(node_id, accepted);
            }
        });
    }

    pub fn on_refused(&self, node_id: &str, epoch: u64, refused: AssignmentRefused) {
        self.apply(|state| {
            if state.is_current(node_id, epoch) {
                state.on_refused(node_id, refused);
            }
        });
    }

    pub fn on_outcome(&self, node_id: &str, epoch: u64, outcome: TaskOutcome) {
        self.apply(|state| {
            if state.is_current(node_id, epoch) {
                state.heard_from(node_id, &outcome.task_id);
                state.settle(node_id, outcome);
            }
        });
    }

    /// The node's connection `epoch` ended. Its running tasks wait for it to return (up to
    /// the node-lost timeout); offers it had not answered stay with it until their offer
    /// timeout, since it may have accepted them just before the connection broke: placing
    /// them elsewhere at once could run a task twice.
    pub fn detach(&self, node_id: &str, epoch: u64) {
        self.apply(|state| state.detach(node_id, epoch));
    }

    // ---- operators ----------------------------------------------------------------

    /// Drains (no new tasks; running ones finish) or undrains a node. The drain is kept
    /// while the node is away and applies again when it reattaches.
    pub fn set_draining(&self, node_id: &str, draining: bool) -> Result<(), GatewayError> {
        self.apply(|state| {
            let Some(node) = state.registry.get_mut(node_id) else {
                return Err(GatewayError::UnknownNode(node_id.to_owned()));
            };
            if node.draining != draining {
                node.draining = draining;
                let node_id = node.node_id.clone();
                info!(%node_id, draining, "Node drain changed");
                state.refresh_placement(&node_id);
                state.emit(FleetEvent::NodeDraining { node_id, draining });
            }
            Ok(())
        })
    }

    /// An operator cancels a task: its node stops it, and Oz gets one `task_failed` with
    /// reason `task_cancelled` (or the task's true outcome if it ended first).
    pub fn cancel_by_operator(&self, task_id: &str) -> Result<TaskSnapshot, GatewayError> {
        self.apply(|state| state.cancel_by_operator(task_id))
    }

    /// One node, as [`Fleet::snapshot`] shows it.
    pub fn node(&self, node_id: &str) -> Option<NodeSnapshot> {
        self.lock()
            .registry
            .get(node_id)
            .map(|node| node.snapshot())
    }

    /// One task, as [`Fleet::snapshot`] shows it.
    pub fn task(&self, task_id: &str) -> Option<TaskSnapshot> {
        let state = self.lock();
        state.task_snapshot(task_id)
    }

    /// Refuses new node ids once `max_nodes` nodes are known (attached or within the
    /// grace), so a flood of identities cannot exhaust memory.
    pub fn limit_nodes(&self, max_nodes: usize) {
        self.apply(|state| state.max_nodes = max_nodes);
    }

    /// How far the journal is on disk, when the fleet journals (a state dir): what leaves
    /// for a node or for Oz waits for the entries made before it.
    pub fn journal_durability(&self) -> Option<journal::Durability> {
        let state = self.lock();
        state
            .journal
            .is_enabled()
            .then(|| state.journal.durability())
    }

    /// No more journal entries (the gateway is stopping); its writer then ends.
    pub fn close_journal(&self) {
        self.apply(|state| state.journal.close());
    }

    /// Closes every node stream (gateway shutdown); nodes keep their tasks and reconnect.
    pub fn close_node_streams(&self) {
        self.apply(|state| {
            for node in state.registry.values_mut() {
                node.stream = None;
            }
            state.placement = PlacementIndex::default();
        });
    }

    // ---- time -----------------------------------------------------------------------

    /// Fires every deadline as it comes due, until `shutdown`. The fleet's only timer.
    pub async fn run_deadlines(&self, shutdown: CancellationToken) {
        loop {
            let next = {
                let mut state = self.lock();
                let next = state.deadlines.next();
                state.deadline_loop_reads_at = next;
                next
            };
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                () = self.deadline_scheduled.notified() => {}
                () = shutdown.cancelled() => return,
            }
            self.fire_due(Instant::now());
        }
    }

    /// Applies every deadline due at `now`.
    fn fire_due(&self, now: Instant) {
        self.apply(|state| {
            while let Some(deadline) = state.deadlines.pop_due(now) {
                match deadline {
                    Deadline::OfferExpires { task_id, offer } => {
                        state.offer_expired(&task_id, offer)
                    }
                    Deadline::NodeLost { node_id, epoch } => state.node_lost(&node_id, epoch),
                    Deadline::QuietNode { node_id, epoch } => {
                        state.quiet_node_check(&node_id, epoch)
                    }
                    Deadline::HoldExpires { task_id } => state.release(&task_id),
                    Deadline::EarlyCancellationExpires { task_id } => {
                        state.ledger.take_early_cancellation(&task_id);
                    }
                }
            }
        });
    }
}

impl FleetState {
    /// A new `oz_worker.task` span (the reference's name and attributes), when tracing.
    fn task_span(&self, task_id: &str, title: Option<&str>, adopted: bool) -> Option<BoxedSpan> {
        let tracer = self.tracer.as_ref()?;
        let mut attributes = vec![KeyValue::new("task.id", task_id.to_owned())];
        if let Some(title) = title {
            attributes.push(KeyValue::new("task.title", title.to_owned()));
        }
        if adopted {
            attributes.push(KeyValue::new("ozfleet.adopted", true));
        }
        let mut span = tracer.build(
            tracer
                .span_builder("oz_worker.task")
                .with_attributes(attributes),
        );
        if !adopted {
            span.add_event(
                "task.assigned",
                vec![
                    KeyValue::new("worker.id", self.settings.worker_id.clone()),
                    KeyValue::new("worker.backend", crate::metrics::BACKEND),
                    KeyValue::new("task.id", task_id.to_owned()),
                ],
            );
        }
        Some(span)
    }

    /// Adds a span event to the task's span, if it has one.
    fn span_event(&mut self, task_id: &str, name: &'static str, attributes: Vec<KeyValue>) {
        if let Some(span) = self
            .ledger
            .tasks
            .get_mut(task_id)
            .and_then(|task| task.span.as_mut())
        {
            span.add_event(name, attributes);
        }
    }

    fn task_snapshot(&self, task_id: &str) -> Option<TaskSnapshot> {
        let task = self.ledger.tasks.get(task_id)?;
        let node_id = task.node_id.clone()?;
        let connected = self
            .registry
            .get(&node_id)
            .is_some_and(|node| node.is_connected());
        Some(ledger::task_snapshot(task_id, task, node_id, connected))
    }

    fn cancel_by_operator(&mut self, task_id: &str) -> Result<TaskSnapshot, GatewayError> {
        if !self.request_cancel(task_id, true) {
            return Err(GatewayError::UnknownTask(task_id.to_owned()));
        }
        self.task_snapshot(task_id)
            .ok_or_else(|| GatewayError::UnknownTask(task_id.to_owned()))
    }

    /// Marks a known task cancelled and tells its node; false when no such task is held.
    fn request_cancel(&mut self, task_id: &str, by_operator: bool) -> bool {
        let Some(task) = self.ledger.tasks.get_mut(task_id) else {
            return false;
        };
        task.cancel_requested = true;
        task.cancelled_by_operator |= by_operator;
        let node_id = task.node_id.clone();
        let execution_id = task.execution_id.clone();
        let source = if by_operator { "operator" } else { "server" };
        info!(
            task_id,
            node_id = node_id.as_deref(),
            source,
            "Cancellation requested"
        );
        self.emit(FleetEvent::TaskCancelRequested {
            task_id: task_id.to_owned(),
            by_operator,
        });
        self.span_event(
            task_id,
            "task.cancellation_requested",
            vec![
                KeyValue::new("source", source),
                KeyValue::new("task.id", task_id.to_owned()),
            ],
        );
        // A disconnected node gets it again from reconciliation when it returns.
        if let Some(node_id) = node_id {
            self.cancel_on(&node_id, task_id, &execution_id);
        }
        true
    }

    fn emit(&self, event: FleetEvent) {
        for observer in &self.observers {
            observer(&event);
        }
        if event.may_change_readiness() {
            self.readiness_inputs.send_replace(());
        }
        // No subscriber is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    fn schedule(&mut self, after: Duration, deadline: Deadline) -> deadlines::DeadlineKey {
        let now = Instant::now();
        let at = now + after;
        if self
            .deadline_loop_reads_at
            .is_none_or(|reads_at| at < reads_at)
        {
            self.deadline_added = true;
            // Woken, the loop reads the queue now: later deadlines need no other wake.
            self.deadline_loop_reads_at = Some(now);
        }
        self.deadlines.schedule(at, deadline)
    }

    fn is_current(&self, node_id: &str, epoch: u64) -> bool {
        let current = self.registry.is_current(node_id, epoch);
        if !current {
            debug!(node_id, epoch, "Dropping a message from a stale connection");
        }
        current
    }

    /// Puts the node in the placement index with its current load, or takes it out.
    fn refresh_placement(&mut self, node_id: &str) {
        match self.registry.get(node_id) {
            Some(node) if node.is_eligible() => {
                self.placement
                    .update(&node.node_id, node.seq, node.standing())
            }
            _ => self.placement.remove(node_id),
        }
    }

    /// Queues a message for a node; a node whose queue is full is disconnected (it
    /// reconnects with its full state, which reconciliation squares).
    fn send_to(&mut self, node_id: &str, message: attach_response::Kind) {
        let Some(node) = self.registry.get(node_id) else {
            return;
        };
        if node.send(message, self.journal.mark()) == Sent::Overflowed {
            let epoch = node.epoch;
            warn!(
                node_id,
                "Node does not read its stream ({NODE_QUEUE} messages queued); dropping its connection"
            );
            self.detach(node_id, epoch);
        }
    }

    fn cancel_on(&mut self, node_id: &str, task_id: &str, execution_id: &str) {
        self.send_to(
            node_id,
            attach_response::Kind::Cancellation(v1::TaskCancellation {
                task_id: task_id.to_owned(),
                execution_id: execution_id.to_owned(),
            }),
        );
    }

    fn claim(
        &self,
        task_id: &str,
        execution_id: &str,
        node_id: &Arc<str>,
        dispatch_latency: Option<Duration>,
    ) {
        self.outbox
            .push(WorkerMessage::claimed(task_id, &self.settings.worker_id));
        self.emit(FleetEvent::TaskClaimed {
            task_id: task_id.to_owned(),
            execution_id: execution_id.to_owned(),
            node_id: node_id.clone(),
            dispatch_latency,
        });
    }

    fn on_assignment(&mut self, assignment: &OzAssignment, raw_json: &[u8]) {
        let task_id = assignment.task_id.as_str();
        if let Some(existing) = self.ledger.tasks.get(task_id) {
            match (existing.phase, &existing.node_id) {
                (Phase::Running, Some(node_id)) => {
                    // Oz offers again what it has not seen claimed (the claim may have
                    // been lost with a connection). The execution that runs carries on;
                    // claiming again tells Oz where the task is.
                    info!(
                        task_id,
                        execution_id = assignment.execution_id,
                        running_execution_id = existing.execution_id,
                        "Assignment for a task already running here; claiming it again"
                    );
                    let (execution_id, node_id) = (existing.execution_id.clone(), node_id.clone());
                    self.claim(task_id, &execution_id, &node_id, None);
                }
                _ => warn!(
                    task_id,
                    execution_id = assignment.execution_id,
                    "Ignoring an assignment for a task that is being placed"
                ),
            }
            return;
        }
        if self.ledger.is_finished(task_id, &assignment.execution_id) {
            // Its terminal report was sent already: running it again would run one
            // execution twice. (Retries come as new executions.)
            warn!(
                task_id = %short(task_id),
                execution_id = %short(&assignment.execution_id),
                "Ignoring an assignment for an execution this gateway already reported as ended"
            );
            return;
        }
        if let Some(problem) = oversized(assignment, raw_json) {
            warn!(task_id = %short(task_id), "Failing an assignment no node could take: {problem}");
            let message = WorkerMessage::failed(
                task_id,
                ozfleet_proto::oz::FailureReason::Unknown,
                ozfleet_proto::oz::failed_to_execute_message(&problem),
                0,
            );
            self.emit(FleetEvent::TaskInvalid {
                task_id: short(task_id).into_owned(),
                problem,
            });
            self.outbox.push(message);
            return;
        }
        let key = (task_id.to_owned(), assignment.execution_id.clone());
        if let Some(node_id) = self.recovered.get(&key).cloned() {
            let node_back = self
                .registry
                .get(&node_id)
                .is_some_and(|node| node.is_connected());
            if !node_back {
                // Handed out before the restart to a node not back yet: starting it
                // elsewhere could run it twice. Wait for the node (or the grace).
                info!(task_id, %node_id, "Holding a re-offer until its node is back");
                self.held.insert(
                    task_id.to_owned(),
                    Held {
                        execution_id: assignment.execution_id.clone(),
                        title: assignment.task.title.clone(),
                        raw_json: raw_json.to_vec(),
                        node_id,
                    },
                );
                self.schedule(
                    self.timings.node_lost_timeout,
                    Deadline::HoldExpires {
                        task_id: task_id.to_owned(),
                    },
                );
                return;
            }
            // Its node is back and did not announce it (it would be in the ledger).
            self.recovered.remove(&key);
        }
        self.admit(
            task_id,
            &assignment.execution_id,
            &assignment.task.title,
            raw_json,
        );
    }

    /// Takes a new task into the ledger and places it.
    fn admit(&mut self, task_id: &str, execution_id: &str, title: &str, raw_json: &[u8]) {
        // Per-task lines at info are one per operator-relevant transition: claimed on a
        // node, finished (or rejected, lost). The steps in between are debug.
        debug!(task_id, title, "Task assigned by Oz");
        self.ledger.tasks.insert(
            task_id.to_owned(),
            Task {
                execution_id: execution_id.to_owned(),
                node_id: None,
                phase: Phase::Offered { offer: 0 },
                cancel_requested: false,
                cancelled_by_operator: false,
                assignment_json: Some(Arc::from(raw_json)),
                refused_by: HashSet::new(),
                offer_deadline: None,
                since: SystemTime::now(),
                assigned_at: Some(Instant::now()),
                running_since: None,
                offered_at: None,
                span: self.task_span(task_id, Some(title), false),
            },
        );
        self.place(task_id);
    }

    /// A held re-offer goes on: claimed where it runs if its node announced it, placed
    /// like any task otherwise.
    fn release(&mut self, task_id: &str) {
        let Some(held) = self.held.remove(task_id) else {
            return;
        };
        self.recovered
            .remove(&(task_id.to_owned(), held.execution_id.clone()));
        match self.ledger.tasks.get(task_id) {
            Some(task) if task.execution_id == held.execution_id => {
                if let (Phase::Running, Some(node_id)) = (task.phase, task.node_id.clone()) {
                    info!(task_id, %node_id, "Held re-offer runs on its node; claiming it");
                    let execution_id = held.execution_id.clone();
                    self.claim(task_id, &execution_id, &node_id, None);
                }
            }
            Some(_) => warn!(task_id, "Held re-offer superseded by another execution"),
            None if self.ledger.is_finished(task_id, &held.execution_id) => {}
            None => self.admit(task_id, &held.execution_id, &held.title, &held.raw_json),
        }
    }

    /// After node `node_id` reattached and was reconciled: its held re-offers go on, and
    /// the recovered executions it did not announce are no longer expected.
    fn node_back(&mut self, node_id: &Arc<str>) {
        let held: Vec<String> = self
            .held
            .iter()
            .filter(|(_, held)| held.node_id == *node_id)
            .map(|(task_id, _)| task_id.clone())
            .collect();
        for task_id in held {
            self.release(&task_id);
        }
        self.recovered.retain(|_, owner| owner != node_id);
    }

    fn on_cancellation(&mut self, task_id: &str) {
        if self.request_cancel(task_id, false) {
            return;
        }
        if self.ledger.remember_early_cancellation(task_id) {
            warn!(
                task_id,
                "Cancellation for a task not known here; applying it if a node announces the task"
            );
            self.schedule(
                EARLY_CANCELLATION_TTL,
                Deadline::EarlyCancellationExpires {
                    task_id: task_id.to_owned(),
                },
            );
        } else {
            warn!(
                task_id,
                "Cancellation for an unknown task dropped: too many pending"
            );
        }
    }

    /// Offers the task to the best node, or rejects it upstream if no node can take it.
    fn place(&mut self, task_id: &str) {
        loop {
            let Some(task) = self.ledger.tasks.get(task_id) else {
                return;
            };
            let picked = self
                .placement
                .pick(|node_id| !task.refused_by.contains(node_id));
            let Some(node_id) = picked else {
                self.reject(task_id);
                return;
            };
            if self
                .registry
                .get(&node_id)
                .is_none_or(|node| !node.is_eligible())
            {
                error!(%node_id, "Placement index held a node that cannot take tasks; repairing");
                self.placement.remove(&node_id);
                continue;
            }
            self.offer(task_id, node_id);
            return;
        }
    }

    fn reject(&mut self, task_id: &str) {
        // A rejection does not settle the run: Oz offers it again, and a node that turns
        // out to run this execution (kept across a gateway restart) is adopted, not stopped.
        let Some(task) = self.ledger.take(task_id) else {
            return;
        };
        // No node holds it any more.
        self.journal.settled(task_id, &task.execution_id);
        if let Some(mut span) = task.span {
            span.add_event(
                "task.rejected",
                vec![KeyValue::new("reason", "at_capacity")],
            );
            span.end();
        }
        info!(task_id, "No node can take the task; rejecting it");
        self.outbox
            .push(WorkerMessage::rejected_at_capacity(task_id));
        self.emit(FleetEvent::TaskRejected {
            task_id: task_id.to_owned(),
            execution_id: task.execution_id,
            reason: RejectReason::NoCapacity,
        });
    }

    fn offer(&mut self, task_id: &str, node_id: Arc<str>) {
        let offer = self.ledger.next_offer();
        let answer_time = self
            .registry
            .get(&node_id)
            .and_then(|node| node.answer_time);
        let deadline = self.schedule(
            offer_timeout_for(self.timings.offer_timeout, answer_time),
            Deadline::OfferExpires {
                task_id: task_id.to_owned(),
                offer,
            },
        );
        let Some(task) = self.ledger.tasks.get_mut(task_id) else {
            return;
        };
        task.node_id = Some(node_id.clone());
        task.phase = Phase::Offered { offer };
        self.journal.given(task_id, &task.execution_id, &node_id);
        task.offer_deadline = Some(deadline);
        task.offered_at = Some(Instant::now());
        task.since = SystemTime::now();
        let trace_context = match task.span.as_mut() {
            Some(span) => {
                span.add_event(
                    "task.offered",
                    vec![KeyValue::new("node.id", node_id.to_string())],
                );
                ozfleet_telemetry::propagation::inject(span.span_context())
            }
            None => Default::default(),
        };
        let message = attach_response::Kind::Assignment(v1::TaskAssignment {
            task_id: task_id.to_owned(),
            execution_id: task.execution_id.clone(),
            oz_assignment_json: task
                .assignment_json
                .as_deref()
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
            settings: Some(self.settings.clone()),
            trace_context,
        });
        let execution_id = task.execution_id.clone();
        if let Some(node) = self.registry.get_mut(&node_id) {
            node.tasks.insert(task_id.to_owned());
            node.last_placed = offer;
            debug!(task_id, %node_id, node_name = node.name, "Offering task to node");
        }
        self.refresh_placement(&node_id);
        // After the bookkeeping: an overflow detaches the node, and its offer then waits
        // for the offer timeout like any offer to a node that went away.
        self.send_to(&node_id, message);
        self.emit(FleetEvent::TaskOffered {
            task_id: task_id.to_owned(),
            execution_id,
            node_id,
        });
    }

    fn offer_expired(&mut self, task_id: &str, offer: u64) {
        let Some(task) = self.ledger.tasks.get_mut(task_id) else {
            return;
        };
        if task.phase != (Phase::Offered { offer }) {
            return;
        }
        task.offer_deadline = None;
        let Some(node_id) = task.node_id.clone() else {
            return;
        };
        warn!(task_id, %node_id, "Node did not answer the offer in time; placing elsewhere");
        self.emit(FleetEvent::TaskRefused {
            task_id: task_id.to_owned(),
            node_id: node_id.clone(),
            expired: true,
        });
        self.take_back(task_id, true);
        let Some(node) = self.registry.get_mut(&node_id) else {
            return;
        };
        node.unanswered_offers += 1;
        if node.unanswered_offers == 1 && node.is_connected() {
            // Quiet: no new offers until it answers anything. A node still silent an offer
            // timeout later has its connection dropped: an agent that is merely slow
            // reconnects with a fresh full state, one that is stuck stays away.
            let epoch = node.epoch;
            info!(%node_id, "Node is quiet; no new offers until it answers");
            self.refresh_placement(&node_id);
            self.schedule(
                self.timings.offer_timeout,
                Deadline::QuietNode { node_id, epoch },
            );
        }
    }

    fn quiet_node_check(&mut self, node_id: &str, epoch: u64) {
        let still_quiet = self.registry.get(node_id).is_some_and(|node| {
            node.epoch == epoch && node.is_connected() && node.unanswered_offers > 0
        });
        if still_quiet {
            warn!(
                node_id,
                "Node stayed silent after an unanswered offer; dropping its connection"
            );
            self.detach(node_id, epoch);
        }
    }

    /// The node answered something (an acceptance, a refusal, an outcome).
    fn heard_from(&mut self, node_id: &str, task_id: &str) {
        let offered_for = self
            .ledger
            .tasks
            .get(task_id)
            .filter(|task| task.node_id.as_deref() == Some(node_id))
            .and_then(|task| task.offered_at)
            .map(|at| at.elapsed());
        let was_quiet = self.registry.get_mut(node_id).is_some_and(|node| {
            let was_quiet = node.unanswered_offers > 0;
            node.heard(offered_for);
            was_quiet
        });
        if was_quiet {
            info!(node_id, "Quiet node answered again; it takes offers again");
            self.refresh_placement(node_id);
        }
    }

    /// Withdraws an unclaimed offer from its node and places the task again (elsewhere
    /// when `exclude_node`).
    fn take_back(&mut self, task_id: &str, exclude_node: bool) {
        let Some(task) = self.ledger.tasks.get_mut(task_id) else {
            return;
        };
        let node_id = task.node_id.take();
        if let Some(key) = task.offer_deadline.take() {
            self.deadlines.withdraw(key);
        }
        if exclude_node && let Some(node_id) = &node_id {
            task.refused_by.insert(node_id.clone());
        }
        let cancelled = task.cancel_requested;
        let by_operator = task.cancelled_by_operator;
        if let Some(node_id) = node_id {
            if let Some(node) = self.registry.get_mut(&node_id) {
                node.tasks.remove(task_id);
            }
            self.refresh_placement(&node_id);
        }
        if by_operator {
            // Oz assigned it and no node will run it: Oz must hear how it ended.
            if let Some(task) = self.ledger.take(task_id) {
                self.ledger
                    .remember_finished(task_id, &task.execution_id, None);
                let message = oz_mapping::operator_cancelled(task_id);
                self.journal.settled(task_id, &task.execution_id);
                let ran_for = task.ran_for();
                end_span(task.span, &message);
                self.emit(FleetEvent::TaskFinished {
                    task_id: task_id.to_owned(),
                    node_id: Arc::from(""),
                    result: oz_mapping::result_of(&message),
                    lost: false,
                    ran_for,
                    execution_id: task.execution_id,
                });
                self.outbox.push(message);
            }
            return;
        }
        if cancelled {
            // Oz cancelled it before any node claimed it: nothing is left to run or report.
            info!(task_id, "Dropping a task cancelled before it was claimed");
            if let Some(task) = self.ledger.take(task_id) {
                self.ledger
                    .remember_finished(task_id, &task.execution_id, None);
                self.journal.settled(task_id, &task.execution_id);
                if let Some(mut span) = task.span {
                    span.add_event("task.dropped", Vec::new());
                    span.end();
                }
                self.emit(FleetEvent::TaskDropped {
                    task_id: task_id.to_owned(),
                    execution_id: task.execution_id,
                });
            }
            return;
        }
        self.place(task_id);
    }

    fn attach(&mut self, hello: &NodeHello, stream: NodeSender) -> Result<u64, GatewayError> {
        if self.registry.is_held_by_another_process(hello) {
            warn!(
                node_id = hello.node_id,
                "Refusing a second agent process with the same node id"
            );
            self.emit(FleetEvent::NodeRefused {
                node_id: Arc::from(hello.node_id.as_str()),
            });
            return Err(GatewayError::DuplicateNode(hello.node_id.clone()));
        }
        if self.registry.get(&hello.node_id).is_none() && self.registry.len() >= self.max_nodes {
            warn!(
                node_id = hello.node_id,
                "Refusing a node: the node limit is reached"
            );
            return Err(GatewayError::TooManyNodes(self.max_nodes));
        }
        let (node_id, epoch, registered) = self.registry.register(hello, stream, SystemTime::now());
        let Some(node) = self.registry.get_mut(&node_id) else {
            return Err(GatewayError::InvalidNode(format!(
                "node {node_id} vanished while attaching"
            )));
        };
        // A fresh queue: the welcome always fits. It waits for no journal entry.
        node.send(
            attach_response::Kind::Welcome(v1::Welcome {
                epoch,
                worker_id: self.settings.worker_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            }),
            0,
        );
        if let Some(key) = node.lost_deadline.take() {
            self.deadlines.withdraw(key);
        }
        let reattached = matches!(registered, Registered::Reattached { .. });
        if let Registered::Reattached {
            previous_stream_open: true,
        } = registered
        {
            info!(%node_id, epoch, "Node reconnected; fencing its previous connection");
        }
        info!(
            %node_id,
            node_name = hello.node_name,
            epoch,
            backend = hello.backend().as_str_name(),
            max_concurrent_tasks = hello.max_concurrent_tasks,
            running = hello.running_tasks.len(),
            version = hello.version,
            "Node attached"
        );
        self.emit(FleetEvent::NodeAttached {
            node_id: node_id.clone(),
            epoch,
            reattached,
        });
        self.reconcile(&node_id, hello);
        self.node_back(&node_id);
        self.refresh_placement(&node_id);
        Ok(epoch)
    }

    fn detach(&mut self, node_id: &str, epoch: u64) {
        let Some(node) = self.registry.get_mut(node_id) else {
            return;
        };
        if node.epoch != epoch || !node.is_connected() {
            return;
        }
        node.stream = None;
        let node_id = node.node_id.clone();
        info!(%node_id, epoch, tasks = node.tasks.len(), "Node disconnected");
        let deadline = self.schedule(
            self.timings.node_lost_timeout,
            Deadline::NodeLost {
                node_id: node_id.clone(),
                epoch,
            },
        );
        if let Some(node) = self.registry.get_mut(&node_id) {
            node.lost_deadline = Some(deadline);
        }
        self.placement.remove(&node_id);
        self.emit(FleetEvent::NodeDetached { node_id, epoch });
    }

    /// After the node-lost timeout, a node still gone has its tasks reported lost and is
    /// dropped from the registry (nodes without a persistent identity would otherwise pile
    /// up).
    fn node_lost(&mut self, node_id: &str, epoch: u64) {
        let still_gone = self
            .registry
            .get(node_id)
            .is_some_and(|node| node.epoch == epoch && !node.is_connected());
        if !still_gone {
            return;
        }
        let tasks: Vec<String> = self
            .registry
            .get(node_id)
            .map(|node| node.tasks.iter().cloned().collect())
            .unwrap_or_default();
        let timeout = self.timings.node_lost_timeout;
        for task_id in tasks {
            let offered = self
                .ledger
                .tasks
                .get(&task_id)
                .is_some_and(|task| matches!(task.phase, Phase::Offered { .. }));
            if offered {
                self.take_back(&task_id, true);
            } else {
                self.lose_task(
                    &task_id,
                    &format!("node {node_id} has been unreachable for {timeout:?}"),
                );
            }
        }
        if let Some(node) = self.registry.remove(node_id) {
            self.placement.remove(node_id);
            info!(node_id, "Forgot a node that did not come back");
            self.emit(FleetEvent::NodeForgotten {
                node_id: node.node_id,
            });
        }
    }

    /// Reports a running task as failed upstream because its node lost it.
    fn lose_task(&mut self, task_id: &str, why: &str) {
        let Some(task) = self.ledger.take(task_id) else {
            return;
        };
        if let Some(key) = task.offer_deadline {
            self.deadlines.withdraw(key);
        }
        let node_id = task.node_id.clone().unwrap_or_else(|| Arc::from(""));
        if let Some(node) = self.registry.get_mut(&node_id) {
            node.tasks.remove(task_id);
        }
        self.refresh_placement(&node_id);
        warn!(task_id, %node_id, "Task lost: {why}");
        self.ledger
            .remember_finished(task_id, &task.execution_id, task.node_id.clone());
        let message = oz_mapping::lost_message(task_id, why);
        self.journal.settled(task_id, &task.execution_id);
        let ran_for = task.ran_for();
        end_span(task.span, &message);
        self.emit(FleetEvent::TaskFinished {
            task_id: task_id.to_owned(),
            node_id,
            result: oz_mapping::result_of(&message),
            lost: true,
            ran_for,
            execution_id: task.execution_id,
        });
        self.outbox.push(message);
    }

    fn on_accepted(&mut self, node_id: &str, accepted: AssignmentAccepted) {
        self.heard_from(node_id, &accepted.task_id);
        let phase = self
            .ledger
            .tasks
            .get(&accepted.task_id)
            .filter(|task| task.is_on(node_id, &accepted.execution_id))
            .map(|task| task.phase);
        match phase {
            Some(Phase::Offered { .. }) => self.accepted(&accepted.task_id),
            Some(Phase::Running) => {}
            None => {
                // The offer was withdrawn (timed out, or the task moved on): the node must
                // not run it alongside wherever it runs now.
                warn!(
                    task_id = accepted.task_id,
                    node_id, "Node accepted a withdrawn offer; telling it to stop"
                );
                self.cancel_on(node_id, &accepted.task_id, &accepted.execution_id);
            }
        }
    }

    /// The node runs the offered task: claim it upstream.
    fn accepted(&mut self, task_id: &str) {
        let Some(task) = self.ledger.tasks.get_mut(task_id) else {
            return;
        };
        task.phase = Phase::Running;
        task.since = SystemTime::now();
        task.running_since = Some(Instant::now());
        if let Some(key) = task.offer_deadline.take() {
            self.deadlines.withdraw(key);
        }
        let execution_id = task.execution_id.clone();
        let dispatch_latency = task.assigned_at.map(|at| at.elapsed());
        let Some(node_id) = task.node_id.clone() else {
            return;
        };
        info!(task_id, %node_id, "Node accepted the task; claiming it");
        self.claim(task_id, &execution_id, &node_id, dispatch_latency);
        self.span_event(task_id, "task.claimed", Vec::new());
        self.span_event(task_id, "task.started", Vec::new());
        self.emit(FleetEvent::TaskStarted {
            task_id: task_id.to_owned(),
            execution_id,
            node_id,
            adopted: false,
        });
    }

    fn on_refused(&mut self, node_id: &str, refused: AssignmentRefused) {
        self.heard_from(node_id, &refused.task_id);
        let offered_here = self.ledger.tasks.get(&refused.task_id).is_some_and(|task| {
            task.is_on(node_id, &refused.execution_id)
                && matches!(task.phase, Phase::Offered { .. })
        });
        if !offered_here {
            debug!(
                task_id = refused.task_id,
                node_id, "Refusal for an offer already withdrawn"
            );
            return;
        }
        info!(
            task_id = refused.task_id,
            node_id,
            reason = refused.reason,
            "Node refused the task"
        );
        if let Some(node) = self.registry.get(node_id) {
            self.emit(FleetEvent::TaskRefused {
                task_id: refused.task_id.clone(),
                node_id: node.node_id.clone(),
                expired: false,
            });
        }
        self.take_back(&refused.task_id, true);
    }

    /// Relays a terminal outcome upstream at most once per execution, and only from the
    /// node the execution was given to (see the trust rule in the module docs). The node
    /// gets its acknowledgement once the message has been written to the Oz connection
    /// ([`Fleet::relayed`]), so it keeps the outcome while it is only queued here.
    fn settle(&mut self, node_id: &str, outcome: TaskOutcome) {
        let task_id = outcome.task_id.as_str();
        let execution_id = outcome.execution_id.as_str();
        let holds_it = self
            .ledger
            .tasks
            .get(task_id)
            .map(|task| (task.is_on(node_id, execution_id), task.phase));
        match holds_it {
            Some((true, phase)) => self.relay(node_id, phase, &outcome),
            Some((false, _)) => {
                warn!(
                    task_id,
                    node_id, "Fenced an outcome from a node that does not hold the task"
                );
                self.fence(node_id, task_id, execution_id);
            }
            None if self.ledger.was_given_to(task_id, execution_id, node_id) => {
                // Already relayed (a repeat after a lost acknowledgement).
                self.acknowledge(node_id, task_id, execution_id);
            }
            None if self
                .recovered
                .get(&(task_id.to_owned(), execution_id.to_owned()))
                .is_some_and(|owner| **owner == *node_id) =>
            {
                // Given to this node before the gateway restarted, and ended meanwhile.
                self.relay_recovered(node_id, &outcome);
            }
            None => {
                warn!(
                    task_id,
                    node_id, "Dropping an outcome for an execution this node was not given"
                );
                self.fence(node_id, task_id, execution_id);
            }
        }
    }

    fn relay(&mut self, node_id: &str, phase: Phase, outcome: &TaskOutcome) {
        let task_id = outcome.task_id.as_str();
        let Some(mut task) = self.ledger.take(task_id) else {
            return;
        };
        let Some(owner) = task.node_id.clone() else {
            return;
        };
        if let Some(key) = task.offer_deadline {
            self.deadlines.withdraw(key);
        }
        if matches!(phase, Phase::Offered { .. }) {
            // The acceptance was lost with a connection; Oz needs the claim first.
            let dispatch_latency = task.assigned_at.map(|at| at.elapsed());
            self.claim(task_id, &task.execution_id, &owner, dispatch_latency);
            if let Some(span) = task.span.as_mut() {
                span.add_event("task.claimed", Vec::new());
            }
        }
        if let Some(node) = self.registry.get_mut(node_id) {
            node.tasks.remove(task_id);
        }
        self.refresh_placement(node_id);
        let message = if task.cancelled_by_operator {
            oz_mapping::operator_cancelled_message(outcome)
        } else {
            oz_mapping::upstream_message(outcome)
        };
        info!(
            task_id,
            node_id,
            outcome = message.message_type(),
            "Task finished"
        );
        self.ledger
            .remember_finished(task_id, &task.execution_id, Some(owner.clone()));
        self.ledger.mark_unsent(task_id, &task.execution_id);
        self.journal.settled(task_id, &task.execution_id);
        let ran_for = task.ran_for();
        end_span(task.span.take(), &message);
        self.emit(FleetEvent::TaskFinished {
            task_id: task_id.to_owned(),
            execution_id: task.execution_id.clone(),
            node_id: owner,
            result: oz_mapping::result_of(&message),
            lost: false,
            ran_for,
        });
        let receipt = Receipt {
            node_id: node_id.to_owned(),
            task_id: task_id.to_owned(),
            execution_id: task.execution_id,
        };
        self.outbox.push_with_receipt(message, Some(receipt));
    }

    /// Relays the outcome of an execution an earlier run of the gateway gave this node. The
    /// claim may not have reached Oz before the restart: claiming again is harmless.
    fn relay_recovered(&mut self, node_id: &str, outcome: &TaskOutcome) {
        let (task_id, execution_id) = (outcome.task_id.as_str(), outcome.execution_id.as_str());
        let Some(owner) = self
            .recovered
            .remove(&(task_id.to_owned(), execution_id.to_owned()))
        else {
            return;
        };
        self.claim(task_id, execution_id, &owner, None);
        let message = oz_mapping::upstream_message(outcome);
        info!(
            task_id,
            node_id,
            outcome = message.message_type(),
            "Task finished while the gateway was away"
        );
        self.ledger
            .remember_finished(task_id, execution_id, Some(owner.clone()));
        self.ledger.mark_unsent(task_id, execution_id);
        self.journal.settled(task_id, execution_id);
        self.emit(FleetEvent::TaskFinished {
            task_id: task_id.to_owned(),
            execution_id: execution_id.to_owned(),
            node_id: owner,
            result: oz_mapping::result_of(&message),
            lost: false,
            ran_for: Duration::ZERO,
        });
        let receipt = Receipt {
            node_id: node_id.to_owned(),
            task_id: task_id.to_owned(),
            execution_id: execution_id.to_owned(),
        };
        self.outbox.push_with_receipt(message, Some(receipt));
    }

    /// Drops an outcome the node may not report. It is still acknowledged, so the node
    /// stops repeating it.
    fn fence(&mut self, node_id: &str, task_id: &str, execution_id: &str) {
        if let Some(node) = self.registry.get(node_id) {
            self.emit(FleetEvent::OutcomeFenced {
                task_id: task_id.to_owned(),
                node_id: node.node_id.clone(),
            });
        }
        self.acknowledge(node_id, task_id, execution_id);
    }

    /// Acknowledges an outcome, unless its relay still waits to be written (the
    /// acknowledgement then follows the write).
    fn acknowledge(&mut self, node_id: &str, task_id: &str, execution_id: &str) {
        if !self.ledger.is_unsent(task_id, execution_id) {
            self.send_to(node_id, outcome_ack(task_id, execution_id));
        }
    }

    fn relayed(&mut self, receipt: &Receipt) {
        self.ledger
            .mark_sent(&receipt.task_id, &receipt.execution_id);
        // A disconnected node re-announces the outcome and is acknowledged then.
        self.send_to(
            &receipt.node_id,
            outcome_ack(&receipt.task_id, &receipt.execution_id),
        );
        self.emit(FleetEvent::OutcomeRelayed {
            task_id: receipt.task_id.clone(),
            execution_id: receipt.execution_id.clone(),
        });
    }
}

/// Why an assignment cannot be offered to any node, if it cannot.
fn oversized(assignment: &OzAssignment, raw_json: &[u8]) -> Option<String> {
    if raw_json.len() > MAX_ASSIGNMENT_BYTES {
        return Some(format!(
            "the assignment is {} bytes, over the node link's limit of {MAX_ASSIGNMENT_BYTES} bytes",
            raw_json.len()
        ));
    }
    for (field, value) in [
        ("task_id", &assignment.task_id),
        ("execution_id", &assignment.execution_id),
    ] {
        if value.len() > MAX_ID_BYTES {
            return Some(format!(
                "the assignment's {field} is {} bytes, over the limit of {MAX_ID_BYTES}",
                value.len()
            ));
        }
    }
    None
}

/// Ends a task's span with the reference's closing event and status for `message`.
fn end_span(span: Option<BoxedSpan>, message: &WorkerMessage) {
    let end = match message {
        WorkerMessage::TaskFailed(failed) => TaskEnd::Failed {
            reason: &failed.failure_reason,
            message: &failed.message,
        },
        WorkerMessage::TaskCompleted(completed) if completed.task_state.is_some() => {
            TaskEnd::Cancelled
        }
        _ => TaskEnd::Completed,
    };
    end_task_span(span, end);
}

fn outcome_ack(task_id: &str, execution_id: &str) -> attach_response::Kind {
    attach_response::Kind::OutcomeAck(v1::OutcomeAck {
        task_id: task_id.to_owned(),
        execution_id: execution_id.to_owned(),
    })
}
