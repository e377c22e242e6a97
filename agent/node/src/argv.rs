//! The `oz` argv ("base args") derived from a task assignment (spec §3.1).
//!
//! The order of the flags is part of the contract with the oz CLI and matches the
//! reference worker token for token.

use std::collections::BTreeMap;

use ozfleet_proto::oz::{AgentConfig, Owner, TaskAssignment, go_html_escape};
use serde_json::value::RawValue;

/// Worker-level settings that shape the argv of every task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArgvSettings {
    /// Oz server root handed to the agent; `--server-root-url` is emitted even when empty.
    pub server_root_url: String,
    /// Worker default for `--idle-on-complete` (e.g. `10m`); `None` or empty uses the oz
    /// CLI default (the bare flag).
    pub idle_on_complete: Option<String>,
    /// `--session-sharing-server-url`; `None` or empty omits the flag.
    pub session_sharing_server_url: Option<String>,
}

/// Builds the argv passed to `oz` after the program name, e.g. `["agent", "run", …]`.
pub fn build_base_args(assignment: &TaskAssignment, settings: &ArgvSettings) -> Vec<String> {
    let task = &assignment.task;
    let mut args = Args::default();
    args.push(["agent", "run"]);
    if task.owner.as_ref().is_some_and(Owner::is_team) {
        args.push(["--share", "team:edit"]);
    }
    args.push(["--task-id", task.id.as_str()]);
    args.push(["--sandboxed"]);
    args.push(["--server-root-url", settings.server_root_url.as_str()]);
    if let Some(config) = &task.agent_config_snapshot {
        push_snapshot_args(&mut args, config);
    }
    args.0.extend(assignment.additional_oz_args.iter().cloned());

    let task_idle_minutes = task
        .agent_config_snapshot
        .as_ref()
        .map_or(0, |config| config.idle_timeout_minutes);
    if task_idle_minutes > 0 {
        args.push(["--idle-on-complete", &format!("{task_idle_minutes}m")]);
    } else if let Some(idle) = non_empty(settings.idle_on_complete.as_deref()) {
        args.push(["--idle-on-complete", idle]);
    } else {
        args.push(["--idle-on-complete"]);
    }

    if let Some(url) = non_empty(settings.session_sharing_server_url.as_deref()) {
        args.push(["--session-sharing-server-url", url]);
    }
    args.0
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn push<const N: usize>(&mut self, tokens: [&str; N]) {
        self.0
            .extend(tokens.iter().map(|token| (*token).to_owned()));
    }

    /// `flag value` when the whitespace-trimmed value is non-empty.
    fn push_trimmed(&mut self, flag: &str, value: &str) {
        let value = value.trim();
        if !value.is_empty() {
            self.push([flag, value]);
        }
    }
}

/// Flags 6.1–6.12 of §3.1, emitted only when the task carries a config snapshot.
fn push_snapshot_args(args: &mut Args, config: &AgentConfig) {
    let oz_harness = config.is_oz_harness();
    if oz_harness {
        args.push_trimmed("--model", &config.model_id);
    }
    args.push_trimmed("--profile", &config.profile_id);
    args.push_trimmed("--skill", &config.skill_spec);
    if !config.mcp_servers.is_empty() {
        args.push(["--mcp", &mcp_json(&config.mcp_servers)]);
    }
    if config.computer_use_enabled.unwrap_or(oz_harness) {
        args.push(["--computer-use"]);
    } else {
        args.push(["--no-computer-use"]);
    }
    if let Some(aws) = config
        .inference_providers
        .as_ref()
        .and_then(|providers| providers.aws.as_ref())
        .filter(|aws| !aws.disabled && !aws.role_arn.trim().is_empty())
    {
        args.push_trimmed("--bedrock-inference-role", &aws.role_arn);
        args.push_trimmed("--bedrock-role-region", &aws.region);
    }
    if let Some(harness) = config.harness_type() {
        args.push_trimmed("--harness", harness);
    }
    match config
        .session_sharing
        .as_ref()
        .map(|sharing| sharing.public_access.as_str())
    {
        Some("VIEWER") => args.push(["--share", "public:view"]),
        Some("EDITOR") => args.push(["--share", "public:edit"]),
        _ => {}
    }
    if config.snapshot_disabled {
        args.push(["--no-snapshot"]);
    }
    if config.snapshot_upload_timeout_secs > 0 {
        let timeout = format!("{}s", config.snapshot_upload_timeout_secs);
        args.push(["--snapshot-upload-timeout", &timeout]);
    }
    if config.snapshot_script_timeout_secs > 0 {
        let timeout = format!("{}s", config.snapshot_script_timeout_secs);
        args.push(["--snapshot-script-timeout", &timeout]);
    }
    args.push_trimmed("--environment", &config.environment_id);
}

