//! Validation of `RunAgentRequest` bodies.
//!
//! The body is read as a JSON value and checked field by field so that every error names
//! the offending field: 400 for what is not JSON or has the wrong type, 422 for what is
//! well-formed but cannot be run here. The `config` keys that are copied into task
//! assignments as they are (`docker_image`, `sidecar_image`, `instance_shape`) are checked
//! against what a worker can read, and answered with 422 when it could not: a worker drops
//! an assignment it cannot parse, and the run would stay queued forever.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Titles derived from a prompt are cut to this many characters.
const DERIVED_TITLE_MAX_CHARS: usize = 80;

/// A run request that can be queued.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSubmission {
    pub prompt: String,
    pub skill: Option<String>,
    pub title: String,
    pub team: bool,
    /// The `config` object as submitted.
    pub config: Map<String, Value>,
    pub worker_host: String,
}

pub fn parse_run_request(body: &[u8]) -> Result<RunSubmission, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|error| {
        ApiError::BadRequest(format!("request body is not valid JSON: {error}"))
    })?;
    let Value::Object(request) = value else {
        return Err(ApiError::BadRequest(
            "request body must be a JSON object".into(),
        ));
    };

    let prompt = optional_string(&request, "prompt", "prompt")?;
    let skill = optional_string(&request, "skill", "skill")?;
    let title = optional_string(&request, "title", "title")?;
    let team = match request.get("team") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(team)) => *team,
        Some(_) => return Err(ApiError::BadRequest("`team` must be a boolean".into())),
    };
    let config = match request.get("config") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(config)) => config.clone(),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "`config` must be a JSON object".into(),
            ));
        }
    };
    let worker_host = optional_string(&config, "worker_host", "config.worker_host")?;

    let prompt = prompt.filter(|prompt| !prompt.trim().is_empty());
    let skill = skill.filter(|skill| !skill.trim().is_empty());
    if prompt.is_none() && skill.is_none() {
        return Err(ApiError::Unprocessable(
            "`prompt` is required unless `skill` is given".into(),
        ));
    }
    let worker_host = validate_worker_host(worker_host)?;
    validate_assignment_overrides(&config)?;
    let prompt = prompt.unwrap_or_default();
    let title = title
        .filter(|title| !title.trim().is_empty())
        .unwrap_or_else(|| derived_title(&prompt, skill.as_deref()));
    Ok(RunSubmission {
        prompt,
        skill,
        title,
        team,
        config,
        worker_host,
    })
}

fn optional_string(
    object: &Map<String, Value>,
    key: &str,
    shown_as: &str,
) -> Result<Option<String>, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(ApiError::BadRequest(format!(
            "`{shown_as}` must be a string"
        ))),
    }
}

fn validate_worker_host(worker_host: Option<String>) -> Result<String, ApiError> {
    let Some(worker_host) = worker_host else {
        return Err(ApiError::Unprocessable(
            "`config.worker_host` is required: this control plane only runs on self-hosted \
             workers, so set it to a worker's --worker-id"
                .into(),
        ));
    };
    if worker_host.trim().is_empty() {
        return Err(ApiError::Unprocessable(
            "`config.worker_host` must not be empty: set it to a worker's --worker-id".into(),
        ));
    }
    if worker_host == "warp" {
        return Err(ApiError::Unprocessable(
            "`config.worker_host` \"warp\" means Warp-hosted, but this control plane only runs \
             on self-hosted workers: set it to a worker's --worker-id"
                .into(),
        ));
    }
    Ok(worker_host)
}

