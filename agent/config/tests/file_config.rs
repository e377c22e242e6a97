//! Ports of the reference's `internal/config/config_test.go`, plus the
//! compatibility edges of its YAML decoder.

use std::path::PathBuf;

use ozfleet_worker_config::{ConfigError, FileConfig, ParseError, ValidationError};

/// Writes `content` to a fresh file, the way the reference's tests do.
fn write_config(content: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, content).unwrap();
    (dir, path)
}

fn load(content: &str) -> Result<FileConfig, ConfigError> {
    let (_dir, path) = write_config(content);
    FileConfig::load(&path)
}

fn load_ok(content: &str) -> FileConfig {
    load(content).unwrap_or_else(|e| panic!("unexpected error: {e}"))
}

fn load_err(content: &str) -> String {
    load(content).unwrap_err().to_string()
}

#[test]
fn valid_docker_config() {
    let cfg = load_ok(
        r#"
worker_id: "my-worker"
cleanup: false
backend:
  docker:
    volumes:
      - "/data:/data:ro"
      - "/cache:/cache"
    environment:
      - name: FOO
        value: "bar"
      - name: BAZ
        value: "qux"
"#,
    );
    assert_eq!(cfg.worker_id, "my-worker");
    assert_eq!(cfg.cleanup, Some(false));
    let docker = cfg.backend.docker.expect("docker backend set");
    assert_eq!(docker.volumes, ["/data:/data:ro", "/cache:/cache"]);
    let env: Vec<_> = docker
        .environment
        .iter()
        .map(|e| (e.name.as_str(), e.value.as_deref()))
        .collect();
    assert_eq!(env, [("FOO", Some("bar")), ("BAZ", Some("qux"))]);
    assert!(cfg.backend.direct.is_none());
}

#[test]
fn minimal_config() {
    let cfg = load_ok("worker_id: \"minimal\"\n");
    assert_eq!(cfg.worker_id, "minimal");
    assert_eq!(cfg.cleanup, None, "cleanup must stay unset when absent");
    assert_eq!(cfg.backend, Default::default());
    assert_eq!(cfg.max_concurrent_tasks, None);
    assert_eq!(cfg.idle_on_complete, None);
}

#[test]
fn explicit_cleanup_true() {
    assert_eq!(load_ok("worker_id: t\ncleanup: true\n").cleanup, Some(true));
}

#[test]
fn yaml_1_1_booleans_are_accepted_for_bool_fields() {
    // yaml.v3 accepts these when the target is a bool; configs rely on it.
    assert_eq!(load_ok("cleanup: no\n").cleanup, Some(false));
    assert_eq!(load_ok("cleanup: On\n").cleanup, Some(true));
    let cfg = load_ok("backend:\n  kubernetes:\n    use_image_volumes: yes\n");
    assert!(cfg.backend.kubernetes.unwrap().use_image_volumes);
    let err = load_err("cleanup: maybe\n");
    assert!(
        err.starts_with("failed to parse config file: cleanup: invalid value"),
        "{err}"
    );
}

#[test]
fn scalars_are_read_as_text_for_string_fields() {
    let cfg = load_ok(
        "worker_id: 123\nidle_on_complete: 0\nbackend:\n  docker:\n    environment:\n      - name: PORT\n        value: 8080\n      - name: DEBUG\n        value: true\n",
    );
    assert_eq!(cfg.worker_id, "123");
    assert_eq!(cfg.idle_on_complete.as_deref(), Some("0"));
    let env = cfg.backend.docker.unwrap().environment;
    assert_eq!(env[0].value.as_deref(), Some("8080"));
    assert_eq!(env[1].value.as_deref(), Some("true"));
}

#[test]
fn invalid_yaml() {
    let err = load_err("\nworker_id: \"test\"\n  bad_indent: true\n");
    assert!(err.starts_with("failed to parse config file: "), "{err}");
}

#[test]
fn unknown_top_level_field() {
    let err = load_err("worker_id: \"test\"\nunknown_field: \"value\"\n");
    assert!(err.starts_with("failed to parse config file: "), "{err}");
    assert!(err.contains("unknown field `unknown_field`"), "{err}");
}

