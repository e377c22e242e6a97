//! The gateway's state: connected node agents, the tasks placed on them, and the rules
//! that relay between Oz and nodes.
//!
//! Every entry point takes the lock, updates state and queues messages (to Oz through the
//! outbox, to nodes through their unbounded stream senders), so no lock is ever held
//! across an await.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ozfleet_proto::oz::{self, FailureReason, TaskAssignment as OzAssignment, WorkerMessage};
use ozfleet_proto::v1::{
    self, AttachResponse, NodeHello, TaskOutcome, UpstreamSettings, attach_response, task_outcome,
};
use tonic::Status;
use tracing::{debug, info, warn};

use crate::GatewayError;
use crate::outbox::{Outbox, Queued, Receipt};
use crate::scheduler::{self, Candidate};

pub type NodeSender = tokio::sync::mpsc::UnboundedSender<Result<AttachResponse, Status>>;

/// How many finished (task, execution) pairs are remembered to drop duplicate outcomes,
/// which at-least-once delivery from nodes produces after a lost acknowledgement.
const FINISHED_MEMORY: usize = 10_000;
/// Offers a connected node may leave unanswered in a row before the gateway drops its
/// connection: a stuck agent whose transport still answers pings would otherwise look
/// idle and attract every new task.
const MAX_UNANSWERED_OFFERS: u32 = 3;
/// How long, and how many, cancellations for unknown tasks are remembered.
const EARLY_CANCELLATION_TTL: Duration = Duration::from_secs(600);
const EARLY_CANCELLATION_MEMORY: usize = 10_000;

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
}

impl Default for FleetTimings {
    fn default() -> Self {
        Self {
            offer_timeout: Duration::from_secs(10),
            node_lost_timeout: Duration::from_secs(60),
            node_keepalive: Duration::from_secs(20),
        }
    }
}

pub struct Fleet {
    state: Mutex<FleetState>,
    outbox: Arc<Outbox>,
    settings: UpstreamSettings,
    timings: FleetTimings,
    myself: Weak<Fleet>,
}

#[derive(Default)]
struct FleetState {
    nodes: HashMap<String, Node>,
    tasks: HashMap<String, Task>,
    /// Executions the gateway is done with (outcome relayed, or rejected upstream).
    finished: HashSet<(String, String)>,
    finished_order: VecDeque<(String, String)>,
    /// Relayed outcomes still waiting in the outbox; acknowledged once written.
    unsent_outcomes: HashSet<(String, String)>,
    /// Cancellations Oz sent for tasks not (yet) known here, e.g. while nodes were still
    /// reattaching after a gateway restart; applied when a node announces the task.
    early_cancellations: HashMap<String, Instant>,
    next_epoch: u64,
    placements: u64,
}

struct Node {
    hello: NodeHello,
    epoch: u64,
    /// `None` while the node is disconnected.
    stream: Option<NodeSender>,
    /// Task ids offered to or running on this node.
    tasks: HashSet<String>,
    last_placed: u64,
    /// Offers that timed out since the node last answered one.
    unanswered_offers: u32,
}

impl Node {
    fn send(&self, message: attach_response::Kind) {
        if let Some(stream) = &self.stream {
            // A closed stream means the node is leaving; its detach handler cleans up.
            let _ = stream.send(Ok(AttachResponse {
                kind: Some(message),
            }));
        }
    }

    fn capacity(&self) -> Option<u32> {
        match self.hello.max_concurrent_tasks {
            0 => None,
            limit => Some(limit),
        }
    }
}

struct Task {
    execution_id: String,
    node_id: String,
    phase: Phase,
    cancel_requested: bool,
    /// The Oz assignment as received; `None` for tasks adopted from a node's state after a
    /// gateway restart (they are already placed and are never re-placed).
    assignment_json: Option<Vec<u8>>,
    refused_by: HashSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Offered { offer: u64 },
    Running,
}