/// Checks the `config` keys the control plane copies into task assignments unchanged (the
/// worker reads `docker_image` and `sidecar_image` as strings and `instance_shape` as
/// `{vcpus, memory_gb}` integers). Absent keys are fine; `null` is not, as it would replace
/// the default image with none.
fn validate_assignment_overrides(config: &Map<String, Value>) -> Result<(), ApiError> {
    for key in ["docker_image", "sidecar_image"] {
        let Some(image) = config.get(key) else {
            continue;
        };
        let valid = image
            .as_str()
            .is_some_and(|image| !image.is_empty() && !image.contains(char::is_whitespace));
        if !valid {
            return Err(ApiError::Unprocessable(format!(
                "`config.{key}` must be a non-empty image reference without whitespace"
            )));
        }
    }
    let Some(shape) = config.get("instance_shape") else {
        return Ok(());
    };
    let Value::Object(shape) = shape else {
        return Err(ApiError::Unprocessable(
            "`config.instance_shape` must be an object with optional `vcpus` and `memory_gb`"
                .into(),
        ));
    };
    for (key, value) in shape {
        if !matches!(key.as_str(), "vcpus" | "memory_gb") {
            return Err(ApiError::Unprocessable(format!(
                "`config.instance_shape.{key}` is not supported: only `vcpus` and `memory_gb` are"
            )));
        }
        if value.as_i64().is_none_or(|count| count < 0) {
            return Err(ApiError::Unprocessable(format!(
                "`config.instance_shape.{key}` must be a non-negative integer"
            )));
        }
    }
    Ok(())
}

