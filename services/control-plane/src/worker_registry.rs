//! In-memory view of the connected workers: their connections, the runs offered to them
//! and not yet answered, which connection holds which claimed run, and rejected runs
//! waiting before they may be offered again.
//!
//! None of this survives a restart, by design: an offer nobody answered is simply made
//! again, and claimed runs are found again through `claimed_by` in the store.

use std::collections::{BTreeMap, HashMap};

use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

pub type ConnectionId = u64;

struct WorkerConnection {
    worker_id: String,
    /// Text frames for the connection's writer.
    outbox: UnboundedSender<String>,
}

/// A run sent to one connection in a `task_assignment`, awaiting its claim or rejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub connection: ConnectionId,
    pub execution_id: String,
}

struct ReofferDelay {
    not_before: Instant,
    worker_host: String,
}

#[derive(Default)]
pub struct WorkerRegistry {
    /// Ordered so that round-robin walks connections in a stable order.
    connections: BTreeMap<ConnectionId, WorkerConnection>,
    next_connection_id: ConnectionId,
    /// Per worker id, how many offers round-robin has handed out.
    offers_handed_out: HashMap<String, usize>,
    offers: HashMap<String, Offer>,
    holders: HashMap<String, ConnectionId>,
    reoffer_delays: HashMap<String, ReofferDelay>,
}

impl WorkerRegistry {
    pub fn connect(&mut self, worker_id: &str, outbox: UnboundedSender<String>) -> ConnectionId {
        let id = self.next_connection_id;
        self.next_connection_id += 1;
        self.connections.insert(
            id,
            WorkerConnection {
                worker_id: worker_id.to_owned(),
                outbox,
            },
        );
        id
    }

    /// Forgets a connection; returns the runs whose offers it never answered, which are
    /// queued again.
    pub fn disconnect(&mut self, connection: ConnectionId) -> Vec<String> {
        self.connections.remove(&connection);
        self.holders.retain(|_, holder| *holder != connection);
        let withdrawn: Vec<String> = self
            .offers
            .iter()
            .filter(|(_, offer)| offer.connection == connection)
            .map(|(run_id, _)| run_id.clone())
            .collect();
        for run_id in &withdrawn {
            self.offers.remove(run_id);
        }
        withdrawn
    }

    pub fn is_connected(&self, worker_id: &str) -> bool {
        self.connections
            .values()
            .any(|connection| connection.worker_id == worker_id)
    }

    /// Every worker id with at least one connection, each once.
    pub fn connected_worker_ids(&self) -> Vec<String> {
        let mut worker_ids: Vec<String> = self
            .connections
            .values()
            .map(|connection| connection.worker_id.clone())
            .collect();
        worker_ids.sort();
        worker_ids.dedup();
        worker_ids
    }

