//! The task ledger: every task the gateway holds (offered or running, and where), the
//! executions it is done with, relayed outcomes not yet written to Oz, and cancellations
//! that arrived before their task was known. Bounded: the memories below forget their
//! oldest entries past their limits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher as _, RandomState};
use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::global::BoxedSpan;
use tokio::time::Instant;

use super::deadlines::DeadlineKey;
use super::events::{TaskSnapshot, TaskState};
use crate::spare::ReleaseSpare as _;

/// How many finished executions are remembered, to drop duplicate outcomes (at-least-once
/// delivery from nodes repeats one after a lost acknowledgement).
pub const FINISHED_MEMORY: usize = 10_000;
/// How many cancellations for unknown tasks are remembered.
pub const EARLY_CANCELLATION_MEMORY: usize = 10_000;
/// Held tasks (and unsent outcomes) the ledger keeps room for after a burst has passed.
const HELD_ROOM: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Offer number `offer` is out to the node.
    Offered {
        offer: u64,
    },
    Running,
}

pub struct Task {
    pub execution_id: String,
    /// The node holding the task; empty while it is being placed.
    pub node_id: Option<Arc<str>>,
    pub phase: Phase,
    pub cancel_requested: bool,
    /// An operator cancelled it (admin API): Oz gets `task_failed` / `task_cancelled`.
    pub cancelled_by_operator: bool,
    /// The Oz assignment as received; `None` for tasks adopted from a node's hello after
    /// a gateway restart (already placed, never re-placed).
    pub assignment_json: Option<Arc<[u8]>>,
    /// Nodes that refused this task or let its offer expire.
    pub refused_by: HashSet<Arc<str>>,
    pub offer_deadline: Option<DeadlineKey>,
    pub since: SystemTime,
    /// When Oz assigned it to this gateway (`None` for adopted tasks).
    pub assigned_at: Option<Instant>,
    /// When its node started running it.
    pub running_since: Option<Instant>,
    /// When the current offer went out.
    pub offered_at: Option<Instant>,
    /// Its `oz_worker.task` span, when tracing is on; ended with its terminal report.
    pub span: Option<BoxedSpan>,
}

impl Task {
    /// How long the task has run on its node.
    pub fn ran_for(&self) -> std::time::Duration {
        self.running_since
            .map(|since| since.elapsed())
            .unwrap_or_default()
    }
}

impl Task {
    pub fn is_on(&self, node_id: &str, execution_id: &str) -> bool {
        self.node_id.as_deref() == Some(node_id) && self.execution_id == execution_id
    }
}

/// An execution (task id, execution id).
type ExecutionKey = (String, String);

/// A remembered execution's identity: two keyed 64-bit hashes of (task id, execution id).
/// 16 bytes instead of two strings stored twice (~300 bytes an entry; the finished memory
/// is 10,000 entries). The keys are random per process, so ids cannot be crafted to
/// collide; by chance, two of 10,000 executions collide with a probability of ~10^-31.
type Fingerprint = u128;

#[derive(Default)]
struct Fingerprints {
    high: RandomState,
    low: RandomState,
}

impl Fingerprints {
    fn of(&self, task_id: &str, execution_id: &str) -> Fingerprint {
        let execution = (task_id, execution_id);
        (u128::from(self.high.hash_one(execution)) << 64) | u128::from(self.low.hash_one(execution))
    }
}

#[derive(Default)]
pub struct TaskLedger {
    pub tasks: HashMap<String, Task>,
    fingerprints: Fingerprints,
    /// Executions the gateway is done with, and the node each was given to (if any).
    finished: HashMap<Fingerprint, Option<Arc<str>>>,
    finished_order: VecDeque<Fingerprint>,
    /// Relayed outcomes still waiting in the outbox; acknowledged once written.
    unsent_outcomes: HashSet<ExecutionKey>,
    /// Cancellations Oz sent for tasks not (yet) known here, e.g. while nodes were still
    /// reattaching after a gateway restart; applied when a node announces the task.
    early_cancellations: HashSet<String>,
    /// Offer numbers, also used as placement recency.
    placements: u64,
}

impl TaskLedger {
    /// Removes a task the gateway is done with (or gives up on).
    pub fn take(&mut self, task_id: &str) -> Option<Task> {
        let task = self.tasks.remove(task_id);
        self.tasks.release_spare(HELD_ROOM);
        task
    }

    pub fn next_offer(&mut self) -> u64 {
        self.placements += 1;
        self.placements
    }

