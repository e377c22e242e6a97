//! Every timer of the fleet in one ordered queue, read by one loop
//! ([`super::Fleet::run_deadlines`]): offer expiry, the node-lost grace and forgetting
//! early cancellations. No task per timer, and time comes from tokio's clock, so tests
//! drive it with paused time.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::time::Instant;

/// What happens when a deadline passes. Each carries what it needs to check it is still
/// current (an offer number, a connection epoch), so a deadline whose reason went away is
/// simply ignored when it fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deadline {
    /// The offer numbered `offer` of `task_id` was not answered in time.
    OfferExpires { task_id: String, offer: u64 },
    /// The node's connection `epoch` ended that long ago and it has not come back.
    NodeLost { node_id: Arc<str>, epoch: u64 },
    /// The node left an offer unanswered an offer timeout ago; if it is still silent on
    /// connection `epoch`, its connection is dropped.
    QuietNode { node_id: Arc<str>, epoch: u64 },
    /// A re-offer held for a node that did not come back goes on without it.
    HoldExpires { task_id: String },
    /// A cancellation for a task no node announced is forgotten.
    EarlyCancellationExpires { task_id: String },
}

/// Identifies one scheduled deadline, to withdraw it.
pub type DeadlineKey = (Instant, u64);

#[derive(Debug, Default)]
pub struct Deadlines {
    queue: BTreeMap<DeadlineKey, Deadline>,
    scheduled: u64,
}

impl Deadlines {
    pub fn schedule(&mut self, at: Instant, deadline: Deadline) -> DeadlineKey {
        self.scheduled += 1;
        let key = (at, self.scheduled);
        self.queue.insert(key, deadline);
        key
    }

    /// Withdraws a deadline that is no longer needed (an answered offer, a node back).
    pub fn withdraw(&mut self, key: DeadlineKey) {
        self.queue.remove(&key);
    }

    /// When the earliest deadline is due.
    pub fn next(&self) -> Option<Instant> {
        self.queue.keys().next().map(|(at, _)| *at)
    }

    /// Removes and returns the earliest deadline if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Deadline> {
        let entry = self.queue.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        Some(entry.remove())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn expiry(task_id: &str) -> Deadline {
        Deadline::EarlyCancellationExpires {
            task_id: task_id.into(),
        }
    }

    #[test]
    fn deadlines_come_due_in_time_order_and_withdrawn_ones_never() {
        let start = Instant::now();
        let mut deadlines = Deadlines::default();
        deadlines.schedule(start + Duration::from_secs(3), expiry("late"));
        let withdrawn = deadlines.schedule(start + Duration::from_secs(1), expiry("gone"));
        deadlines.schedule(start + Duration::from_secs(2), expiry("early"));
        deadlines.schedule(start + Duration::from_secs(2), expiry("early-too"));
        deadlines.withdraw(withdrawn);
        assert_eq!(deadlines.next(), Some(start + Duration::from_secs(2)));

        assert_eq!(deadlines.pop_due(start + Duration::from_secs(1)), None);
        let at_two = start + Duration::from_secs(2);
        assert_eq!(deadlines.pop_due(at_two), Some(expiry("early")));
        assert_eq!(deadlines.pop_due(at_two), Some(expiry("early-too")));
        assert_eq!(deadlines.pop_due(at_two), None);
        assert_eq!(deadlines.len(), 1);
        assert_eq!(
            deadlines.pop_due(start + Duration::from_secs(9)),
            Some(expiry("late"))
        );
        assert!(deadlines.is_empty());
        assert_eq!(deadlines.next(), None);
    }
}
