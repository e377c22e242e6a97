//! The node registry: who is attached, on which connection (epoch), with what capacity,
//! and which tasks each node holds. A node keeps a small record, not its hello (a hello
//! may list thousands of tasks); the record is what placement, the admin API and
//! reconciliation need.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use ozfleet_proto::v1::{AttachResponse, BackendKind, NodeHello, attach_response};

use super::deadlines::DeadlineKey;
use super::events::{NodeReading, NodeSnapshot, NodeState};
use super::placement::Standing;

/// Messages queued for one node's stream, at most [`NODE_QUEUE`]: a node that does not
/// read its stream is disconnected rather than allowed to grow the gateway's memory.
pub type NodeSender = tokio::sync::mpsc::Sender<Outgoing>;

/// A message for a node, and the journal entries that must be on disk before it leaves
/// (write-ahead: a node never starts what a crash could make the gateway forget).
/// The message is boxed: the queue allocates its slots 32 at a time, and an unboxed
/// `AttachResponse` would make that first block cost every idle node kilobytes.
#[derive(Debug)]
pub struct Outgoing {
    pub journal_mark: u64,
    pub response: Box<AttachResponse>,
}

/// How many messages may wait for one node.
pub const NODE_QUEUE: usize = 1024;

/// Whether a message reached a node's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// The node is disconnected or leaving (its detach cleans up).
    Gone,
    /// The queue is full: the node does not read its stream.
    Overflowed,
}

/// What the gateway keeps about one node.
pub struct NodeRecord {
    pub node_id: Arc<str>,
    /// Assigned once per node id, for placement's integer tie-break.
    pub seq: u64,
    pub name: String,
    pub backend: BackendKind,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    /// The agent process; a second process with the same node id is refused.
    pub instance_id: String,
    /// `None` = unlimited.
    pub capacity: Option<u32>,
    pub epoch: u64,
    /// `None` while the node is disconnected.
    pub stream: Option<NodeSender>,
    /// Task ids offered to or running on this node.
    pub tasks: HashSet<String>,
    pub last_placed: u64,
    /// Offers that timed out since the node last answered anything. A node with one is
    /// quiet: it gets no new offers until it answers (silent nodes must not starve tasks).
    pub unanswered_offers: u32,
    /// Smoothed time the node takes to answer an offer; shortens its offer timeout.
    pub answer_time: Option<std::time::Duration>,
    /// Set by an operator; survives reconnects.
    pub draining: bool,
    pub connected_since: SystemTime,
    /// The node-lost deadline while it is away.
    pub lost_deadline: Option<DeadlineKey>,
}

impl NodeRecord {
    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    /// Whether new tasks may be offered to the node at all.
    pub fn is_eligible(&self) -> bool {
        self.is_connected() && !self.draining && self.unanswered_offers == 0
    }

    /// The node answered something: it is heard again, and an answer to an offer made
    /// `offered_for` ago refines its answer time.
    pub fn heard(&mut self, offered_for: Option<std::time::Duration>) {
        self.unanswered_offers = 0;
        if let Some(sample) = offered_for {
            self.answer_time = Some(match self.answer_time {
                // An exponentially weighted average: recent answers count most.
                Some(average) => (average * 4 + sample) / 5,
                None => sample,
            });
        }
    }

    pub fn standing(&self) -> Standing {
        Standing {
            load: u32::try_from(self.tasks.len()).unwrap_or(u32::MAX),
            capacity: self.capacity,
            last_placed: self.last_placed,
        }
    }

    /// Queues a message on the node's stream, never waiting; it leaves once the journal
    /// is on disk up to `journal_mark`.
    pub fn send(&self, message: attach_response::Kind, journal_mark: u64) -> Sent {
        let Some(stream) = &self.stream else {
            return Sent::Gone;
        };
        match stream.try_send(Outgoing {
            journal_mark,
            response: Box::new(AttachResponse {
                kind: Some(message),
            }),
        }) {
            Ok(()) => Sent::Queued,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Sent::Overflowed,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Sent::Gone,
        }
    }

    fn state(&self) -> NodeState {
        match (self.is_connected(), self.draining) {
            (false, _) => NodeState::Disconnected,
            (true, true) => NodeState::Draining,
            (true, false) => NodeState::Ready,
        }
    }

