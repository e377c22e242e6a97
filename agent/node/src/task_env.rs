//! The environment injected into every task (spec §3.2).
//!
//! Values carry credentials (`WARP_API_KEY`, `GITHUB_ACCESS_TOKEN`, …): never log them.

use std::collections::HashMap;
use std::hash::Hash;

use ozfleet_proto::oz::TaskAssignment;

use crate::backend::{TaskEnv, secret_env};

/// The common task environment, in the reference order: `TASK_ID`, `GIT_TERMINAL_PROMPT`,
/// `GH_PROMPT_DISABLED`, `WARP_SERVER_ROOT_URL` (only when non-empty), then every
/// `env_vars` entry of the assignment (sorted by name). Later entries win on duplicates.
pub fn common_task_env(assignment: &TaskAssignment, server_root_url: &str) -> TaskEnv {
    let mut env = vec![
        ("TASK_ID".to_owned(), assignment.task.id.clone()),
        ("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned()),
        ("GH_PROMPT_DISABLED".to_owned(), "1".to_owned()),
    ];
    if !server_root_url.is_empty() {
        env.push((
            "WARP_SERVER_ROOT_URL".to_owned(),
            server_root_url.to_owned(),
        ));
    }
    env.extend(
        assignment
            .env_vars
            .0
            .iter()
            .map(|(name, value)| (name.clone(), value.clone())),
    );
    secret_env(env)
}

/// Removes duplicate names: the last value wins and stays at the position of the name's
/// first occurrence (the reference worker's `mergeEnvVars`).
pub fn dedupe_last_wins<K, V>(env: Vec<(K, V)>) -> Vec<(K, V)>
where
    K: Eq + Hash + Clone,
{
    let mut positions: HashMap<K, usize> = HashMap::with_capacity(env.len());
    let mut deduped: Vec<(K, V)> = Vec::with_capacity(env.len());
    for (name, value) in env {
        match positions.get(&name) {
            Some(&position) => deduped[position].1 = value,
            None => {
                positions.insert(name.clone(), deduped.len());
                deduped.push((name, value));
            }
        }
    }
    deduped
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    fn exposed(env: TaskEnv) -> Vec<(String, String)> {
        env.into_iter()
            .map(|(name, value)| (name, value.expose_secret().to_owned()))
            .collect()
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn assignment(json: &str) -> TaskAssignment {
        serde_json::from_str(json).expect("test assignment parses")
    }

    #[test]
    fn common_env_in_reference_order() {
        let assignment = assignment(
            r#"{"task_id":"run-1","task":{"id":"task-1"},
                "env_vars":{"WARP_API_KEY":"k","GITHUB_ACCESS_TOKEN":"g"}}"#,
        );
        assert_eq!(
            exposed(common_task_env(&assignment, "https://app.warp.dev")),
            pairs(&[
                ("TASK_ID", "task-1"),
                ("GIT_TERMINAL_PROMPT", "0"),
                ("GH_PROMPT_DISABLED", "1"),
                ("WARP_SERVER_ROOT_URL", "https://app.warp.dev"),
                ("GITHUB_ACCESS_TOKEN", "g"),
                ("WARP_API_KEY", "k"),
            ])
        );
    }

    #[test]
    fn server_root_url_omitted_when_empty() {
        let assignment = assignment(r#"{"task_id":"run-1","task":{"id":"task-1"}}"#);
        assert_eq!(
            exposed(common_task_env(&assignment, "")),
            pairs(&[
                ("TASK_ID", "task-1"),
                ("GIT_TERMINAL_PROMPT", "0"),
                ("GH_PROMPT_DISABLED", "1"),
            ])
        );
    }

    #[test]
    fn task_env_vars_can_override_the_fixed_entries_after_dedupe() {
        let assignment = assignment(
            r#"{"task_id":"run-1","task":{"id":"task-1"},"env_vars":{"GIT_TERMINAL_PROMPT":"1"}}"#,
        );
        assert_eq!(
            exposed(dedupe_last_wins(common_task_env(&assignment, ""))),
            pairs(&[
                ("TASK_ID", "task-1"),
                ("GIT_TERMINAL_PROMPT", "1"),
                ("GH_PROMPT_DISABLED", "1"),
            ])
        );
    }

    #[test]
    fn dedupe_keeps_first_position_and_last_value() {
        let env = pairs(&[
            ("A", "1"),
            ("B", "2"),
            ("A", "3"),
            ("C", "x=y"),
            ("B", ""),
            ("A", "4"),
        ]);
        assert_eq!(
            dedupe_last_wins(env),
            pairs(&[("A", "4"), ("B", ""), ("C", "x=y")])
        );
    }

    #[test]
    fn dedupe_of_unique_or_empty_lists_is_identity() {
        assert_eq!(dedupe_last_wins(Vec::<(String, String)>::new()), vec![]);
        let env = pairs(&[("Z", "1"), ("A", "2")]);
        assert_eq!(dedupe_last_wins(env.clone()), env);
    }
}