    /// The connection of `worker_id` next in turn; Oz spreads runs across connections that
    /// share a worker id.
    pub fn next_connection_for(&mut self, worker_id: &str) -> Option<ConnectionId> {
        let candidates: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.worker_id == worker_id)
            .map(|(id, _)| *id)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let handed_out = self
            .offers_handed_out
            .entry(worker_id.to_owned())
            .or_default();
        let chosen = candidates[*handed_out % candidates.len()];
        *handed_out = handed_out.wrapping_add(1);
        Some(chosen)
    }

    /// Queues a frame for one connection; false when that connection is gone.
    pub fn send(&self, connection: ConnectionId, frame: String) -> bool {
        self.connections
            .get(&connection)
            .is_some_and(|target| target.outbox.send(frame).is_ok())
    }

    /// Sends a frame about a claimed run to the connection holding it or, when that one is
    /// gone, to every connection of the worker that claimed it (a worker ignores frames for
    /// tasks it does not run). Returns how many connections it was sent to.
    pub fn send_to_holder(&self, run_id: &str, claimed_by: &str, frame: String) -> usize {
        if let Some(holder) = self.holders.get(run_id)
            && self.send(*holder, frame.clone())
        {
            return 1;
        }
        self.connections
            .values()
            .filter(|connection| connection.worker_id == claimed_by)
            .filter(|connection| connection.outbox.send(frame.clone()).is_ok())
            .count()
    }

    pub fn record_offer(&mut self, run_id: &str, offer: Offer) {
        self.reoffer_delays.remove(run_id);
        self.offers.insert(run_id.to_owned(), offer);
    }

    pub fn has_offer(&self, run_id: &str) -> bool {
        self.offers.contains_key(run_id)
    }

    /// Removes and returns the offer of `run_id` if it was made to `connection`.
    pub fn take_offer(&mut self, run_id: &str, connection: ConnectionId) -> Option<Offer> {
        if self.offers.get(run_id)?.connection != connection {
            return None;
        }
        self.offers.remove(run_id)
    }

    /// Drops every trace of a queued run that will never be offered again.
    pub fn forget_run(&mut self, run_id: &str) {
        self.offers.remove(run_id);
        self.reoffer_delays.remove(run_id);
        self.holders.remove(run_id);
    }

    pub fn delay_reoffer(&mut self, run_id: &str, worker_host: &str, not_before: Instant) {
        self.reoffer_delays.insert(
            run_id.to_owned(),
            ReofferDelay {
                not_before,
                worker_host: worker_host.to_owned(),
            },
        );
    }

    /// When a rejected run may be offered again; `None` if it is not waiting.
    pub fn reoffer_not_before(&self, run_id: &str) -> Option<Instant> {
        self.reoffer_delays
            .get(run_id)
            .map(|delay| delay.not_before)
    }

    /// A worker that finished a run has room again: its rejected runs need not wait.
    pub fn end_reoffer_delays_for(&mut self, worker_host: &str) {
        self.reoffer_delays
            .retain(|_, delay| delay.worker_host != worker_host);
    }

    pub fn set_holder(&mut self, run_id: &str, connection: ConnectionId) {
        self.holders.insert(run_id.to_owned(), connection);
    }

    pub fn release_holder(&mut self, run_id: &str) {
        self.holders.remove(run_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    fn connect(
        workers: &mut WorkerRegistry,
        worker_id: &str,
    ) -> (ConnectionId, UnboundedReceiver<String>) {
        let (outbox, frames) = unbounded_channel();
        (workers.connect(worker_id, outbox), frames)
    }

    fn offer_to(connection: ConnectionId) -> Offer {
        Offer {
            connection,
            execution_id: format!("execution-{connection}"),
        }
    }

    #[test]
    fn round_robin_spreads_offers_across_connections_of_one_worker() {
        let mut workers = WorkerRegistry::default();
        let (first, _f1) = connect(&mut workers, "w");
        let (_other, _f2) = connect(&mut workers, "other");
        let (second, _f3) = connect(&mut workers, "w");
        let chosen: Vec<_> = (0..4)
            .map(|_| workers.next_connection_for("w").unwrap())
            .collect();
        assert_eq!(chosen, vec![first, second, first, second]);
        assert_eq!(workers.next_connection_for("absent"), None);
        assert_eq!(workers.connected_worker_ids(), vec!["other", "w"]);
    }

    #[test]
    fn disconnecting_withdraws_unanswered_offers_only_of_that_connection() {
        let mut workers = WorkerRegistry::default();
        let (first, _f1) = connect(&mut workers, "w");
        let (second, _f2) = connect(&mut workers, "w");
        workers.record_offer("a", offer_to(first));
        workers.record_offer("b", offer_to(second));
        assert_eq!(workers.disconnect(first), vec!["a".to_string()]);
        assert!(!workers.has_offer("a"));
        assert!(workers.has_offer("b"));
        assert!(workers.is_connected("w"));
        workers.disconnect(second);
        assert!(!workers.is_connected("w"));
    }

    #[test]
    fn offers_are_taken_only_by_the_connection_they_were_made_to() {
        let mut workers = WorkerRegistry::default();
        let (first, _f1) = connect(&mut workers, "w");
        let (second, _f2) = connect(&mut workers, "w");
        workers.record_offer("a", offer_to(first));
        assert_eq!(workers.take_offer("a", second), None);
        assert_eq!(workers.take_offer("a", first), Some(offer_to(first)));
        assert_eq!(workers.take_offer("a", first), None);
    }

    #[test]
    fn frames_for_a_claimed_run_go_to_its_holder_or_else_to_its_worker() {
        let mut workers = WorkerRegistry::default();
        let (holder, mut holder_frames) = connect(&mut workers, "w");
        let (_sibling, mut sibling_frames) = connect(&mut workers, "w");
        workers.set_holder("a", holder);
        assert_eq!(workers.send_to_holder("a", "w", "first".into()), 1);
        assert_eq!(holder_frames.try_recv().unwrap(), "first");
        assert!(sibling_frames.try_recv().is_err());

        workers.disconnect(holder);
        assert_eq!(workers.send_to_holder("a", "w", "second".into()), 1);
        assert_eq!(sibling_frames.try_recv().unwrap(), "second");
        assert_eq!(workers.send_to_holder("a", "nobody", "third".into()), 0);
    }

    #[test]
    fn a_finished_run_ends_the_reoffer_delays_of_its_worker() {
        let mut workers = WorkerRegistry::default();
        let later = Instant::now() + std::time::Duration::from_secs(60);
        workers.delay_reoffer("a", "w", later);
        workers.delay_reoffer("b", "other", later);
        workers.end_reoffer_delays_for("w");
        assert_eq!(workers.reoffer_not_before("a"), None);
        assert_eq!(workers.reoffer_not_before("b"), Some(later));
    }
}