impl Fleet {
    pub fn new(
        outbox: Arc<Outbox>,
        settings: UpstreamSettings,
        timings: FleetTimings,
    ) -> Arc<Self> {
        Arc::new_cyclic(|myself| Self {
            state: Mutex::new(FleetState::default()),
            outbox,
            settings,
            timings,
            myself: myself.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, FleetState> {
        self.state.lock().expect("fleet lock poisoned")
    }

    // ---- Oz → gateway -------------------------------------------------------------

    pub fn on_assignment(&self, assignment: &OzAssignment, raw_json: &[u8]) {
        let task_id = assignment.task_id.clone();
        let mut state = self.lock();
        if let Some(existing) = state.tasks.get(&task_id) {
            if existing.phase == Phase::Running {
                // Oz offers again what it has not seen claimed (the claim may have been
                // lost with a connection). The execution that runs carries on; claiming
                // again tells Oz where the task is.
                info!(
                    task_id,
                    execution_id = assignment.execution_id,
                    running_execution_id = existing.execution_id,
                    "Assignment for a task already running here; claiming it again"
                );
                self.outbox
                    .push(WorkerMessage::claimed(&task_id, &self.settings.worker_id));
            } else {
                warn!(
                    task_id,
                    execution_id = assignment.execution_id,
                    "Ignoring an assignment for a task that is being placed"
                );
            }
            return;
        }
        info!(
            task_id,
            title = assignment.task.title,
            "Task assigned by Oz"
        );
        state.tasks.insert(
            task_id.clone(),
            Task {
                execution_id: assignment.execution_id.clone(),
                node_id: String::new(),
                phase: Phase::Offered { offer: 0 },
                cancel_requested: false,
                assignment_json: Some(raw_json.to_vec()),
                refused_by: HashSet::new(),
            },
        );
        self.place(&mut state, &task_id);
    }

    pub fn on_cancellation(&self, task_id: &str) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(task) = state.tasks.get_mut(task_id) else {
            warn!(
                task_id,
                "Cancellation for a task not known here; applying it if a node announces the task"
            );
            let now = Instant::now();
            state
                .early_cancellations
                .retain(|_, at| now.duration_since(*at) < EARLY_CANCELLATION_TTL);
            if state.early_cancellations.len() < EARLY_CANCELLATION_MEMORY {
                state.early_cancellations.insert(task_id.to_owned(), now);
            }
            return;
        };
        task.cancel_requested = true;
        let cancellation = attach_response::Kind::Cancellation(v1::TaskCancellation {
            task_id: task_id.to_owned(),
            execution_id: task.execution_id.clone(),
        });
        let node_id = task.node_id.clone();
        info!(task_id, node_id, "Cancellation requested by Oz");
        if let Some(node) = state.nodes.get(&node_id) {
            // A disconnected node gets it again from reconciliation when it returns.
            node.send(cancellation);
        }
    }

    /// Offers the task to the best node, or rejects it upstream if no node can take it.
    fn place(&self, state: &mut FleetState, task_id: &str) {
        let Some(task) = state.tasks.get(task_id) else {
            return;
        };
        let candidates: Vec<Candidate<'_>> = state
            .nodes
            .iter()
            .filter(|(_, node)| node.stream.is_some())
            .map(|(node_id, node)| Candidate {
                node_id,
                load: node.tasks.len() as u32,
                capacity: node.capacity(),
                last_placed: node.last_placed,
            })
            .collect();
        let Some(node_id) = scheduler::pick(&candidates, &task.refused_by).map(str::to_owned)
        else {
            let task = state.tasks.remove(task_id).expect("task checked above");
            remember_finished(state, task_id, &task.execution_id);
            info!(task_id, "No node can take the task; rejecting it");
            self.outbox
                .push(WorkerMessage::rejected_at_capacity(task_id));
            return;
        };
        state.placements += 1;
        let offer = state.placements;
        let task = state.tasks.get_mut(task_id).expect("task checked above");
        task.node_id = node_id.clone();
        task.phase = Phase::Offered { offer };
        let message = attach_response::Kind::Assignment(v1::TaskAssignment {
            task_id: task_id.to_owned(),
            execution_id: task.execution_id.clone(),
            oz_assignment_json: task.assignment_json.clone().unwrap_or_default(),
            settings: Some(self.settings.clone()),
        });
        let node = state
            .nodes
            .get_mut(&node_id)
            .expect("candidate nodes exist");
        node.tasks.insert(task_id.to_owned());
        node.last_placed = offer;
        info!(
            task_id,
            node_id,
            node_name = node.hello.node_name,
            "Offering task to node"
        );
        node.send(message);
        self.expire_offer_later(task_id.to_owned(), offer);
    }

    fn expire_offer_later(&self, task_id: String, offer: u64) {
        let fleet = self.myself.clone();
        let timeout = self.timings.offer_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(fleet) = fleet.upgrade() else { return };
            let mut state = fleet.lock();
            let still_pending = state
                .tasks
                .get(&task_id)
                .is_some_and(|task| task.phase == Phase::Offered { offer });
            if !still_pending {
                return;
            }
            let node_id = state.tasks[&task_id].node_id.clone();
            warn!(
                task_id,
                node_id, "Node did not answer the offer in time; placing elsewhere"
            );
            fleet.take_back(&mut state, &task_id, true);
            if let Some(node) = state.nodes.get_mut(&node_id) {
                node.unanswered_offers += 1;
                if node.unanswered_offers >= MAX_UNANSWERED_OFFERS && node.stream.is_some() {
                    warn!(
                        node_id,
                        "Node left {MAX_UNANSWERED_OFFERS} offers in a row unanswered; dropping its connection"
                    );
                    let epoch = node.epoch;
                    drop(state);
                    // Dropping the stream sender ends the node's response stream, so an
                    // agent that is merely slow reconnects with a fresh full state.
                    fleet.detach(&node_id, epoch);
                }
            }
        });
    }