/// Encodes the MCP servers the way Go's `json.Marshal(map[string]json.RawMessage)` does:
/// keys sorted, each value compacted as received, `<`, `>`, `&` (and U+2028/U+2029)
/// escaped.
fn mcp_json(servers: &BTreeMap<String, Box<RawValue>>) -> String {
    let mut json = String::from("{");
    for (index, (name, config)) in servers.iter().enumerate() {
        if index > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::Value::from(name.as_str()).to_string());
        json.push(':');
        compact_json_into(&mut json, config.get());
    }
    json.push('}');
    go_html_escape(&json)
}

/// Appends `json` without insignificant whitespace; string contents are kept verbatim.
fn compact_json_into(out: &mut String, json: &str) {
    let mut in_string = false;
    let mut escaped = false;
    for ch in json.chars() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else {
            match ch {
                ' ' | '\t' | '\n' | '\r' => {}
                '"' => {
                    in_string = true;
                    out.push(ch);
                }
                _ => out.push(ch),
            }
        }
    }
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "https://app.warp.dev";

    /// Parses an assignment whose `task` object gets `extra_task` spliced in (JSON members
    /// without braces, may be empty) and whose data gets `extra_data`.
    fn assignment(extra_task: &str, extra_data: &str) -> TaskAssignment {
        let task = if extra_task.is_empty() {
            r#"{"id":"task-1"}"#.to_owned()
        } else {
            format!(r#"{{"id":"task-1",{extra_task}}}"#)
        };
        let data = if extra_data.is_empty() {
            format!(r#"{{"task_id":"task-1","task":{task}}}"#)
        } else {
            format!(r#"{{"task_id":"task-1","task":{task},{extra_data}}}"#)
        };
        serde_json::from_str(&data).expect("test assignment parses")
    }

    /// An assignment whose task carries the given `agent_config_snapshot` object.
    fn with_snapshot(snapshot: &str) -> TaskAssignment {
        assignment(&format!(r#""agent_config_snapshot":{snapshot}"#), "")
    }

    fn settings() -> ArgvSettings {
        ArgvSettings {
            server_root_url: ROOT.into(),
            ..ArgvSettings::default()
        }
    }

    /// The fixed prefix followed by `rest`.
    fn expected(rest: &[&str]) -> Vec<String> {
        let mut args = vec![
            "agent",
            "run",
            "--task-id",
            "task-1",
            "--sandboxed",
            "--server-root-url",
            ROOT,
        ];
        args.extend_from_slice(rest);
        args.into_iter().map(String::from).collect()
    }

    fn args_for(snapshot: &str) -> Vec<String> {
        build_base_args(&with_snapshot(snapshot), &settings())
    }

    #[test]
    fn spec_example_empty_snapshot() {
        assert_eq!(
            args_for("{}"),
            expected(&["--computer-use", "--idle-on-complete"])
        );
    }

    #[test]
    fn spec_example_claude_harness_drops_model() {
        assert_eq!(
            args_for(r#"{"model_id":"claude-4-8-opus-high","harness":{"type":"claude"}}"#),
            expected(&[
                "--no-computer-use",
                "--harness",
                "claude",
                "--idle-on-complete"
            ])
        );
    }

    #[test]
    fn idle_task_minutes_win_over_worker_value() {
        let settings = ArgvSettings {
            idle_on_complete: Some("30m".into()),
            ..settings()
        };
        assert_eq!(
            build_base_args(&with_snapshot(r#"{"idle_timeout_minutes":15}"#), &settings),
            expected(&["--computer-use", "--idle-on-complete", "15m"])
        );
    }

    #[test]
    fn idle_worker_value_used_when_task_unset() {
        let settings = ArgvSettings {
            idle_on_complete: Some("30m".into()),
            ..settings()
        };
        assert_eq!(
            build_base_args(&with_snapshot("{}"), &settings),
            expected(&["--computer-use", "--idle-on-complete", "30m"])
        );
        assert_eq!(
            build_base_args(&assignment("", ""), &settings),
            expected(&["--idle-on-complete", "30m"]),
            "worker value applies without a snapshot too"
        );
    }

    #[test]
    fn idle_bare_flag_when_neither_is_set() {
        let settings = ArgvSettings {
            idle_on_complete: Some(String::new()),
            ..settings()
        };
        assert_eq!(
            build_base_args(&with_snapshot("{}"), &settings),
            expected(&["--computer-use", "--idle-on-complete"])
        );
    }

    #[test]
    fn idle_non_positive_task_minutes_are_ignored() {
        let settings = ArgvSettings {
            idle_on_complete: Some("20m".into()),
            ..settings()
        };
        for minutes in [0, -1] {
            let snapshot = format!(r#"{{"idle_timeout_minutes":{minutes}}}"#);
            assert_eq!(
                build_base_args(&with_snapshot(&snapshot), &settings),
                expected(&["--computer-use", "--idle-on-complete", "20m"]),
                "{minutes}"
            );
        }
    }

    #[test]
    fn harness_flag_emitted_when_type_set() {
        assert_eq!(
            args_for(r#"{"harness":{"type":"codex"}}"#),
            expected(&[
                "--no-computer-use",
                "--harness",
                "codex",
                "--idle-on-complete"
            ])
        );
        assert_eq!(
            args_for(r#"{"harness":{"type":"oz"}}"#),
            expected(&["--computer-use", "--harness", "oz", "--idle-on-complete"]),
            "the Oz harness is named explicitly too"
        );
        assert_eq!(
            args_for(r#"{"harness":{"type":"  gemini "}}"#),
            expected(&[
                "--no-computer-use",
                "--harness",
                "gemini",
                "--idle-on-complete"
            ]),
            "the harness type is trimmed"
        );
    }

    #[test]
    fn harness_flag_skipped_for_missing_or_empty_type() {
        for snapshot in [
            r#"{"harness":{}}"#,
            r#"{"harness":{"type":null}}"#,
            r#"{"harness":{"type":""}}"#,
        ] {
            assert_eq!(
                args_for(snapshot),
                expected(&["--computer-use", "--idle-on-complete"]),
                "{snapshot}"
            );
        }
    }

    #[test]
    fn third_party_harness_defaults_to_no_computer_use() {
        assert_eq!(
            args_for(r#"{"harness":{"type":"claude"}}"#),
            expected(&[
                "--no-computer-use",
                "--harness",
                "claude",
                "--idle-on-complete"
            ])
        );
    }

    #[test]
    fn explicit_computer_use_is_respected_for_both_harness_kinds() {
        let cases = [
            (r#"{"computer_use_enabled":true}"#, vec!["--computer-use"]),
            (
                r#"{"computer_use_enabled":false}"#,
                vec!["--no-computer-use"],
            ),
            (
                r#"{"computer_use_enabled":true,"harness":{"type":"codex"}}"#,
                vec!["--computer-use", "--harness", "codex"],
            ),
            (
                r#"{"computer_use_enabled":false,"harness":{"type":"codex"}}"#,
                vec!["--no-computer-use", "--harness", "codex"],
            ),
        ];
        for (snapshot, mut rest) in cases {
            rest.push("--idle-on-complete");
            assert_eq!(args_for(snapshot), expected(&rest), "{snapshot}");
        }
    }

    #[test]
    fn computer_use_defaults_on_for_the_oz_harness() {
        assert_eq!(
            args_for(r#"{"computer_use_enabled":null}"#),
            expected(&["--computer-use", "--idle-on-complete"])
        );
    }

    #[test]
    fn model_emitted_for_the_oz_harness() {
        for snapshot in [
            r#"{"model_id":" claude-sonnet-4 "}"#,
            r#"{"model_id":"claude-sonnet-4","harness":{}}"#,
            r#"{"model_id":"claude-sonnet-4","harness":{"type":""}}"#,
        ] {
            assert_eq!(
                args_for(snapshot),
                expected(&[
                    "--model",
                    "claude-sonnet-4",
                    "--computer-use",
                    "--idle-on-complete"
                ]),
                "{snapshot}"
            );
        }
        assert_eq!(
            args_for(r#"{"model_id":"m","harness":{"type":"oz"}}"#),
            expected(&[
                "--model",
                "m",
                "--computer-use",
                "--harness",
                "oz",
                "--idle-on-complete"
            ])
        );
        assert_eq!(
            args_for(r#"{"model_id":"   "}"#),
            expected(&["--computer-use", "--idle-on-complete"]),
            "a blank model is skipped"
        );
    }

    #[test]
    fn model_suppressed_for_third_party_harness() {
        assert_eq!(
            args_for(r#"{"model_id":"claude-4-8-opus-high","harness":{"type":"codex"}}"#),
            expected(&[
                "--no-computer-use",
                "--harness",
                "codex",
                "--idle-on-complete"
            ])
        );
        assert_eq!(
            args_for(r#"{"model_id":"m","harness":{"type":" oz"}}"#),
            expected(&["--no-computer-use", "--harness", "oz", "--idle-on-complete"]),
            "the Oz-harness check does not trim"
        );
    }

    const ROLE: &str = "arn:aws:iam::123456789012:role/BedrockInference";

    #[test]
    fn bedrock_role_emitted() {
        let snapshot = format!(
            r#"{{"model_id":"claude-sonnet-4","inference_providers":{{"aws":{{"role_arn":"{ROLE}"}}}}}}"#
        );
        assert_eq!(
            args_for(&snapshot),
            expected(&[
                "--model",
                "claude-sonnet-4",
                "--computer-use",
                "--bedrock-inference-role",
                ROLE,
                "--idle-on-complete"
            ])
        );
    }

    #[test]
    fn bedrock_region_paired_and_trimmed() {
        let snapshot = format!(
            r#"{{"inference_providers":{{"aws":{{"role_arn":"  {ROLE} ","region":"  us-east-1  "}}}}}}"#
        );
        assert_eq!(
            args_for(&snapshot),
            expected(&[
                "--computer-use",
                "--bedrock-inference-role",
                ROLE,
                "--bedrock-role-region",
                "us-east-1",
                "--idle-on-complete"
            ])
        );
    }

    #[test]
    fn bedrock_whitespace_region_omitted() {
        let snapshot = format!(
            r#"{{"inference_providers":{{"aws":{{"role_arn":"{ROLE}","region":"   "}}}}}}"#
        );
        assert_eq!(
            args_for(&snapshot),
            expected(&[
                "--computer-use",
                "--bedrock-inference-role",
                ROLE,
                "--idle-on-complete"
            ])
        );
    }

    #[test]
    fn bedrock_whitespace_role_skipped_even_with_region() {
        assert_eq!(
            args_for(r#"{"inference_providers":{"aws":{"role_arn":"   ","region":"us-east-1"}}}"#),
            expected(&["--computer-use", "--idle-on-complete"])
        );
    }

    #[test]
    fn bedrock_disabled_skipped() {
        let snapshot = format!(
            r#"{{"inference_providers":{{"aws":{{"disabled":true,"role_arn":"{ROLE}","region":"us-east-1"}}}}}}"#
        );
        assert_eq!(
            args_for(&snapshot),
            expected(&["--computer-use", "--idle-on-complete"])
        );
        assert_eq!(
            args_for(r#"{"inference_providers":{}}"#),
            expected(&["--computer-use", "--idle-on-complete"]),
            "no aws block"
        );
    }

    #[test]
    fn public_sharing_view_and_edit() {
        assert_eq!(
            args_for(r#"{"session_sharing":{"public_access":"VIEWER"}}"#),
            expected(&[
                "--computer-use",
                "--share",
                "public:view",
                "--idle-on-complete"
            ])
        );
        assert_eq!(
            args_for(r#"{"session_sharing":{"public_access":"EDITOR"}}"#),
            expected(&[
                "--computer-use",
                "--share",
                "public:edit",
                "--idle-on-complete"
            ])
        );
    }

    #[test]
    fn public_sharing_absent_nil_or_unsupported_emits_nothing() {
        for snapshot in [
            "{}",
            r#"{"session_sharing":null}"#,
            r#"{"session_sharing":{}}"#,
            r#"{"session_sharing":{"public_access":null}}"#,
            r#"{"session_sharing":{"public_access":"FULL"}}"#,
        ] {
            assert_eq!(
                args_for(snapshot),
                expected(&["--computer-use", "--idle-on-complete"]),
                "{snapshot}"
            );
        }
    }

    #[test]
    fn conversation_id_never_forwarded() {
        let assignment = assignment(
            r#""agent_config_snapshot":{},"agent_conversation_id":"abc-123""#,
            "",
        );
        let args = build_base_args(&assignment, &settings());
        assert_eq!(args, expected(&["--computer-use", "--idle-on-complete"]));
    }

    #[test]
    fn snapshot_controls() {
        assert_eq!(
            args_for(
                r#"{"snapshot_disabled":true,"snapshot_upload_timeout_secs":90,"snapshot_script_timeout_secs":45}"#
            ),
            expected(&[
                "--computer-use",
                "--no-snapshot",
                "--snapshot-upload-timeout",
                "90s",
                "--snapshot-script-timeout",
                "45s",
                "--idle-on-complete"
            ])
        );
        assert_eq!(
            args_for(r#"{"snapshot_upload_timeout_secs":-5,"snapshot_script_timeout_secs":0}"#),
            expected(&["--computer-use", "--idle-on-complete"]),
            "non-positive timeouts are skipped"
        );
    }

    #[test]
    fn additional_oz_args_placed_before_idle_flag() {
        let assignment = assignment(
            r#""agent_config_snapshot":{}"#,
            r#""additional_oz_args":["--skip-initial-turn","--foo","bar baz"]"#,
        );
        assert_eq!(
            build_base_args(&assignment, &settings()),
            expected(&[
                "--computer-use",
                "--skip-initial-turn",
                "--foo",
                "bar baz",
                "--idle-on-complete"
            ])
        );
    }

    #[test]
    fn additional_oz_args_forwarded_without_snapshot() {
        let assignment = assignment("", r#""additional_oz_args":["--skip-initial-turn"]"#);
        assert_eq!(
            build_base_args(&assignment, &settings()),
            expected(&["--skip-initial-turn", "--idle-on-complete"])
        );
    }

    #[test]
    fn no_additional_oz_args_when_absent() {
        let assignment = assignment(
            r#""agent_config_snapshot":{}"#,
            r#""additional_oz_args":null"#,
        );
        assert_eq!(
            build_base_args(&assignment, &settings()),
            expected(&["--computer-use", "--idle-on-complete"])
        );
    }

    #[test]
    fn without_snapshot_no_config_flags_at_all() {
        assert_eq!(
            build_base_args(&assignment("", ""), &settings()),
            expected(&["--idle-on-complete"])
        );
    }

    #[test]
    fn team_share_only_for_team_owner() {
        let team = assignment(r#""owner":{"Type":"TEAM","Id":42}"#, "");
        assert_eq!(
            build_base_args(&team, &settings()),
            vec![
                "agent",
                "run",
                "--share",
                "team:edit",
                "--task-id",
                "task-1",
                "--sandboxed",
                "--server-root-url",
                ROOT,
                "--idle-on-complete"
            ]
        );
        for owner in [r#""owner":{"Type":"USER","Id":7}"#, r#""owner":null"#, ""] {
            assert_eq!(
                build_base_args(&assignment(owner, ""), &settings()),
                expected(&["--idle-on-complete"]),
                "{owner}"
            );
        }
    }

    #[test]
    fn server_root_url_always_present() {
        let settings = ArgvSettings::default();
        assert_eq!(
            build_base_args(&assignment("", ""), &settings),
            vec![
                "agent",
                "run",
                "--task-id",
                "task-1",
                "--sandboxed",
                "--server-root-url",
                "",
                "--idle-on-complete"
            ]
        );
    }

    #[test]
    fn task_id_flag_uses_the_task_object_id() {
        let assignment: TaskAssignment =
            serde_json::from_str(r#"{"task_id":"run-1","task":{"id":"task-9"}}"#).unwrap();
        let args = build_base_args(&assignment, &settings());
        assert_eq!(&args[2..4], ["--task-id", "task-9"]);
    }

    #[test]
    fn profile_skill_and_environment_trimmed_and_skipped_when_blank() {
        assert_eq!(
            args_for(
                r#"{"profile_id":" p1 ","skill_spec":"\tskills/x\n","environment_id":" env-1 "}"#
            ),
            expected(&[
                "--profile",
                "p1",
                "--skill",
                "skills/x",
                "--computer-use",
                "--environment",
                "env-1",
                "--idle-on-complete"
            ])
        );
        assert_eq!(
            args_for(r#"{"profile_id":"  ","skill_spec":"","environment_id":" "}"#),
            expected(&["--computer-use", "--idle-on-complete"])
        );
    }

    #[test]
    fn mcp_sorted_compacted_and_html_escaped() {
        let snapshot = r#"{"mcp_servers":{
            "zeta": { "url" : "https://x.test/?a=1&b=<2>" ,
                      "headers": {"Z": "1", "A": "two words"} },
            "alpha": [ 1, 2 , {"k" : "v \" q\\"} ]
        }}"#;
        let mcp = concat!(
            r#"{"alpha":[1,2,{"k":"v \" q\\"}],"#,
            r#""zeta":{"url":"https://x.test/?a=1\u0026b=\u003c2\u003e","headers":{"Z":"1","A":"two words"}}}"#
        );
        assert_eq!(
            args_for(snapshot),
            expected(&["--mcp", mcp, "--computer-use", "--idle-on-complete"])
        );
    }

    #[test]
    fn mcp_keys_are_json_and_html_escaped() {
        let snapshot = r#"{"mcp_servers":{"a<b\"c":{}}}"#;
        assert_eq!(
            args_for(snapshot),
            expected(&[
                "--mcp",
                r#"{"a\u003cb\"c":{}}"#,
                "--computer-use",
                "--idle-on-complete"
            ])
        );
    }

    #[test]
    fn session_sharing_server_url_comes_last() {
        let settings = ArgvSettings {
            idle_on_complete: Some("10m".into()),
            session_sharing_server_url: Some("wss://share.example".into()),
            ..settings()
        };
        let assignment = assignment(
            r#""agent_config_snapshot":{}"#,
            r#""additional_oz_args":["--x"]"#,
        );
        assert_eq!(
            build_base_args(&assignment, &settings),
            expected(&[
                "--computer-use",
                "--x",
                "--idle-on-complete",
                "10m",
                "--session-sharing-server-url",
                "wss://share.example"
            ])
        );
        let empty = ArgvSettings {
            session_sharing_server_url: Some(String::new()),
            ..self::settings()
        };
        assert_eq!(
            build_base_args(&with_snapshot("{}"), &empty),
            expected(&["--computer-use", "--idle-on-complete"])
        );
    }

    #[test]
    fn every_flag_in_reference_order() {
        let assignment = assignment(
            &format!(
                r#""owner":{{"Type":"TEAM","Id":1}},"agent_config_snapshot":{{
                "environment_id":"env","model_id":"m","profile_id":"p","skill_spec":"s",
                "mcp_servers":{{"srv":{{"url":"u"}}}},"computer_use_enabled":false,
                "idle_timeout_minutes":5,"harness":{{"type":"oz"}},
                "inference_providers":{{"aws":{{"role_arn":"{ROLE}","region":"eu-west-1"}}}},
                "session_sharing":{{"public_access":"EDITOR"}},"snapshot_disabled":true,
                "snapshot_upload_timeout_secs":1,"snapshot_script_timeout_secs":2}}"#
            ),
            r#""additional_oz_args":["--skip-initial-turn"]"#,
        );
        let settings = ArgvSettings {
            server_root_url: ROOT.into(),
            idle_on_complete: Some("30m".into()),
            session_sharing_server_url: Some("https://s".into()),
        };
        assert_eq!(
            build_base_args(&assignment, &settings),
            vec![
                "agent",
                "run",
                "--share",
                "team:edit",
                "--task-id",
                "task-1",
                "--sandboxed",
                "--server-root-url",
                ROOT,
                "--model",
                "m",
                "--profile",
                "p",
                "--skill",
                "s",
                "--mcp",
                r#"{"srv":{"url":"u"}}"#,
                "--no-computer-use",
                "--bedrock-inference-role",
                ROLE,
                "--bedrock-role-region",
                "eu-west-1",
                "--harness",
                "oz",
                "--share",
                "public:edit",
                "--no-snapshot",
                "--snapshot-upload-timeout",
                "1s",
                "--snapshot-script-timeout",
                "2s",
                "--environment",
                "env",
                "--skip-initial-turn",
                "--idle-on-complete",
                "5m",
                "--session-sharing-server-url",
                "https://s"
            ]
        );
    }

    #[test]
    fn compactor_keeps_string_whitespace_and_escapes() {
        let mut out = String::new();
        compact_json_into(&mut out, "{ \"a b\" :\t[ \"\\\\\" , \"x\\\"  y\" ]\r\n}");
        assert_eq!(out, r#"{"a b":["\\","x\"  y"]}"#);
    }
}
