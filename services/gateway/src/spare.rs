//! Memory back after a burst. std's maps and queues keep their largest capacity until
//! they are dropped, so one overload would leave the ledger's task map and the outbox
//! sized for it for the life of the process (measured: ~1.4 MB still held at 1,000 nodes
//! after a 30,000 tasks/s spell). A collection under a quarter full shrinks to twice its
//! length: each shrink at least halves the capacity and follows ≥ 3/4 of it in removals,
//! so it costs O(1) amortised, and a collection only grows again after its length more
//! than doubles.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};

pub trait ReleaseSpare {
    /// Shrinks if under a quarter full, never below room for `floor` entries (so a
    /// collection that stays small never reallocates).
    fn release_spare(&mut self, floor: usize);
}

/// The capacity to shrink to, if any. Only when that at least halves the capacity: a
/// collection sitting between `floor` and twice it is left alone instead of being asked,
/// on every removal, to shrink to the size it already has.
fn shrunk_capacity(len: usize, capacity: usize, floor: usize) -> Option<usize> {
    (capacity / 2 > floor && len < capacity / 4).then(|| len.saturating_mul(2).max(floor))
}

impl<K: Eq + Hash, V, S: BuildHasher> ReleaseSpare for HashMap<K, V, S> {
    fn release_spare(&mut self, floor: usize) {
        if let Some(capacity) = shrunk_capacity(self.len(), self.capacity(), floor) {
            self.shrink_to(capacity);
        }
    }
}

impl<T: Eq + Hash, S: BuildHasher> ReleaseSpare for HashSet<T, S> {
    fn release_spare(&mut self, floor: usize) {
        if let Some(capacity) = shrunk_capacity(self.len(), self.capacity(), floor) {
            self.shrink_to(capacity);
        }
    }
}

impl<T> ReleaseSpare for VecDeque<T> {
    fn release_spare(&mut self, floor: usize) {
        if let Some(capacity) = shrunk_capacity(self.len(), self.capacity(), floor) {
            self.shrink_to(capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collection_gives_back_what_a_burst_left_and_keeps_its_entries() {
        const BURST: u64 = 100_000;
        const KEPT: u64 = 10;
        let mut map: HashMap<u64, u64> = (0..BURST).map(|i| (i, i)).collect();
        let mut set: HashSet<u64> = (0..BURST).collect();
        let mut queue: VecDeque<u64> = (0..BURST).collect();
        for i in 0..BURST - KEPT {
            map.remove(&i);
            map.release_spare(1024);
            set.remove(&i);
            set.release_spare(1024);
            queue.pop_front();
            queue.release_spare(1024);
        }
        for capacity in [map.capacity(), set.capacity(), queue.capacity()] {
            assert!(
                (1024..4096).contains(&capacity),
                "capacity {capacity} after a burst of {BURST}"
            );
        }
        let kept = BURST - KEPT..BURST;
        assert!(
            kept.clone()
                .all(|i| map.get(&i) == Some(&i) && set.contains(&i))
        );
        assert!(queue.iter().copied().eq(kept));
    }

    #[test]
    fn shrinking_waits_for_a_quarter_and_leaves_room_to_grow() {
        assert_eq!(shrunk_capacity(300, 1000, 64), None, "not under a quarter");
        assert_eq!(shrunk_capacity(200, 1000, 64), Some(400));
        assert_eq!(
            shrunk_capacity(10, 1000, 64),
            Some(64),
            "never below the floor"
        );
        assert_eq!(shrunk_capacity(0, 64, 64), None, "at the floor already");
        assert_eq!(
            shrunk_capacity(10, 112, 64),
            None,
            "a shrink to the floor would not halve it"
        );
    }
}