/// Oz titles an untitled run after its prompt; a skill-only run is titled after the skill.
fn derived_title(prompt: &str, skill: Option<&str>) -> String {
    let source = match prompt.lines().map(str::trim).find(|line| !line.is_empty()) {
        Some(line) => line,
        None => skill.unwrap_or_default(),
    };
    source.chars().take(DERIVED_TITLE_MAX_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<RunSubmission, ApiError> {
        parse_run_request(body.to_string().as_bytes())
    }

    #[test]
    fn a_complete_request_is_kept_whole() {
        let config = json!({"worker_host": "w1", "name": "nightly", "model_id": "m", "extra": [1]});
        let run = parse(json!({
            "prompt": "fix the bug", "title": "Bug", "team": true, "config": config,
            "interactive": false, "attachments": []
        }))
        .unwrap();
        assert_eq!(run.prompt, "fix the bug");
        assert_eq!(run.title, "Bug");
        assert!(run.team);
        assert_eq!(run.worker_host, "w1");
        assert_eq!(Value::Object(run.config), config);
    }

    #[test]
    fn assignment_overrides_that_a_worker_can_read_are_kept() {
        let config = json!({
            "worker_host": "w",
            "docker_image": "registry.example.com:5000/team/img@sha256:0123",
            "sidecar_image": "warpdotdev/warp-agent:latest",
            "instance_shape": {"vcpus": 4, "memory_gb": 0},
        });
        let run = parse(json!({"prompt": "p", "config": config})).unwrap();
        assert_eq!(Value::Object(run.config), config);
        for shape in [json!({}), json!({"vcpus": 2}), json!({"memory_gb": 16})] {
            let config = json!({"worker_host": "w", "instance_shape": shape});
            assert!(
                parse(json!({"prompt": "p", "config": config})).is_ok(),
                "{shape}"
            );
        }
    }

    #[test]
    fn assignment_overrides_a_worker_could_not_read_are_unprocessable() {
        let cases = [
            (json!({"docker_image": ""}), "`config.docker_image`"),
            (
                json!({"docker_image": "my image:1"}),
                "`config.docker_image`",
            ),
            (json!({"docker_image": "img:1\n"}), "`config.docker_image`"),
            (json!({"docker_image": 7}), "`config.docker_image`"),
            (json!({"docker_image": null}), "`config.docker_image`"),
            (json!({"sidecar_image": ["a"]}), "`config.sidecar_image`"),
            (json!({"sidecar_image": " "}), "`config.sidecar_image`"),
            (json!({"instance_shape": "4x16"}), "`config.instance_shape`"),
            (json!({"instance_shape": null}), "`config.instance_shape`"),
            (
                json!({"instance_shape": [4, 16]}),
                "`config.instance_shape`",
            ),
            (
                json!({"instance_shape": {"vcpus": "4"}}),
                "`config.instance_shape.vcpus`",
            ),
            (
                json!({"instance_shape": {"vcpus": -1}}),
                "`config.instance_shape.vcpus`",
            ),
            (
                json!({"instance_shape": {"memory_gb": 1.5}}),
                "`config.instance_shape.memory_gb`",
            ),
            (
                json!({"instance_shape": {"memory_gb": u64::MAX}}),
                "`config.instance_shape.memory_gb`",
            ),
            (
                json!({"instance_shape": {"memory_gb": null}}),
                "`config.instance_shape.memory_gb`",
            ),
            (
                json!({"instance_shape": {"vcpus": 2, "gpus": 1}}),
                "`config.instance_shape.gpus`",
            ),
        ];
        for (overrides, named) in cases {
            let mut config = json!({"worker_host": "w"});
            for (key, value) in overrides.as_object().unwrap() {
                config[key] = value.clone();
            }
            let body = json!({"prompt": "p", "config": config});
            match parse(body.clone()) {
                Err(ApiError::Unprocessable(message)) => {
                    assert!(message.contains(named), "{body}: {message}")
                }
                other => panic!("{body}: expected unprocessable, got {other:?}"),
            }
        }
    }

    #[test]
    fn titles_default_to_the_prompt_or_the_skill() {
        let long_line = "x".repeat(200);
        let run = parse(
            json!({"prompt": format!("\n {long_line}\nmore"), "config": {"worker_host": "w"}}),
        )
        .unwrap();
        assert_eq!(run.title, "x".repeat(DERIVED_TITLE_MAX_CHARS));
        let run = parse(json!({"skill": "org/repo:fix", "config": {"worker_host": "w"}})).unwrap();
        assert_eq!(run.title, "org/repo:fix");
        assert_eq!(run.prompt, "");
        assert_eq!(run.skill.as_deref(), Some("org/repo:fix"));
        assert!(!run.team);
    }

    #[test]
    fn malformed_bodies_are_bad_requests_naming_the_problem() {
        let cases: [(&[u8], &str); 8] = [
            (b"{not json", "not valid JSON"),
            (b"[1, 2]", "must be a JSON object"),
            (
                br#"{"prompt": 5, "config": {"worker_host": "w"}}"#,
                "`prompt` must be a string",
            ),
            (
                br#"{"prompt": "p", "skill": [], "config": {"worker_host": "w"}}"#,
                "`skill`",
            ),
            (
                br#"{"prompt": "p", "title": {}, "config": {"worker_host": "w"}}"#,
                "`title`",
            ),
            (
                br#"{"prompt": "p", "team": "yes", "config": {"worker_host": "w"}}"#,
                "`team`",
            ),
            (
                br#"{"prompt": "p", "config": "w"}"#,
                "`config` must be a JSON object",
            ),
            (
                br#"{"prompt": "p", "config": {"worker_host": 7}}"#,
                "`config.worker_host` must be a string",
            ),
        ];
        for (body, expected) in cases {
            match parse_run_request(body) {
                Err(ApiError::BadRequest(message)) => {
                    assert!(message.contains(expected), "{message}")
                }
                other => panic!(
                    "{}: expected a bad request, got {other:?}",
                    String::from_utf8_lossy(body)
                ),
            }
        }
    }

    #[test]
    fn requests_that_cannot_run_here_are_unprocessable() {
        let cases = [
            (
                json!({"config": {"worker_host": "w"}}),
                "`prompt` is required",
            ),
            (
                json!({"prompt": "  ", "config": {"worker_host": "w"}}),
                "`prompt` is required",
            ),
            (json!({"prompt": "p"}), "`config.worker_host` is required"),
            (
                json!({"prompt": "p", "config": {}}),
                "`config.worker_host` is required",
            ),
            (
                json!({"prompt": "p", "config": {"worker_host": " "}}),
                "must not be empty",
            ),
            (
                json!({"prompt": "p", "config": {"worker_host": "warp"}}),
                "Warp-hosted",
            ),
        ];
        for (body, expected) in cases {
            match parse(body.clone()) {
                Err(ApiError::Unprocessable(message)) => {
                    assert!(message.contains(expected), "{body}: {message}")
                }
                other => panic!("{body}: expected unprocessable, got {other:?}"),
            }
        }
    }
}