    /// Withdraws an unclaimed offer from its node and places the task again.
    fn take_back(&self, state: &mut FleetState, task_id: &str, exclude_node: bool) {
        let Some(task) = state.tasks.get_mut(task_id) else {
            return;
        };
        let node_id = std::mem::take(&mut task.node_id);
        let cancelled = task.cancel_requested;
        if exclude_node {
            task.refused_by.insert(node_id.clone());
        }
        if let Some(node) = state.nodes.get_mut(&node_id) {
            node.tasks.remove(task_id);
        }
        if cancelled {
            // Oz cancelled it before any node claimed it: nothing is left to run or report.
            info!(task_id, "Dropping a task cancelled before it was claimed");
            let task = state.tasks.remove(task_id).expect("task checked above");
            remember_finished(state, task_id, &task.execution_id);
            return;
        }
        self.place(state, task_id);
    }

    // ---- nodes → gateway ----------------------------------------------------------

    /// Registers a (re)connected node and reconciles against the full state it announced.
    /// Returns the connection's epoch.
    pub fn attach(&self, hello: NodeHello, stream: NodeSender) -> Result<u64, GatewayError> {
        let mut state = self.lock();
        let node_id = hello.node_id.clone();
        if let Some(existing) = state.nodes.get(&node_id)
            && existing.stream.is_some()
            && existing.hello.instance_id != hello.instance_id
        {
            warn!(
                node_id,
                "Refusing a second agent process with the same node id"
            );
            return Err(GatewayError::DuplicateNode(node_id));
        }
        state.next_epoch += 1;
        let epoch = state.next_epoch;
        let welcome = attach_response::Kind::Welcome(v1::Welcome {
            epoch,
            worker_id: self.settings.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        });
        let _ = stream.send(Ok(AttachResponse {
            kind: Some(welcome),
        }));
        let node = state.nodes.entry(node_id.clone()).or_insert_with(|| Node {
            hello: hello.clone(),
            epoch,
            stream: None,
            tasks: HashSet::new(),
            last_placed: 0,
            unanswered_offers: 0,
        });
        if node.stream.is_some() {
            info!(
                node_id,
                epoch, "Node reconnected; fencing its previous connection"
            );
        }
        node.hello = hello.clone();
        node.epoch = epoch;
        node.stream = Some(stream);
        info!(
            node_id,
            node_name = hello.node_name,
            epoch,
            backend = hello.backend().as_str_name(),
            max_concurrent_tasks = hello.max_concurrent_tasks,
            running = hello.running_tasks.len(),
            version = hello.version,
            "Node attached"
        );
        self.reconcile(&mut state, &node_id, &hello);
        Ok(epoch)
    }