#[test]
fn unknown_nested_fields() {
    for (yaml, key) in [
        ("backend:\n  docker:\n    volume: []\n", "volume"),
        ("backend:\n  direct:\n    workdir: /x\n", "workdir"),
        ("backend:\n  command:\n    dispatch: x\n", "dispatch"),
        ("backend:\n  podman: {}\n", "podman"),
        (
            "backend:\n  docker:\n    environment:\n      - name: A\n        secret: true\n",
            "secret",
        ),
    ] {
        let err = load_err(yaml);
        assert!(err.starts_with("failed to parse config file: "), "{err}");
        assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
    }
}

#[test]
fn type_errors_are_parse_errors() {
    let err = load_err("max_concurrent_tasks: five\n");
    assert!(
        err.starts_with("failed to parse config file: max_concurrent_tasks: invalid type"),
        "{err}"
    );
    let err = load_err("backend:\n  docker:\n    volumes: /data:/data\n");
    assert!(err.starts_with("failed to parse config file: "), "{err}");
}

#[test]
fn file_not_found() {
    let err = FileConfig::load("/nonexistent/path/config.yaml".as_ref()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("failed to read config file: /nonexistent/path/config.yaml: "),
        "{text}"
    );
}

#[test]
fn empty_file_fails_to_parse_with_eof() {
    for content in ["", "\n\n", "  # only a comment\n# another\n"] {
        let err = load(content).unwrap_err();
        assert!(
            matches!(err, ConfigError::Parse(ParseError::Empty)),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "failed to parse config file: EOF");
    }
}

#[test]
fn only_the_first_document_is_read() {
    // The reference's decoder stops after one document.
    let cfg = load_ok("worker_id: first\n---\nworker_id: second\n");
    assert_eq!(cfg.worker_id, "first");
}

#[test]
fn env_entry_with_empty_name() {
    assert_eq!(
        load_err(
            "backend:\n  docker:\n    environment:\n      - name: \"\"\n        value: \"bar\"\n"
        ),
        "invalid config: FileConfig.Backend.Docker.Environment[0].Name is required"
    );
    assert_eq!(
        load_err("backend:\n  direct:\n    environment:\n      - value: \"bar\"\n"),
        "invalid config: FileConfig.Backend.Direct.Environment[0].Name is required"
    );
}

#[test]
fn env_entry_with_whitespace_in_name() {
    assert_eq!(
        load_err(
            "backend:\n  docker:\n    environment:\n      - name: \"MY VAR\"\n        value: \"bar\"\n"
        ),
        "invalid config: FileConfig.Backend.Docker.Environment[0].Name must not contain whitespace"
    );
    assert_eq!(
        load_err(
            "backend:\n  command:\n    dispatch_command: d\n    environment:\n      - name: OK\n      - name: \"A\\tB\"\n"
        ),
        "invalid config: FileConfig.Backend.Command.Environment[1].Name must not contain whitespace"
    );
}

#[test]
fn env_entry_without_value_inherits() {
    let cfg = load_ok("backend:\n  docker:\n    environment:\n      - name: MY_HOST_VAR\n");
    let env = &cfg.backend.docker.unwrap().environment[0];
    assert_eq!(env.name, "MY_HOST_VAR");
    assert_eq!(env.value, None);

    let cfg = load_ok(
        "backend:\n  docker:\n    environment:\n      - name: EXPLICIT_EMPTY\n        value: \"\"\n",
    );
    assert_eq!(
        cfg.backend.docker.unwrap().environment[0].value.as_deref(),
        Some("")
    );
}

