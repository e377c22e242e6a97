//! Placement: which connected node gets a task. An ordered index over the eligible nodes,
//! so a pick is O(log N) in the number of nodes instead of a scan of the fleet; callers
//! narrow the candidates with a predicate (refusals, labels, backend) without touching the
//! policy.
//!
//! Policy (least-loaded spread): the node with the fewest tasks wins; ties go to the node
//! with more free slots, then to the one placed on least recently, then to the one that
//! attached first. Only nodes with a free slot are in the index at all, so a full,
//! draining or disconnected node costs nothing at placement time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What placement needs to know about one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Tasks offered to or running on the node.
    pub load: u32,
    /// Maximum concurrent tasks; `None` = unlimited.
    pub capacity: Option<u32>,
    /// Monotonic counter of the node's last placement (0 = never), for fair tie-breaking.
    pub last_placed: u64,
}

impl Standing {
    fn has_room(&self) -> bool {
        self.capacity.is_none_or(|capacity| self.load < capacity)
    }

    fn free_slots(&self) -> u32 {
        self.capacity
            .map_or(u32::MAX, |capacity| capacity.saturating_sub(self.load))
    }
}

/// Sort key: smaller is better. `seq` (assigned once per node id) makes keys unique and
/// breaks the last ties with an integer compare, not a string compare.
type Key = (u32, Reverse<u32>, u64, u64);

fn key(standing: &Standing, seq: u64) -> Key {
    (
        standing.load,
        Reverse(standing.free_slots()),
        standing.last_placed,
        seq,
    )
}

/// The eligible nodes in placement order.
#[derive(Debug, Default)]
pub struct PlacementIndex {
    order: BTreeMap<Key, Arc<str>>,
    keys: HashMap<Arc<str>, Key>,
}

impl PlacementIndex {
    /// Puts the node in the index with its current standing, or takes it out when it has
    /// no free slot.
    pub fn update(&mut self, node_id: &Arc<str>, seq: u64, standing: Standing) {
        self.remove(node_id);
        if standing.has_room() {
            let key = key(&standing, seq);
            self.order.insert(key, node_id.clone());
            self.keys.insert(node_id.clone(), key);
        }
    }

    /// Takes the node out (disconnected, draining, forgotten).
    pub fn remove(&mut self, node_id: &str) {
        if let Some(key) = self.keys.remove(node_id) {
            self.order.remove(&key);
        }
    }

    /// The best eligible node that `accept` agrees to. Visits nodes best first, so the
    /// cost is O(log N) plus the nodes the predicate turns down.
    pub fn pick(&self, accept: impl Fn(&str) -> bool) -> Option<Arc<str>> {
        self.order.values().find(|node_id| accept(node_id)).cloned()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, node_id: &str) -> bool {
        self.keys.contains_key(node_id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn standing(load: u32, capacity: Option<u32>, last_placed: u64) -> Standing {
        Standing {
            load,
            capacity,
            last_placed,
        }
    }

    fn index(nodes: &[(&str, Standing)]) -> PlacementIndex {
        let mut index = PlacementIndex::default();
        for (seq, (node_id, standing)) in nodes.iter().enumerate() {
            index.update(&Arc::from(*node_id), seq as u64, *standing);
        }
        index
    }

    fn pick_any(index: &PlacementIndex) -> Option<String> {
        index.pick(|_| true).map(|node| node.to_string())
    }

    #[test]
    fn empty_fleet_places_nothing() {
        assert_eq!(pick_any(&PlacementIndex::default()), None);
    }

    #[test]
    fn least_loaded_node_wins() {
        let index = index(&[
            ("a", standing(3, None, 1)),
            ("b", standing(1, None, 2)),
            ("c", standing(2, None, 3)),
        ]);
        assert_eq!(pick_any(&index).as_deref(), Some("b"));
    }

    #[test]
    fn full_nodes_are_not_indexed_and_an_all_full_fleet_places_nothing() {
        let index1 = index(&[
            ("a", standing(1, Some(1), 0)),
            ("b", standing(4, Some(5), 0)),
        ]);
        assert_eq!(pick_any(&index1).as_deref(), Some("b"));
        assert!(!index1.contains("a"));
        let full = index(&[
            ("a", standing(1, Some(1), 0)),
            ("b", standing(5, Some(5), 0)),
        ]);
        assert_eq!(pick_any(&full), None);
        assert!(full.is_empty());
    }

    #[test]
    fn zero_capacity_means_no_room_only_when_declared() {
        let index = index(&[
            ("limited", standing(0, Some(0), 0)),
            ("unlimited", standing(7, None, 0)),
        ]);
        assert_eq!(pick_any(&index).as_deref(), Some("unlimited"));
    }

    #[test]
    fn ties_go_to_more_free_slots_then_least_recently_placed_then_first_attached() {
        let index1 = index(&[
            ("small", standing(0, Some(1), 0)),
            ("big", standing(0, Some(8), 5)),
        ]);
        assert_eq!(pick_any(&index1).as_deref(), Some("big"));
        let index2 = index(&[
            ("recent", standing(0, None, 9)),
            ("stale", standing(0, None, 3)),
        ]);
        assert_eq!(pick_any(&index2).as_deref(), Some("stale"));
        let index3 = index(&[
            ("z-first", standing(0, None, 0)),
            ("a-second", standing(0, None, 0)),
        ]);
        assert_eq!(pick_any(&index3).as_deref(), Some("z-first"));
    }

    #[test]
    fn the_predicate_narrows_candidates_without_changing_the_order() {
        let index = index(&[("a", standing(0, None, 0)), ("b", standing(5, None, 0))]);
        let refused = HashSet::from(["a".to_string()]);
        let picked = index.pick(|node| !refused.contains(node));
        assert_eq!(picked.as_deref(), Some("b"));
        assert_eq!(index.pick(|_| false), None);
    }

    #[test]
    fn updates_move_a_node_and_removal_takes_it_out() {
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let mut index = PlacementIndex::default();
        index.update(&a, 0, standing(0, None, 0));
        index.update(&b, 1, standing(1, None, 0));
        assert_eq!(pick_any(&index).as_deref(), Some("a"));
        index.update(&a, 0, standing(2, None, 1));
        assert_eq!(pick_any(&index).as_deref(), Some("b"));
        assert_eq!(index.len(), 2);
        index.remove("b");
        assert_eq!(pick_any(&index).as_deref(), Some("a"));
        index.remove("a");
        assert!(index.is_empty());
    }

    #[test]
    fn repeated_placement_spreads_evenly() {
        let ids: Vec<Arc<str>> = vec![Arc::from("a"), Arc::from("b")];
        let mut standings = [standing(0, None, 0), standing(0, None, 0)];
        let mut index = PlacementIndex::default();
        for (seq, node) in ids.iter().enumerate() {
            index.update(node, seq as u64, standings[seq]);
        }
        for round in 1..=20u64 {
            let chosen = index.pick(|_| true).unwrap();
            let seq = ids.iter().position(|id| *id == chosen).unwrap();
            standings[seq].load += 1;
            standings[seq].last_placed = round;
            index.update(&chosen, seq as u64, standings[seq]);
        }
        assert_eq!(standings[0].load, 10);
        assert_eq!(standings[1].load, 10);
    }
}
