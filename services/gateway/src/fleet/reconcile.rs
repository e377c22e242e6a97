//! Reconciliation of a hello: a node announces its full state (running tasks,
//! outcomes not yet acknowledged) on every attach, and the gateway squares it with what it
//! placed there. Level-triggered: whatever was lost with an old connection (an acceptance,
//! an offer, a cancellation, an acknowledgement) is repaired from the hello alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use ozfleet_proto::v1::NodeHello;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::FleetState;
use super::events::FleetEvent;
use super::ledger::{Phase, Task};

impl FleetState {
    pub(super) fn reconcile(&mut self, node_id: &Arc<str>, hello: &NodeHello) {
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

        self.reconcile_placed(node_id, &reported, &finished);
        self.reconcile_reported(node_id, &reported);
        for outcome in &hello.unacknowledged_outcomes {
            self.settle(node_id, outcome.clone());
        }
    }

    /// Tasks the gateway placed on this node, against what the node says it runs.
    fn reconcile_placed(
        &mut self,
        node_id: &Arc<str>,
        reported: &HashMap<&str, &str>,
        finished: &HashSet<(&str, &str)>,
    ) {
        let placed: Vec<String> = self
            .registry
            .get(node_id)
            .map(|node| node.tasks.iter().cloned().collect())
            .unwrap_or_default();
        for task_id in placed {
            let Some(task) = self.ledger.tasks.get(&task_id) else {
                error!(task_id, %node_id, "Node record lists a task the ledger does not hold; repairing");
                if let Some(node) = self.registry.get_mut(node_id) {
                    node.tasks.remove(&task_id);
                }
                continue;
            };
            let execution_id = task.execution_id.clone();
            let (phase, cancel_requested) = (task.phase, task.cancel_requested);
            if reported.get(task_id.as_str()) == Some(&execution_id.as_str()) {
                if let Phase::Offered { .. } = phase {
                    // The acceptance was lost with the old connection.
                    self.accepted(&task_id);
                }
                if cancel_requested {
                    self.cancel_on(node_id, &task_id, &execution_id);
                }
            } else if finished.contains(&(task_id.as_str(), execution_id.as_str())) {
                // Settled from the outcome itself, after this.
            } else if let Phase::Offered { .. } = phase {
                debug!(task_id, %node_id, "Offer lost with the old connection; offering again");
                self.take_back(&task_id, false);
            } else {
                let node_name = self
                    .registry
                    .get(node_id)
                    .map(|node| node.name.clone())
                    .unwrap_or_default();
                self.lose_task(
                    &task_id,
                    &format!("node {node_name} ({node_id}) restarted and no longer runs the task"),
                );
            }
        }
    }

    /// Tasks the node runs that the gateway did not place there.
    fn reconcile_reported(&mut self, node_id: &Arc<str>, reported: &HashMap<&str, &str>) {
        let adopting = Instant::now() < self.adopt_until;
        for (&task_id, &execution_id) in reported {
            match self.ledger.tasks.get(task_id) {
                Some(task) if task.is_on(node_id, execution_id) => {}
                Some(task) => {
                    warn!(
                        task_id,
                        %node_id,
                        owner = task.node_id.as_deref(),
                        "Node runs a task placed elsewhere; telling it to stop"
                    );
                    self.cancel_on(node_id, task_id, execution_id);
                }
                None if self.ledger.is_finished(task_id, execution_id) => {
                    warn!(
                        task_id,
                        %node_id,
                        "Node runs a task that was already settled upstream; telling it to stop"
                    );
                    self.cancel_on(node_id, task_id, execution_id);
                }
                None if self
                    .recovered
                    .get(&(task_id.to_owned(), execution_id.to_owned()))
                    .is_some_and(|owner| owner == node_id) =>
                {
                    // Handed to this very node before the gateway restarted.
                    self.recovered
                        .remove(&(task_id.to_owned(), execution_id.to_owned()));
                    self.adopt(node_id, task_id, execution_id);
                }
                None if self
                    .recovered
                    .contains_key(&(task_id.to_owned(), execution_id.to_owned())) =>
                {
                    warn!(
                        task_id,
                        %node_id,
                        "Node runs a task the journal gives to another node; telling it to stop"
                    );
                    self.cancel_on(node_id, task_id, execution_id);
                }
                None if !adopting => {
                    warn!(
                        task_id,
                        %node_id,
                        "Node runs a task this gateway never gave it, past the reattach window; telling it to stop"
                    );
                    self.cancel_on(node_id, task_id, execution_id);
                }
                None => self.adopt(node_id, task_id, execution_id),
            }
        }
    }

    /// Takes over a task a node kept running across a gateway restart.
    fn adopt(&mut self, node_id: &Arc<str>, task_id: &str, execution_id: &str) {
        info!(task_id, %node_id, "Adopting a task the node is running");
        let cancel_requested = self.ledger.take_early_cancellation(task_id);
        self.ledger.tasks.insert(
            task_id.to_owned(),
            Task {
                execution_id: execution_id.to_owned(),
                node_id: Some(node_id.clone()),
                phase: Phase::Running,
                cancel_requested,
                cancelled_by_operator: false,
                assignment_json: None,
                refused_by: HashSet::new(),
                offer_deadline: None,
                since: SystemTime::now(),
                assigned_at: None,
                running_since: Some(Instant::now()),
                offered_at: None,
                span: self.task_span(task_id, None, true),
            },
        );
        if let Some(node) = self.registry.get_mut(node_id) {
            node.tasks.insert(task_id.to_owned());
        }
        self.journal.given(task_id, execution_id, node_id);
        self.emit(FleetEvent::TaskStarted {
            task_id: task_id.to_owned(),
            execution_id: execution_id.to_owned(),
            node_id: node_id.clone(),
            adopted: true,
        });
        if cancel_requested {
            info!(task_id, %node_id, "Applying the cancellation Oz sent before the node returned");
            self.cancel_on(node_id, task_id, execution_id);
        }
    }
}