    /// Remembers that the gateway is done with an execution, and which node had it.
    pub fn remember_finished(
        &mut self,
        task_id: &str,
        execution_id: &str,
        node_id: Option<Arc<str>>,
    ) {
        let key = self.fingerprints.of(task_id, execution_id);
        if self.finished.insert(key, node_id).is_none() {
            self.finished_order.push_back(key);
        }
        while self.finished_order.len() > FINISHED_MEMORY {
            if let Some(oldest) = self.finished_order.pop_front() {
                self.finished.remove(&oldest);
            }
        }
    }

    pub fn is_finished(&self, task_id: &str, execution_id: &str) -> bool {
        self.finished
            .contains_key(&self.fingerprints.of(task_id, execution_id))
    }

    /// Whether the execution, now finished, had been given to `node_id`.
    pub fn was_given_to(&self, task_id: &str, execution_id: &str, node_id: &str) -> bool {
        self.finished
            .get(&self.fingerprints.of(task_id, execution_id))
            .is_some_and(|owner| owner.as_deref() == Some(node_id))
    }

    pub fn mark_unsent(&mut self, task_id: &str, execution_id: &str) {
        self.unsent_outcomes
            .insert((task_id.to_owned(), execution_id.to_owned()));
    }

    pub fn mark_sent(&mut self, task_id: &str, execution_id: &str) {
        self.unsent_outcomes
            .remove(&(task_id.to_owned(), execution_id.to_owned()));
        self.unsent_outcomes.release_spare(HELD_ROOM);
    }

    pub fn is_unsent(&self, task_id: &str, execution_id: &str) -> bool {
        self.unsent_outcomes
            .contains(&(task_id.to_owned(), execution_id.to_owned()))
    }

    /// Remembers a cancellation for a task not known yet. False when the memory is full
    /// (the cancellation is then dropped).
    pub fn remember_early_cancellation(&mut self, task_id: &str) -> bool {
        if self.early_cancellations.len() >= EARLY_CANCELLATION_MEMORY {
            return false;
        }
        self.early_cancellations.insert(task_id.to_owned())
    }

    pub fn take_early_cancellation(&mut self, task_id: &str) -> bool {
        self.early_cancellations.remove(task_id)
    }

    pub fn snapshot(&self, node_connected: impl Fn(&str) -> bool) -> Vec<TaskSnapshot> {
        self.tasks
            .iter()
            .filter_map(|(task_id, task)| {
                let node_id = task.node_id.clone()?;
                let connected = node_connected(&node_id);
                Some(task_snapshot(task_id, task, node_id, connected))
            })
            .collect()
    }
}

pub fn task_snapshot(
    task_id: &str,
    task: &Task,
    node_id: Arc<str>,
    node_connected: bool,
) -> TaskSnapshot {
    let state = if !node_connected {
        TaskState::Lost
    } else if task.phase == Phase::Running {
        TaskState::Running
    } else {
        TaskState::Offered
    };
    TaskSnapshot {
        task_id: task_id.to_owned(),
        execution_id: task.execution_id.clone(),
        node_id,
        state,
        since: task.since,
        cancel_requested: task.cancel_requested,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_memory_is_bounded_and_remembers_the_owner() {
        let mut ledger = TaskLedger::default();
        let node: Arc<str> = Arc::from("node-a");
        ledger.remember_finished("t0", "e0", Some(node.clone()));
        assert!(ledger.was_given_to("t0", "e0", "node-a"));
        assert!(!ledger.was_given_to("t0", "e0", "node-b"));
        // Another execution of the task, or the same characters split differently, is
        // another execution.
        assert!(!ledger.is_finished("t0", "e1"));
        assert!(!ledger.is_finished("t0e", "0"));
        for i in 1..=FINISHED_MEMORY {
            ledger.remember_finished(&format!("t{i}"), "e", None);
        }
        assert!(!ledger.is_finished("t0", "e0"), "the oldest is forgotten");
        assert!(ledger.is_finished(&format!("t{FINISHED_MEMORY}"), "e"));
        assert_eq!(ledger.finished.len(), FINISHED_MEMORY);
    }

    #[test]
    fn early_cancellations_are_bounded() {
        let mut ledger = TaskLedger::default();
        for i in 0..EARLY_CANCELLATION_MEMORY {
            assert!(ledger.remember_early_cancellation(&format!("t{i}")));
        }
        assert!(!ledger.remember_early_cancellation("one-too-many"));
        assert!(ledger.take_early_cancellation("t0"));
        assert!(!ledger.take_early_cancellation("t0"));
    }
}
