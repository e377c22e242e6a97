//! Placement: which node gets a task. Pure functions over a snapshot of the fleet, so the
//! policy is testable without any network.

use std::collections::HashSet;

/// What the scheduler needs to know about one connected node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub node_id: &'a str,
    /// Tasks offered to or running on the node.
    pub load: u32,
    /// Maximum concurrent tasks; `None` = unlimited.
    pub capacity: Option<u32>,
    /// Monotonic counter of the node's last placement (0 = never), for fair tie-breaking.
    pub last_placed: u64,
}

impl Candidate<'_> {
    fn has_room(&self) -> bool {
        self.capacity.is_none_or(|capacity| self.load < capacity)
    }

    fn free_slots(&self) -> u32 {
        self.capacity
            .map_or(u32::MAX, |capacity| capacity.saturating_sub(self.load))
    }
}

/// Picks the least-loaded node with a free slot (spreading work across the fleet),
/// skipping `excluded` nodes (those that already refused this task). Ties go to the node
/// with more free slots, then to the one that was placed on least recently.
pub fn pick<'a>(candidates: &[Candidate<'a>], excluded: &HashSet<String>) -> Option<&'a str> {
    candidates
        .iter()
        .filter(|candidate| candidate.has_room() && !excluded.contains(candidate.node_id))
        .min_by(|a, b| {
            a.load
                .cmp(&b.load)
                .then_with(|| b.free_slots().cmp(&a.free_slots()))
                .then_with(|| a.last_placed.cmp(&b.last_placed))
                .then_with(|| a.node_id.cmp(b.node_id))
        })
        .map(|candidate| candidate.node_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(node_id: &str, load: u32, capacity: Option<u32>, last_placed: u64) -> Candidate<'_> {
        Candidate {
            node_id,
            load,
            capacity,
            last_placed,
        }
    }

    fn none_excluded() -> HashSet<String> {
        HashSet::new()
    }

    #[test]
    fn empty_fleet_places_nothing() {
        assert_eq!(pick(&[], &none_excluded()), None);
    }

    #[test]
    fn least_loaded_node_wins() {
        let nodes = [
            node("a", 3, None, 1),
            node("b", 1, None, 2),
            node("c", 2, None, 3),
        ];
        assert_eq!(pick(&nodes, &none_excluded()), Some("b"));
    }

    #[test]
    fn full_nodes_are_skipped_and_an_all_full_fleet_places_nothing() {
        let nodes = [node("a", 1, Some(1), 0), node("b", 4, Some(5), 0)];
        assert_eq!(pick(&nodes, &none_excluded()), Some("b"));
        let full = [node("a", 1, Some(1), 0), node("b", 5, Some(5), 0)];
        assert_eq!(pick(&full, &none_excluded()), None);
    }

    #[test]
    fn zero_capacity_means_no_room_only_when_declared() {
        let nodes = [
            node("limited", 0, Some(0), 0),
            node("unlimited", 7, None, 0),
        ];
        assert_eq!(pick(&nodes, &none_excluded()), Some("unlimited"));
    }

    #[test]
    fn ties_go_to_more_free_slots_then_least_recently_placed() {
        let nodes = [node("small", 0, Some(1), 0), node("big", 0, Some(8), 5)];
        assert_eq!(pick(&nodes, &none_excluded()), Some("big"));
        let nodes = [node("recent", 0, None, 9), node("stale", 0, None, 3)];
        assert_eq!(pick(&nodes, &none_excluded()), Some("stale"));
    }

    #[test]
    fn nodes_that_refused_are_not_asked_again() {
        let nodes = [node("a", 0, None, 0), node("b", 5, None, 0)];
        let excluded = HashSet::from(["a".to_string()]);
        assert_eq!(pick(&nodes, &excluded), Some("b"));
        let excluded = HashSet::from(["a".to_string(), "b".to_string()]);
        assert_eq!(pick(&nodes, &excluded), None);
    }

    #[test]
    fn repeated_placement_spreads_evenly() {
        let mut loads = [(String::from("a"), 0u32, 0u64), (String::from("b"), 0, 0)];
        for round in 1..=20u64 {
            let candidates: Vec<_> = loads
                .iter()
                .map(|(id, load, last)| node(id, *load, None, *last))
                .collect();
            let chosen = pick(&candidates, &none_excluded()).unwrap().to_string();
            let entry = loads.iter_mut().find(|(id, _, _)| *id == chosen).unwrap();
            entry.1 += 1;
            entry.2 = round;
        }
        assert_eq!(loads[0].1, 10);
        assert_eq!(loads[1].1, 10);
    }
}
