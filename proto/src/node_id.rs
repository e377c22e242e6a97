//! The node identity rule, shared by the agent (which creates and stores the id) and the
//! gateway (which validates every hello): one place, so they can never disagree.

/// Longest node id accepted.
pub const MAX_NODE_ID_LEN: usize = 128;

/// How a valid node id looks, for error messages.
pub const NODE_ID_RULE: &str = "1-128 characters of [A-Za-z0-9._-]";

/// True for 1-128 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_node_id(id: &str) -> bool {
    (1..=MAX_NODE_ID_LEN).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_short_and_plain() {
        assert!(is_valid_node_id("node-1.a_b"));
        assert!(is_valid_node_id(&"x".repeat(MAX_NODE_ID_LEN)));
        for bad in [
            "",
            "has space",
            "slash/",
            "ü",
            &"x".repeat(MAX_NODE_ID_LEN + 1),
        ] {
            assert!(!is_valid_node_id(bad), "{bad:?}");
        }
    }
}
