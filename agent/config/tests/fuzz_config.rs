//! Property test (bounded fuzzing, run in CI): the YAML config loader answers any input
//! with a config or an error naming the problem; it never panics.

use ozfleet_worker_config::FileConfig;
use proptest::prelude::*;

/// YAML-ish documents built from the schema's own keys, nested arbitrarily.
fn yaml_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("worker_id"),
        Just("backend"),
        Just("docker"),
        Just("direct"),
        Just("kubernetes"),
        Just("volumes"),
        Just("environment"),
        Just("cleanup"),
        Just("max_concurrent_tasks"),
        Just("idle_on_complete"),
        Just("namespace"),
        Just("pod_template"),
        Just("name"),
        Just("value"),
        Just("unknown_key"),
    ];
    let scalar = prop_oneof![
        Just("true".to_owned()),
        Just("-1".to_owned()),
        Just("~".to_owned()),
        Just("18446744073709551616".to_owned()),
        "[a-z0-9:/_.-]{0,10}",
        Just("\"x: y\"".to_owned()),
    ];
    let line = (0usize..4, key, scalar, any::<bool>()).prop_map(|(depth, key, value, list)| {
        let indent = "  ".repeat(depth);
        if list {
            format!("{indent}- {key}: {value}")
        } else {
            format!("{indent}{key}: {value}")
        }
    });
    prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = FileConfig::from_yaml_str(&text);
    }

    #[test]
    fn schema_shaped_yaml_never_panics(text in yaml_like()) {
        if let Err(error) = FileConfig::from_yaml_str(&text) {
            prop_assert!(!error.to_string().is_empty());
        }
    }
}