    /// A hello sent again on a live connection: reconcile against the new full state.
    pub fn resync(&self, node_id: &str, epoch: u64, hello: NodeHello) {
        let mut state = self.lock();
        if !Self::is_current(&state, node_id, epoch) {
            return;
        }
        if let Some(node) = state.nodes.get_mut(node_id) {
            node.hello = hello.clone();
        }
        self.reconcile(&mut state, node_id, &hello);
    }

    /// Closes every node stream (gateway shutdown); nodes keep their tasks and reconnect.
    pub fn close_node_streams(&self) {
        let mut state = self.lock();
        for node in state.nodes.values_mut() {
            node.stream = None;
        }
    }

    fn reconcile(&self, state: &mut FleetState, node_id: &str, hello: &NodeHello) {
        let reported: HashMap<&str, &str> = hello
            .running_tasks
            .iter()
            .map(|task| (task.task_id.as_str(), task.execution_id.as_str()))
            .collect();
        let finished: HashSet<(&str, &str)> = hello
            .unacknowledged_outcomes
            .iter()
            .map(|outcome| (outcome.task_id.as_str(), outcome.execution_id.as_str()))
            .collect();

        // Tasks the gateway placed on this node.
        let placed: Vec<String> = state.nodes[node_id].tasks.iter().cloned().collect();
        for task_id in placed {
            let task = &state.tasks[&task_id];
            let node_runs_it = reported.get(task_id.as_str()) == Some(&task.execution_id.as_str());
            if node_runs_it {
                if let Phase::Offered { .. } = task.phase {
                    // The acceptance was lost with the old connection.
                    self.accepted(state, node_id, &task_id);
                }
                let task = &state.tasks[&task_id];
                if task.cancel_requested {
                    state.nodes[node_id].send(attach_response::Kind::Cancellation(
                        v1::TaskCancellation {
                            task_id: task_id.clone(),
                            execution_id: task.execution_id.clone(),
                        },
                    ));
                }
            } else if finished.contains(&(task_id.as_str(), task.execution_id.as_str())) {
                // Settled below, from the outcome itself.
            } else if let Phase::Offered { .. } = task.phase {
                debug!(
                    task_id,
                    node_id, "Offer lost with the old connection; offering again"
                );
                self.take_back(state, &task_id, false);
            } else {
                let node_name = state.nodes[node_id].hello.node_name.clone();
                self.lose_task(
                    state,
                    &task_id,
                    &format!("node {node_name} ({node_id}) restarted and no longer runs the task"),
                );
            }
        }

        // Tasks the node runs that the gateway did not place there.
        for (task_id, execution_id) in &reported {
            match state.tasks.get(*task_id) {
                Some(task) if task.node_id == node_id && task.execution_id == *execution_id => {}
                Some(task) => {
                    warn!(
                        task_id,
                        node_id,
                        owner = task.node_id,
                        "Node runs a task placed elsewhere; telling it to stop"
                    );
                    state.nodes[node_id].send(attach_response::Kind::Cancellation(
                        v1::TaskCancellation {
                            task_id: (*task_id).to_owned(),
                            execution_id: (*execution_id).to_owned(),
                        },
                    ));
                }
                None if state
                    .finished
                    .contains(&((*task_id).to_owned(), (*execution_id).to_owned())) =>
                {
                    warn!(
                        task_id,
                        node_id,
                        "Node runs a task that was already settled upstream; telling it to stop"
                    );
                    state.nodes[node_id].send(attach_response::Kind::Cancellation(
                        v1::TaskCancellation {
                            task_id: (*task_id).to_owned(),
                            execution_id: (*execution_id).to_owned(),
                        },
                    ));
                }
                None => {
                    info!(task_id, node_id, "Adopting a task the node is running");
                    state.tasks.insert(
                        (*task_id).to_owned(),
                        Task {
                            execution_id: (*execution_id).to_owned(),
                            node_id: node_id.to_owned(),
                            phase: Phase::Running,
                            cancel_requested: false,
                            assignment_json: None,
                            refused_by: HashSet::new(),
                        },
                    );
                    let node = state.nodes.get_mut(node_id).expect("attached node");
                    node.tasks.insert((*task_id).to_owned());
                    if state.early_cancellations.remove(*task_id).is_some() {
                        info!(
                            task_id,
                            node_id, "Applying the cancellation Oz sent before the node returned"
                        );
                        let task = state.tasks.get_mut(*task_id).expect("just adopted");
                        task.cancel_requested = true;
                        state.nodes[node_id].send(attach_response::Kind::Cancellation(
                            v1::TaskCancellation {
                                task_id: (*task_id).to_owned(),
                                execution_id: (*execution_id).to_owned(),
                            },
                        ));
                    }
                }
            }
        }

        for outcome in &hello.unacknowledged_outcomes {
            self.settle(state, node_id, outcome.clone(), true);
        }
    }

