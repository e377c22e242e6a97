//! The single queue of messages to Oz. It outlives connections: a message leaves the
//! queue only after it was written to a socket, so one whose write failed is sent again
//! after the next reconnect instead of being lost (the reference drops it).

use std::collections::VecDeque;
use std::sync::Mutex;

use ozfleet_proto::oz::WorkerMessage;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Outbox {
    queue: Mutex<VecDeque<Queued>>,
    ready: Notify,
}

#[derive(Debug, Clone)]
pub struct Queued {
    sequence: u64,
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
    pub fn push(&self, message: WorkerMessage) {
        self.push_with_receipt(message, None);
    }

    pub fn push_with_receipt(&self, message: WorkerMessage, receipt: Option<Receipt>) {
        let mut queue = self.queue.lock().expect("outbox lock poisoned");
        let sequence = queue.back().map_or(0, |last| last.sequence + 1);
        queue.push_back(Queued {
            sequence,
            message,
            receipt,
        });
        drop(queue);
        self.ready.notify_one();
    }

    /// Waits for the oldest unsent message and returns a copy; it stays queued until
    /// [`Outbox::mark_sent`]. Cancel-safe.
    pub async fn front(&self) -> Queued {
        loop {
            let notified = self.ready.notified();
            if let Some(front) = self.queue.lock().expect("outbox lock poisoned").front() {
                return front.clone();
            }
            notified.await;
        }
    }

    /// Waits for at least one unsent message and returns copies of the oldest ones, up
    /// to `max`, in order; they stay queued until each is [`Outbox::mark_sent`].
    /// Cancel-safe.
    pub async fn front_batch(&self, max: usize) -> Vec<Queued> {
        loop {
            let notified = self.ready.notified();
            {
                let queue = self.queue.lock().expect("outbox lock poisoned");
                if !queue.is_empty() {
                    return queue.iter().take(max.max(1)).cloned().collect();
                }
            }
            notified.await;
        }
    }

    pub fn mark_sent(&self, sent: &Queued) {
        let mut queue = self.queue.lock().expect("outbox lock poisoned");
        if queue
            .front()
            .is_some_and(|front| front.sequence == sent.sequence)
        {
            queue.pop_front();
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
