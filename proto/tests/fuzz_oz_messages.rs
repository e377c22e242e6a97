//! Property tests (bounded fuzzing, run in CI): whatever Oz, or anything pretending to
//! be Oz, sends, the parser answers with a message or an error naming the problem —
//! it never panics, and an error never echoes the frame (it may hold credentials).

use ozfleet_proto::oz::{ServerMessage, parse_server_message};
use proptest::prelude::*;

/// JSON-ish text: arbitrary nesting of the shapes a frame is made of.
fn json_like() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z_ ]{0,12}".prop_map(|s| format!("{s:?}")),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5)
                .prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("type".to_owned()),
                        Just("data".to_owned()),
                        Just("task_id".to_owned()),
                        Just("execution_id".to_owned()),
                        Just("task".to_owned()),
                        Just("env_vars".to_owned()),
                        "[a-z]{1,6}",
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|fields| {
                let body: Vec<String> = fields
                    .into_iter()
                    .map(|(key, value)| format!("{key:?}:{value}"))
                    .collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,256}") {
        let _ = parse_server_message(&text);
    }

    #[test]
    fn arbitrary_json_never_panics_and_errors_do_not_echo_secrets(value in json_like()) {
        for frame in [
            value.clone(),
            format!(r#"{{"type":"task_assignment","data":{value}}}"#),
            format!(r#"{{"type":"task_cancellation","data":{value}}}"#),
            format!(r#"{{"type":"task_assignment","data":{{"task_id":"t","execution_id":"e","task":{{"id":"t"}},"env_vars":{{"K":"sk-secret-123"}},"x":{value}}}}}"#),
        ] {
            match parse_server_message(&frame) {
                Ok(ServerMessage::TaskAssignment { raw_data, .. }) => {
                    let starts_as_object = raw_data.get().starts_with('{');
                    prop_assert!(starts_as_object, "the relayed data is an object");
                }
                Ok(ServerMessage::TaskCancellation(_)) => {}
                Err(error) => prop_assert!(!error.to_string().contains("sk-secret-123"), "{}", error),
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_or_parsed_without_overflowing(depth in 1usize..2000) {
        let frame = format!(
            r#"{{"type":"task_assignment","data":{{"task_id":"t","execution_id":"e","task":{{"id":"t"}},"x":{}{}}}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let _ = parse_server_message(&frame);
    }
}