    pub fn reading(&self) -> NodeReading {
        NodeReading {
            node_id: self.node_id.clone(),
            backend: self.backend,
            state: self.state(),
            active_tasks: self.standing().load,
            max_concurrent_tasks: self.capacity.unwrap_or(0),
        }
    }

    pub fn snapshot(&self) -> NodeSnapshot {
        NodeSnapshot {
            node_id: self.node_id.clone(),
            name: self.name.clone(),
            backend: self.backend,
            labels: self.labels.clone(),
            version: self.version.clone(),
            max_concurrent_tasks: self.capacity.unwrap_or(0),
            active_tasks: self.standing().load,
            state: self.state(),
            draining: self.draining,
            epoch: self.epoch,
            connected_since: self.connected_since,
        }
    }
}

/// The outcome of registering a hello.
pub enum Registered {
    /// A node id not seen before (or forgotten).
    New,
    /// A known node on a new connection; the previous one (if still open) is fenced.
    Reattached { previous_stream_open: bool },
}

#[derive(Default)]
pub struct NodeRegistry {
    nodes: HashMap<Arc<str>, NodeRecord>,
    next_epoch: u64,
    next_seq: u64,
}

impl NodeRegistry {
    pub fn get(&self, node_id: &str) -> Option<&NodeRecord> {
        self.nodes.get(node_id)
    }

    pub fn get_mut(&mut self, node_id: &str) -> Option<&mut NodeRecord> {
        self.nodes.get_mut(node_id)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut NodeRecord> {
        self.nodes.values_mut()
    }

    /// True when another agent process holds the node id on a live connection.
    pub fn is_held_by_another_process(&self, hello: &NodeHello) -> bool {
        self.nodes
            .get(hello.node_id.as_str())
            .is_some_and(|node| node.is_connected() && node.instance_id != hello.instance_id)
    }

    /// Records a (re)connection: a new epoch, the node's announced properties and its
    /// stream. Tasks and drain state of a known node are kept.
    pub fn register(
        &mut self,
        hello: &NodeHello,
        stream: NodeSender,
        now: SystemTime,
    ) -> (Arc<str>, u64, Registered) {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let capacity = match hello.max_concurrent_tasks {
            0 => None,
            limit => Some(limit),
        };
        let labels: BTreeMap<String, String> = hello
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        if let Some(node) = self.nodes.get_mut(hello.node_id.as_str()) {
            let previous_stream_open = node.is_connected();
            node.name.clone_from(&hello.node_name);
            node.backend = hello.backend();
            node.labels = labels;
            node.version.clone_from(&hello.version);
            node.instance_id.clone_from(&hello.instance_id);
            node.capacity = capacity;
            node.epoch = epoch;
            node.stream = Some(stream);
            node.unanswered_offers = 0;
            node.connected_since = now;
            return (
                node.node_id.clone(),
                epoch,
                Registered::Reattached {
                    previous_stream_open,
                },
            );
        }
        self.next_seq += 1;
        let node_id: Arc<str> = Arc::from(hello.node_id.as_str());
        self.nodes.insert(
            node_id.clone(),
            NodeRecord {
                node_id: node_id.clone(),
                seq: self.next_seq,
                name: hello.node_name.clone(),
                backend: hello.backend(),
                labels,
                version: hello.version.clone(),
                instance_id: hello.instance_id.clone(),
                capacity,
                epoch,
                stream: Some(stream),
                tasks: HashSet::new(),
                last_placed: 0,
                unanswered_offers: 0,
                answer_time: None,
                draining: false,
                connected_since: now,
                lost_deadline: None,
            },
        );
        (node_id, epoch, Registered::New)
    }

    /// True when `epoch` is the node's live connection. Messages from older connections
    /// are dropped: the node re-announces everything on its newer one.
    pub fn is_current(&self, node_id: &str, epoch: u64) -> bool {
        self.nodes
            .get(node_id)
            .is_some_and(|node| node.epoch == epoch && node.is_connected())
    }

    pub fn remove(&mut self, node_id: &str) -> Option<NodeRecord> {
        self.nodes.remove(node_id)
    }
}