    /// True when `epoch` is still the node's live connection; stale connections' messages
    /// are dropped (the node re-announces everything on its newer connection).
    fn is_current(state: &FleetState, node_id: &str, epoch: u64) -> bool {
        let current = state
            .nodes
            .get(node_id)
            .is_some_and(|node| node.epoch == epoch && node.stream.is_some());
        if !current {
            debug!(node_id, epoch, "Dropping a message from a stale connection");
        }
        current
    }

    pub fn on_accepted(&self, node_id: &str, epoch: u64, accepted: v1::AssignmentAccepted) {
        let mut state = self.lock();
        if !Self::is_current(&state, node_id, epoch) {
            return;
        }
        if let Some(node) = state.nodes.get_mut(node_id) {
            node.unanswered_offers = 0;
        }
        let offered_here = state.tasks.get(&accepted.task_id).is_some_and(|task| {
            task.node_id == node_id
                && task.execution_id == accepted.execution_id
                && matches!(task.phase, Phase::Offered { .. })
        });
        let running_here = state.tasks.get(&accepted.task_id).is_some_and(|task| {
            task.node_id == node_id
                && task.execution_id == accepted.execution_id
                && task.phase == Phase::Running
        });
        if offered_here {
            self.accepted(&mut state, node_id, &accepted.task_id);
        } else if !running_here {
            // The offer was withdrawn (timed out, or the task moved on): the node must not
            // run it alongside wherever it runs now.
            warn!(
                task_id = accepted.task_id,
                node_id, "Node accepted a withdrawn offer; telling it to stop"
            );
            state.nodes[node_id].send(attach_response::Kind::Cancellation(v1::TaskCancellation {
                task_id: accepted.task_id,
                execution_id: accepted.execution_id,
            }));
        }
    }

    fn accepted(&self, state: &mut FleetState, node_id: &str, task_id: &str) {
        let task = state
            .tasks
            .get_mut(task_id)
            .expect("caller checked the task");
        task.phase = Phase::Running;
        info!(task_id, node_id, "Node accepted the task; claiming it");
        self.outbox
            .push(WorkerMessage::claimed(task_id, &self.settings.worker_id));
    }

