//! Names of what the Docker backend creates: task containers (deterministic per node and
//! execution, so a restarted agent finds the same name) and the one sanitising rule both
//! container and sidecar volume names follow.

/// Docker's limit is not documented; this keeps names readable and well within it.
const NAME_PART_MAX: usize = 40;

/// `text` with every character outside Docker's name alphabet (`[A-Za-z0-9_.-]`)
/// replaced by `-`.
pub(super) fn sanitise(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The deterministic container name of one execution on one node:
/// `ozfleet-<task>-<execution>-<hash>`, the ids sanitised to Docker's name alphabet and
/// shortened, the hash (of the unsanitised node, task and execution ids) keeping names of
/// different executions apart after sanitising.
pub fn container_name(node_id: &str, task_id: &str, execution_id: &str) -> String {
    fn part(id: &str) -> String {
        let shortened: String = id.chars().take(NAME_PART_MAX).collect();
        let sanitised = sanitise(&shortened);
        if sanitised.is_empty() {
            "none".to_owned()
        } else {
            sanitised
        }
    }
    let hash = fnv1a64(&[node_id, task_id, execution_id]);
    format!(
        "ozfleet-{}-{}-{:012x}",
        part(task_id),
        part(execution_id),
        hash & 0xffff_ffff_ffff
    )
}

/// FNV-1a over the parts, each followed by a NUL: stable across builds and processes
/// (unlike std's hasher), which a restarted agent relies on to find the same name.
fn fnv1a64(parts: &[&str]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    parts
        .iter()
        .flat_map(|part| part.bytes().chain(std::iter::once(0)))
        .fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_bounded_and_distinct() {
        let name = container_name("node-1", "019f-run", "exec-1");
        assert!(name.starts_with("ozfleet-019f-run-exec-1-"), "{name}");
        assert_eq!(name, container_name("node-1", "019f-run", "exec-1"));
        assert_ne!(name, container_name("node-2", "019f-run", "exec-1"));
        assert_ne!(name, container_name("node-1", "019f-run", "exec-2"));
        // Sanitising maps both to the same text; the hash keeps them apart.
        assert_ne!(
            container_name("n", "a/b", "e"),
            container_name("n", "a:b", "e")
        );
        let long = "x".repeat(500);
        let weird = container_name("n", &long, "é t/\u{0}");
        assert!(weird.len() <= 8 + NAME_PART_MAX * 2 + 2 + 12, "{weird}");
        assert!(
            weird
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')),
            "{weird}"
        );
        assert!(container_name("n", "", "").starts_with("ozfleet-none-none-"));
    }

    #[test]
    fn sanitising_keeps_the_name_alphabet_only() {
        assert_eq!(sanitise("localhost:5999/a_b.c-d"), "localhost-5999-a_b.c-d");
        assert_eq!(sanitise("é"), "-");
    }
}