#[test]
fn env_entry_debug_hides_values() {
    let cfg = load_ok(
        "backend:\n  docker:\n    environment:\n      - name: TOKEN\n        value: s3cret\n",
    );
    let shown = format!("{cfg:?}");
    assert!(shown.contains("TOKEN"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[test]
fn valid_direct_config() {
    let cfg = load_ok(
        r#"
worker_id: "direct-worker"
backend:
  direct:
    workspace_root: "/tmp/oz-workspaces"
    oz_path: /usr/local/bin/oz
    setup_command: "/opt/setup.sh"
    teardown_command: "/opt/teardown.sh"
    environment:
      - name: MY_VAR
        value: "hello"
"#,
    );
    assert!(cfg.backend.docker.is_none());
    let direct = cfg.backend.direct.expect("direct backend set");
    assert_eq!(direct.workspace_root, "/tmp/oz-workspaces");
    assert_eq!(direct.target_dir, "");
    assert_eq!(direct.oz_path, "/usr/local/bin/oz");
    assert_eq!(direct.setup_command, "/opt/setup.sh");
    assert_eq!(direct.teardown_command, "/opt/teardown.sh");
    assert_eq!(direct.environment.len(), 1);
}

#[test]
fn direct_target_dir_without_workspace_root() {
    let cfg = load_ok("backend:\n  direct:\n    target_dir: /srv/repo\n");
    let direct = cfg.backend.direct.unwrap();
    assert_eq!(direct.target_dir, "/srv/repo");
    assert_eq!(direct.workspace_root, "");
}

const FULL_KUBERNETES: &str = r#"
worker_id: k8s-worker
backend:
  kubernetes:
    namespace: oz
    kubeconfig: /etc/kube/config
    default_image: ghcr.io/acme/dev:1
    image_pull_policy: Always
    use_image_volumes: true
    preflight_image: busybox:1.37
    sidecar_image: ghcr.io/acme/warp-agent:2
    setup_command: ./setup.sh
    teardown_command: ./teardown.sh
    extra_labels:
      team: infra
    extra_annotations:
      owner: "ops@example.com"
    active_deadline_seconds: 28800
    ttl_seconds_after_finished: 3600
    workspace_size_limit: 8Gi
    unschedulable_timeout: 2m
    coding_cli_sidecars:
      claude: ghcr.io/acme/claude-cli:1
      codex: ghcr.io/acme/codex-cli:1
    pod_template:
      serviceAccountName: oz-task
      imagePullSecrets:
        - name: regcred
      nodeSelector:
        pool: agents
      containers:
        - name: task
          env:
            - name: API_TOKEN
              valueFrom:
                secretKeyRef:
                  name: api
                  key: token
          someFutureField: kept
    preflight_resources:
      requests:
        cpu: 20m
"#;

#[test]
fn full_kubernetes_config() {
    let cfg = load_ok(FULL_KUBERNETES);
    let k = cfg.backend.kubernetes.expect("kubernetes backend set");
    assert_eq!(k.namespace, "oz");
    assert_eq!(k.kubeconfig, "/etc/kube/config");
    assert_eq!(k.default_image, "ghcr.io/acme/dev:1");
    assert_eq!(k.image_pull_policy, "Always");
    assert!(k.use_image_volumes);
    assert_eq!(k.preflight_image, "busybox:1.37");
    assert_eq!(k.sidecar_image, "ghcr.io/acme/warp-agent:2");
    assert_eq!(k.setup_command, "./setup.sh");
    assert_eq!(k.teardown_command, "./teardown.sh");
    assert_eq!(k.extra_labels["team"], "infra");
    assert_eq!(k.extra_annotations["owner"], "ops@example.com");
    assert_eq!(k.active_deadline_seconds, Some(28800));
    assert_eq!(k.ttl_seconds_after_finished, Some(3600));
    assert_eq!(k.workspace_size_limit, "8Gi");
    assert_eq!(k.unschedulable_timeout.as_deref(), Some("2m"));
    assert_eq!(k.coding_cli_sidecars.len(), 2);
    assert_eq!(k.coding_cli_sidecars["claude"], "ghcr.io/acme/claude-cli:1");
    assert_eq!(k.coding_cli_sidecars["codex"], "ghcr.io/acme/codex-cli:1");

    // The raw subtree is kept verbatim, including fields this crate does not
    // know (it is not strict-checked) and secretKeyRef env sources.
    let whole: serde_yaml::Value = serde_yaml::from_str(FULL_KUBERNETES).unwrap();
    let expected = &whole["backend"]["kubernetes"]["pod_template"];
    assert_eq!(k.pod_template.as_ref(), Some(expected));
    let template = k.pod_template.unwrap();
    assert_eq!(template["serviceAccountName"].as_str(), Some("oz-task"));
    assert_eq!(
        template["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["key"].as_str(),
        Some("token")
    );
    assert_eq!(
        k.preflight_resources.unwrap()["requests"]["cpu"].as_str(),
        Some("20m")
    );
}

#[test]
fn kubernetes_optional_strings_are_empty_when_absent() {
    let k = load_ok("backend:\n  kubernetes: {}\n")
        .backend
        .kubernetes
        .unwrap();
    assert_eq!(k.default_image, "");
    assert_eq!(k.sidecar_image, "");
    assert_eq!(k.unschedulable_timeout, None);
    assert_eq!(k.pod_template, None);
    assert!(k.coding_cli_sidecars.is_empty());
}

#[test]
fn invalid_image_pull_policy() {
    assert_eq!(
        load_err("backend:\n  kubernetes:\n    image_pull_policy: Sometimes\n"),
        r#"invalid config: FileConfig.Backend.Kubernetes.ImagePullPolicy failed validation "oneof""#
    );
    // Kubernetes spellings are case-sensitive.
    assert!(load("backend:\n  kubernetes:\n    image_pull_policy: always\n").is_err());
    for policy in ["Always", "Never", "IfNotPresent"] {
        load_ok(&format!(
            "backend:\n  kubernetes:\n    image_pull_policy: {policy}\n"
        ));
    }
}

#[test]
fn images_must_not_contain_whitespace() {
    assert_eq!(
        load_err("backend:\n  kubernetes:\n    default_image: \"ubuntu 22.04\"\n"),
        "invalid config: FileConfig.Backend.Kubernetes.DefaultImage must not contain whitespace"
    );
    assert_eq!(
        load_err("backend:\n  kubernetes:\n    sidecar_image: \"warp\\tagent\"\n"),
        "invalid config: FileConfig.Backend.Kubernetes.SidecarImage must not contain whitespace"
    );
    // Every violation is reported, in the reference's field order.
    assert_eq!(
        load_err(
            "backend:\n  kubernetes:\n    sidecar_image: \"a b\"\n    preflight_image: \"c d\"\n    image_pull_policy: Sometimes\n    default_image: \"e f\"\n"
        ),
        "invalid config: FileConfig.Backend.Kubernetes.DefaultImage must not contain whitespace; \
         FileConfig.Backend.Kubernetes.ImagePullPolicy failed validation \"oneof\"; \
         FileConfig.Backend.Kubernetes.PreflightImage must not contain whitespace; \
         FileConfig.Backend.Kubernetes.SidecarImage must not contain whitespace"
    );
}

#[test]
fn legacy_kubernetes_keys_are_rejected_by_name() {
    for (key, value) in [
        ("image_pull_secret", "regcred"),
        ("service_account", "oz"),
        ("node_selector", "{pool: agents}"),
        ("tolerations", "[]"),
        ("resources", "{requests: {cpu: 1}}"),
        ("termination_grace_period_seconds", "30"),
        ("environment", "[{name: A, value: b}]"),
    ] {
        let err = load_err(&format!("backend:\n  kubernetes:\n    {key}: {value}\n"));
        assert!(err.starts_with("failed to parse config file: "), "{err}");
        assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
    }
}

#[test]
fn at_most_one_backend() {
    for yaml in [
        "backend:\n  docker:\n    volumes: []\n  direct:\n    workspace_root: \"/tmp\"\n",
        "backend:\n  command:\n    dispatch_command: ./d\n  docker: {}\n",
        "backend:\n  kubernetes: {}\n  command:\n    dispatch_command: ./d\n",
    ] {
        assert_eq!(
            load_err(yaml),
            "invalid config: at most one backend may be configured"
        );
    }
    // Field errors come first, then the backend count.
    let err = load("backend:\n  docker:\n    environment:\n      - name: \"\"\n  command: {}\n")
        .unwrap_err();
    let ConfigError::Invalid(issues) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        issues,
        &[
            ValidationError::Required("FileConfig.Backend.Docker.Environment[0].Name".into()),
            ValidationError::Required("FileConfig.Backend.Command.DispatchCommand".into()),
            ValidationError::MultipleBackends,
        ]
    );
    assert_eq!(
        err.to_string(),
        "invalid config: FileConfig.Backend.Docker.Environment[0].Name is required; \
         FileConfig.Backend.Command.DispatchCommand is required; \
         at most one backend may be configured"
    );
}

#[test]
fn null_backend_block_counts_as_absent() {
    let cfg = load_ok("backend:\n  docker:\n  direct: {}\n");
    assert!(cfg.backend.docker.is_none());
    assert!(cfg.backend.direct.is_some());

    let cfg = load_ok("backend:\n  docker: {}\n");
    assert_eq!(cfg.backend.docker, Some(Default::default()));

    let cfg = load_ok("backend:\n");
    assert_eq!(cfg.backend, Default::default());
}

#[test]
fn valid_command_config() {
    let cfg = load_ok(
        "backend:\n  command:\n    dispatch_command: ./dispatch.py\n    cancel_command: ./cancel.py\n    dispatch_timeout: 30s\n    environment:\n      - name: OZ_DISPATCH_URL\n        value: https://runner.example.com\n",
    );
    let c = cfg.backend.command.unwrap();
    assert_eq!(c.dispatch_command, "./dispatch.py");
    assert_eq!(c.cancel_command, "./cancel.py");
    assert_eq!(c.dispatch_timeout, "30s");
    assert_eq!(c.environment[0].name, "OZ_DISPATCH_URL");
}

#[test]
fn command_requires_dispatch_command() {
    let err = load_err("backend:\n  command:\n    cancel_command: ./cancel.py\n");
    assert_eq!(
        err,
        "invalid config: FileConfig.Backend.Command.DispatchCommand is required"
    );
    assert!(err.contains("required"));
}

#[test]
fn idle_on_complete_set_and_unset() {
    assert_eq!(
        load_ok("worker_id: t\nidle_on_complete: \"10m\"\n")
            .idle_on_complete
            .as_deref(),
        Some("10m")
    );
    assert_eq!(load_ok("worker_id: t\n").idle_on_complete, None);
}

#[test]
fn max_concurrent_tasks_set_and_unset() {
    assert_eq!(
        load_ok("worker_id: t\nmax_concurrent_tasks: 5\n").max_concurrent_tasks,
        Some(5)
    );
    assert_eq!(load_ok("worker_id: t\n").max_concurrent_tasks, None);
}

#[test]
fn from_yaml_str_validates_too() {
    assert!(matches!(
        FileConfig::from_yaml_str("backend:\n  command: {}\n"),
        Err(ConfigError::Invalid(_))
    ));
    assert_eq!(
        FileConfig::from_yaml_str("worker_id: w\n")
            .unwrap()
            .worker_id,
        "w"
    );
}

#[test]
fn docker_extension_keys_are_validated() {
    let cfg = load_ok(
        "backend:\n  docker:\n    image_pull_policy: IfNotPresent\n    network_mode: host\n",
    );
    let docker = cfg.backend.docker.unwrap();
    assert_eq!(docker.image_pull_policy, "IfNotPresent");
    assert_eq!(docker.network_mode, "host");
    assert_eq!(
        load_err("backend:\n  docker:\n    image_pull_policy: Sometimes\n"),
        r#"invalid config: FileConfig.Backend.Docker.ImagePullPolicy failed validation "oneof""#
    );
    assert_eq!(
        load_err("backend:\n  docker:\n    network_mode: \"my net\"\n"),
        "invalid config: FileConfig.Backend.Docker.NetworkMode must not contain whitespace"
    );
}