    pub fn on_refused(&self, node_id: &str, epoch: u64, refused: v1::AssignmentRefused) {
        let mut state = self.lock();
        if !Self::is_current(&state, node_id, epoch) {
            return;
        }
        if let Some(node) = state.nodes.get_mut(node_id) {
            node.unanswered_offers = 0;
        }
        let offered_here = state.tasks.get(&refused.task_id).is_some_and(|task| {
            task.node_id == node_id
                && task.execution_id == refused.execution_id
                && matches!(task.phase, Phase::Offered { .. })
        });
        if offered_here {
            info!(
                task_id = refused.task_id,
                node_id,
                reason = refused.reason,
                "Node refused the task"
            );
            self.take_back(&mut state, &refused.task_id, true);
        } else {
            debug!(
                task_id = refused.task_id,
                node_id, "Refusal for an offer already withdrawn"
            );
        }
    }

    pub fn on_outcome(&self, node_id: &str, epoch: u64, outcome: TaskOutcome) {
        let mut state = self.lock();
        if !Self::is_current(&state, node_id, epoch) {
            return;
        }
        self.settle(&mut state, node_id, outcome, false);
    }

    /// Relays a terminal outcome upstream at most once per execution. The node gets its
    /// acknowledgement only once the message has been written to the Oz connection (see
    /// [`Fleet::relayed`]), so the node keeps the outcome while it is only queued here.
    /// `announced`: the outcome came in the node's hello, its full-state report; only then
    /// is an outcome for a task this gateway does not know relayed (e.g. a task that ended
    /// while the gateway was restarting), so a node cannot settle arbitrary runs.
    fn settle(&self, state: &mut FleetState, node_id: &str, outcome: TaskOutcome, announced: bool) {
        let key = (outcome.task_id.clone(), outcome.execution_id.clone());
        let task_id = outcome.task_id.as_str();
        let relay = match state.tasks.get(task_id) {
            Some(task) if task.node_id == node_id && task.execution_id == outcome.execution_id => {
                if matches!(task.phase, Phase::Offered { .. }) {
                    // The acceptance was lost with a connection; Oz needs the claim first.
                    self.outbox
                        .push(WorkerMessage::claimed(task_id, &self.settings.worker_id));
                }
                state.tasks.remove(task_id);
                if let Some(node) = state.nodes.get_mut(node_id) {
                    node.tasks.remove(task_id);
                }
                true
            }
            Some(task) => {
                warn!(
                    task_id,
                    node_id,
                    owner = task.node_id,
                    "Fenced an outcome from a node that no longer owns the task"
                );
                false
            }
            None if !announced => {
                warn!(
                    task_id,
                    node_id, "Dropping an outcome for a task this gateway does not know"
                );
                false
            }
            // Unknown here but announced (e.g. the gateway restarted): relay unless settled.
            None => !state.finished.contains(&key),
        };
        if relay {
            let message = upstream_message(&outcome);
            info!(
                task_id,
                node_id,
                outcome = message.message_type(),
                "Task finished"
            );
            remember_finished(state, task_id, &outcome.execution_id);
            state.unsent_outcomes.insert(key.clone());
            let receipt = Receipt {
                node_id: node_id.to_owned(),
                task_id: key.0,
                execution_id: key.1,
            };
            self.outbox.push_with_receipt(message, Some(receipt));
        } else if !state.unsent_outcomes.contains(&key)
            && let Some(node) = state.nodes.get(node_id)
        {
            // Already relayed and written (or fenced): the node can forget it now.
            node.send(outcome_ack(&key.0, &key.1));
        }
    }

