//! The single queue of messages to Oz. It outlives connections: a message leaves the
//! queue only after it was written to a socket, so one whose write failed is sent again
//! after the next reconnect instead of being lost (the reference drops it). With a
//! journal, a message is not handed out before the journal entries made ahead of it are
//! on disk (write-ahead; see [`crate::fleet::journal`]).

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use ozfleet_proto::oz::WorkerMessage;
use tokio::sync::Notify;

use crate::fleet::journal::Durability;
use crate::spare::ReleaseSpare as _;

/// Messages the queue keeps room for after a burst has passed.
const QUEUE_ROOM: usize = 64;

#[derive(Default)]
pub struct Outbox {
    queue: Mutex<VecDeque<Queued>>,
    ready: Notify,
    /// Set when the gateway journals (a state dir).
    journal: OnceLock<Durability>,
}

#[derive(Debug, Clone)]
pub struct Queued {
    sequence: u64,
    /// Journal entries that must be on disk before this message may be sent.
    journal_mark: u64,
    pub message: WorkerMessage,
    /// The node outcome this message relays; it is acknowledged to the node once the
    /// message has been written upstream.
    pub receipt: Option<Receipt>,
}

/// Identifies a node's outcome to acknowledge after relaying it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Receipt {
    pub node_id: String,
    pub task_id: String,
    pub execution_id: String,
}

impl Outbox {
    /// From now on, each message waits for the journal entries made before it.
    pub fn write_ahead_of(&self, journal: Durability) {
        let _ = self.journal.set(journal);
    }

    pub fn push(&self, message: WorkerMessage) {
        self.push_with_receipt(message, None);
    }

    pub fn push_with_receipt(&self, message: WorkerMessage, receipt: Option<Receipt>) {
        let mut queue = self.queue.lock().expect("outbox lock poisoned");
        let sequence = queue.back().map_or(0, |last| last.sequence + 1);
        queue.push_back(Queued {
            sequence,
            journal_mark: self.journal.get().map_or(0, Durability::mark),
            message,
            receipt,
        });
        drop(queue);
        self.ready.notify_one();
    }

    /// Waits for the oldest unsent message and returns a copy; it stays queued until
    /// [`Outbox::mark_sent`]. Cancel-safe.
    pub async fn front(&self) -> Queued {
        let mut batch = self.front_batch(1).await;
        batch.swap_remove(0)
    }

    /// Waits for at least one unsent message that may be sent (its journal entries on
    /// disk) and returns copies of the oldest ones, up to `max`, in order; they stay
    /// queued until each is [`Outbox::mark_sent`]. Never empty. Cancel-safe.
    pub async fn front_batch(&self, max: usize) -> Vec<Queued> {
        loop {
            let notified = self.ready.notified();
            let durable_through = self
                .journal
                .get()
                .map_or(u64::MAX, Durability::durable_through);
            let waiting_for = {
                let queue = self.queue.lock().expect("outbox lock poisoned");
                let ready: Vec<Queued> = queue
                    .iter()
                    .take(max.max(1))
                    .take_while(|queued| queued.journal_mark <= durable_through)
                    .cloned()
                    .collect();
                if !ready.is_empty() {
                    return ready;
                }
                queue.front().map(|front| front.journal_mark)
            };
            match (waiting_for, self.journal.get()) {
                (Some(mark), Some(journal)) => journal.wait_for(mark).await,
                _ => notified.await,
            }
        }
    }

    pub fn mark_sent(&self, sent: &Queued) {
        let mut queue = self.queue.lock().expect("outbox lock poisoned");
        if queue
            .front()
            .is_some_and(|front| front.sequence == sent.sequence)
        {
            queue.pop_front();
            queue.release_spare(QUEUE_ROOM);
        }
        let more = !queue.is_empty();
        drop(queue);
        if more {
            self.ready.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.queue.lock().expect("outbox lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_leave_in_order_and_only_once_sent() {
        let outbox = Outbox::default();
        outbox.push(WorkerMessage::claimed("t1", "w"));
        outbox.push(WorkerMessage::completed("t1"));

        let first = outbox.front().await;
        assert_eq!(first.message, WorkerMessage::claimed("t1", "w"));
        // A failed write does not mark it sent: the same message comes back.
        let again = outbox.front().await;
        assert_eq!(again.message, first.message);
        outbox.mark_sent(&first);
        // Marking twice must not drop the next message.
        outbox.mark_sent(&first);
        assert_eq!(outbox.front().await.message, WorkerMessage::completed("t1"));
        assert_eq!(outbox.len(), 1);
    }

    #[tokio::test]
    async fn a_batch_is_the_oldest_messages_in_order_and_stays_until_marked_sent() {
        let outbox = Outbox::default();
        for task in ["t1", "t2", "t3"] {
            outbox.push(WorkerMessage::completed(task));
        }
        let batch = outbox.front_batch(2).await;
        let tasks: Vec<&str> = batch.iter().map(|q| q.message.task_id()).collect();
        assert_eq!(tasks, ["t1", "t2"]);
        // Nothing marked (a failed write): the same batch comes back.
        assert_eq!(outbox.front_batch(2).await.len(), 2);
        assert_eq!(outbox.len(), 3);
        for queued in &batch {
            outbox.mark_sent(queued);
        }
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox.front_batch(8).await[0].message.task_id(), "t3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_waits_for_the_journal_entries_made_before_it() {
        use std::sync::atomic::Ordering;
        use std::time::Duration;
        let outbox = Outbox::default();
        // Before the journal: nothing to wait for.
        outbox.push(WorkerMessage::rejected_at_capacity("t0"));
        let (journal, queued, durable) = Durability::for_test();
        outbox.write_ahead_of(journal);
        queued.store(2, Ordering::SeqCst);
        outbox.push(WorkerMessage::claimed("t1", "w"));
        let batch = outbox.front_batch(8).await;
        assert_eq!(batch.len(), 1, "only the message from before the journal");
        outbox.mark_sent(&batch[0]);
        let held = tokio::time::timeout(Duration::from_secs(60), outbox.front()).await;
        assert!(
            held.is_err(),
            "sent before its journal entries were on disk"
        );
        durable.send_replace(1);
        let held = tokio::time::timeout(Duration::from_secs(60), outbox.front()).await;
        assert!(
            held.is_err(),
            "sent with one of its two journal entries on disk"
        );
        durable.send_replace(2);
        let claim = outbox.front().await;
        assert_eq!(claim.message, WorkerMessage::claimed("t1", "w"));
        outbox.mark_sent(&claim);
        // A writer that stopped (disk error, logged) holds nothing back.
        queued.store(3, Ordering::SeqCst);
        outbox.push(WorkerMessage::completed("t1"));
        let held = tokio::time::timeout(Duration::from_secs(60), outbox.front()).await;
        assert!(held.is_err());
        drop(durable);
        assert_eq!(outbox.front().await.message, WorkerMessage::completed("t1"));
    }

    #[tokio::test]
    async fn front_wakes_up_when_a_message_arrives() {
        let outbox = std::sync::Arc::new(Outbox::default());
        let mut waiter = tokio::task::JoinSet::new();
        waiter.spawn({
            let outbox = outbox.clone();
            async move { outbox.front().await.message }
        });
        tokio::task::yield_now().await;
        outbox.push(WorkerMessage::rejected_at_capacity("t9"));
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), waiter.join_next())
            .await
            .expect("woken")
            .unwrap()
            .unwrap();
        assert_eq!(message, WorkerMessage::rejected_at_capacity("t9"));
    }
}