    /// Called once `queued` has been written to Oz: acknowledges the outcome it relays.
    pub fn relayed(&self, queued: &Queued) {
        let Some(receipt) = &queued.receipt else {
            return;
        };
        let mut state = self.lock();
        state
            .unsent_outcomes
            .remove(&(receipt.task_id.clone(), receipt.execution_id.clone()));
        // A disconnected node re-announces the outcome and is acknowledged then.
        if let Some(node) = state.nodes.get(&receipt.node_id) {
            node.send(outcome_ack(&receipt.task_id, &receipt.execution_id));
        }
    }

    /// Reports a running task as failed upstream because its node lost it.
    fn lose_task(&self, state: &mut FleetState, task_id: &str, why: &str) {
        let Some(task) = state.tasks.remove(task_id) else {
            return;
        };
        if let Some(node) = state.nodes.get_mut(&task.node_id) {
            node.tasks.remove(task_id);
        }
        warn!(task_id, node_id = task.node_id, "Task lost: {why}");
        remember_finished(state, task_id, &task.execution_id);
        self.outbox.push(WorkerMessage::failed(
            task_id,
            FailureReason::Unknown,
            oz::failed_to_execute_message(why),
            0,
        ));
    }

    /// The node's connection `epoch` ended. Its running tasks wait for it to return (up to
    /// the node-lost timeout); offers it had not answered stay with it until their offer
    /// timeout, since it may have accepted them just before the connection broke: placing
    /// them elsewhere at once could run a task twice.
    pub fn detach(&self, node_id: &str, epoch: u64) {
        let mut state = self.lock();
        let Some(node) = state.nodes.get_mut(node_id) else {
            return;
        };
        if node.epoch != epoch {
            return;
        }
        node.stream = None;
        info!(
            node_id,
            epoch,
            tasks = node.tasks.len(),
            "Node disconnected"
        );
        self.forget_node_later(node_id.to_owned(), epoch);
    }

    /// After the node-lost timeout, a node still gone has its tasks reported lost and is
    /// dropped from the registry (nodes without a persistent identity would otherwise pile
    /// up).
    fn forget_node_later(&self, node_id: String, epoch: u64) {
        let fleet = self.myself.clone();
        let timeout = self.timings.node_lost_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(fleet) = fleet.upgrade() else { return };
            let mut state = fleet.lock();
            let still_gone = state
                .nodes
                .get(&node_id)
                .is_some_and(|node| node.epoch == epoch && node.stream.is_none());
            if !still_gone {
                return;
            }
            let tasks: Vec<String> = state.nodes[&node_id].tasks.iter().cloned().collect();
            for task_id in tasks {
                let offered = state
                    .tasks
                    .get(&task_id)
                    .is_some_and(|task| matches!(task.phase, Phase::Offered { .. }));
                if offered {
                    fleet.take_back(&mut state, &task_id, true);
                } else {
                    fleet.lose_task(
                        &mut state,
                        &task_id,
                        &format!("node {node_id} has been unreachable for {timeout:?}"),
                    );
                }
            }
            state.nodes.remove(&node_id);
            info!(node_id, "Forgot a node that did not come back");
        });
    }
}

fn remember_finished(state: &mut FleetState, task_id: &str, execution_id: &str) {
    let key = (task_id.to_owned(), execution_id.to_owned());
    if state.finished.insert(key.clone()) {
        state.finished_order.push_back(key);
    }
    if state.finished_order.len() > FINISHED_MEMORY
        && let Some(oldest) = state.finished_order.pop_front()
    {
        state.finished.remove(&oldest);
    }
}

fn outcome_ack(task_id: &str, execution_id: &str) -> attach_response::Kind {
    attach_response::Kind::OutcomeAck(v1::OutcomeAck {
        task_id: task_id.to_owned(),
        execution_id: execution_id.to_owned(),
    })
}

/// The message Oz gets for a node's outcome.
fn upstream_message(outcome: &TaskOutcome) -> WorkerMessage {
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
