//! Ports of the reference's `main_test.go` (config merge) and the precedence
//! table of spec §2.4.

use std::{path::PathBuf, time::Duration};

use ozfleet_worker_config::{
    BackendName, BackendSource, FileConfig, ImagePullPolicy, MergeError, MergedConfig, WorkerFlags,
    merge, validate_worker_id,
};

/// The worker's environment as the tests see it; nothing reads the real one.
fn host_env(name: &str) -> Option<String> {
    match name {
        "HOST_TOKEN" => Some("from-host".to_owned()),
        "SHARED" => Some("host-shared".to_owned()),
        _ => None,
    }
}

fn file(yaml: &str) -> FileConfig {
    FileConfig::from_yaml_str(yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn flags() -> WorkerFlags {
    WorkerFlags {
        worker_id: Some("worker-1".to_owned()),
        ..WorkerFlags::default()
    }
}

fn merged(flags: WorkerFlags, yaml: Option<&str>) -> MergedConfig {
    merge(flags, yaml.map(file), &host_env).unwrap_or_else(|e| panic!("{e}"))
}

fn merge_err(flags: WorkerFlags, yaml: Option<&str>) -> String {
    merge(flags, yaml.map(file), &host_env)
        .unwrap_err()
        .to_string()
}

fn pairs(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const KUBERNETES_FILE: &str = r#"
worker_id: file-worker
backend:
  kubernetes:
    namespace: agents
    kubeconfig: /home/oz/.kube/config
    image_pull_policy: Never
    use_image_volumes: true
    preflight_image: registry.local/busybox:1
    setup_command: echo setup
    teardown_command: echo teardown
    extra_labels: {team: infra}
    extra_annotations: {note: hello}
    active_deadline_seconds: 600
    workspace_size_limit: 8Gi
    unschedulable_timeout: 2m
    coding_cli_sidecars:
      claude: registry.local/claude-cli:1
    pod_template:
      serviceAccountName: oz-agent
      imagePullSecrets:
        - name: regcred
    preflight_resources:
      limits: {cpu: 200m, memory: 64Mi}
"#;

#[test]
fn kubernetes_config_from_file() {
    let cfg = merged(
        WorkerFlags {
            worker_id: None,
            env: vec!["FOO=cli".into(), "BAR=1".into(), "FOO=cli-wins".into()],
            ..WorkerFlags::default()
        },
        Some(KUBERNETES_FILE),
    );
    assert_eq!(cfg.require_worker_id(), Ok("file-worker"));
    assert_eq!(cfg.backend, BackendName::Kubernetes);
    assert_eq!(cfg.backend_source, BackendSource::ConfigFile);
    assert_eq!(cfg.backend_name_for_telemetry, "kubernetes");
    assert!(cfg.command.is_none());

    let k = cfg.kubernetes.expect("kubernetes settings");
    assert_eq!(k.namespace, "agents");
    assert_eq!(k.kubeconfig, Some(PathBuf::from("/home/oz/.kube/config")));
    assert_eq!(k.image_pull_policy, ImagePullPolicy::Never);
    assert_eq!(k.image_pull_policy.as_str(), "Never");
    assert!(k.use_image_volumes);
    assert_eq!(k.preflight_image, "registry.local/busybox:1");
    assert_eq!(k.setup_command.as_deref(), Some("echo setup"));
    assert_eq!(k.teardown_command.as_deref(), Some("echo teardown"));
    assert_eq!(k.extra_labels["team"], "infra");
    assert_eq!(k.extra_annotations["note"], "hello");
    assert_eq!(k.active_deadline_seconds, Some(600));
    assert_eq!(
        k.workspace_size_limit.as_ref().map(|q| q.as_str()),
        Some("8Gi")
    );
    assert_eq!(k.unschedulable_timeout, Duration::from_secs(120));
    assert_eq!(k.ttl_seconds_after_finished, Some(86_400));

    let template = k.pod_template.expect("pod template");
    assert_eq!(template["serviceAccountName"], "oz-agent");
    assert_eq!(template["imagePullSecrets"][0]["name"], "regcred");
    let resources = k.preflight_resources.expect("preflight resources");
    assert_eq!(resources["limits"]["memory"], "64Mi");

    // Kubernetes gets only CLI -e ("TaskEnv"); a repeated key keeps the last.
    assert_eq!(cfg.env, pairs(&[("FOO", "cli-wins"), ("BAR", "1")]));
}

#[test]
fn kubernetes_defaults_when_selected_by_flag_alone() {
    let cfg = merged(
        WorkerFlags {
            backend: Some("kubernetes".into()),
            ..flags()
        },
        None,
    );
    assert_eq!(cfg.backend_source, BackendSource::Flag);
    let k = cfg.kubernetes.unwrap();
    assert_eq!(k.namespace, "default");
    assert_eq!(k.kubeconfig, None);
    assert_eq!(k.default_image, None);
    assert_eq!(k.image_pull_policy, ImagePullPolicy::IfNotPresent);
    assert!(!k.use_image_volumes);
    assert_eq!(k.preflight_image, "busybox:1.36");
    assert_eq!(k.sidecar_image, None);
    assert_eq!(k.unschedulable_timeout, Duration::from_secs(30));
    assert_eq!(k.ttl_seconds_after_finished, Some(86_400));
    assert_eq!(k.workspace_size_limit, None);
    assert_eq!(k.pod_template, None);
}

#[test]
fn kubernetes_ttl_follows_cleanup() {
    let yaml = "backend:\n  kubernetes:\n    ttl_seconds_after_finished: 60\n";
    let k = merged(flags(), Some(yaml)).kubernetes.unwrap();
    assert_eq!(k.ttl_seconds_after_finished, Some(60));

    let k = merged(
        WorkerFlags {
            no_cleanup: true,
            ..flags()
        },
        Some(yaml),
    )
    .kubernetes
    .unwrap();
    assert_eq!(
        k.ttl_seconds_after_finished, None,
        "Jobs kept without cleanup"
    );
}

#[test]
fn unschedulable_timeout_zero_disables() {
    let k = merged(
        flags(),
        Some("backend:\n  kubernetes:\n    unschedulable_timeout: 0s\n"),
    )
    .kubernetes
    .unwrap();
    assert_eq!(k.unschedulable_timeout, Duration::ZERO);
}

#[test]
fn invalid_kubernetes_values() {
    assert_eq!(
        merge_err(
            flags(),
            Some("backend:\n  kubernetes:\n    unschedulable_timeout: soon\n")
        ),
        r#"invalid backend.kubernetes.unschedulable_timeout "soon": time: invalid duration "soon""#
    );
    assert_eq!(
        merge_err(
            flags(),
            Some("backend:\n  kubernetes:\n    unschedulable_timeout: \"\"\n")
        ),
        r#"invalid backend.kubernetes.unschedulable_timeout "": time: invalid duration """#
    );
    assert_eq!(
        merge_err(
            flags(),
            Some("backend:\n  kubernetes:\n    workspace_size_limit: lots\n")
        ),
        "invalid backend.kubernetes.workspace_size_limit \"lots\": quantities must match the \
         regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
    );
    assert_eq!(
        merge_err(
            flags(),
            Some("backend:\n  kubernetes:\n    workspace_size_limit: 10GB\n")
        ),
        "invalid backend.kubernetes.workspace_size_limit \"10GB\": quantities must match the \
         regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
    );
    assert_eq!(
        merge_err(
            flags(),
            Some("backend:\n  kubernetes:\n    pod_template: [not, a, podspec]\n")
        ),
        "invalid backend.kubernetes.pod_template: expected a mapping (Kubernetes PodSpec), got a list"
    );
    assert_eq!(
        merge_err(
            flags(),
            Some("backend:\n  kubernetes:\n    preflight_resources: {requests: {cpu: 1mi}}\n")
        ),
        "invalid backend.kubernetes.preflight_resources: requests.cpu \"1mi\": unable to parse quantity's suffix"
    );
}

#[test]
fn kubernetes_block_is_ignored_when_flag_selects_another_backend() {
    // Not parsed, so its bad duration does not matter.
    let cfg = merged(
        WorkerFlags {
            backend: Some("docker".into()),
            ..flags()
        },
        Some("backend:\n  kubernetes:\n    unschedulable_timeout: soon\n"),
    );
    assert_eq!(cfg.backend, BackendName::Docker);
    assert!(cfg.kubernetes.is_none());
}

#[test]
fn coding_cli_sidecars_are_copied() {
    let source = file(KUBERNETES_FILE);
    let cfg = merge(flags(), Some(source.clone()), &host_env).unwrap();
    let copied = cfg.kubernetes.unwrap().coding_cli_sidecars;
    assert_eq!(
        copied,
        source.backend.kubernetes.unwrap().coding_cli_sidecars,
        "same content, owned by the merged config"
    );
    assert_eq!(copied["claude"], "registry.local/claude-cli:1");
}

#[test]
fn cli_overrides_worker_id_and_cleanup() {
    let yaml = "worker_id: from-file\ncleanup: true\n";
    let cfg = merged(
        WorkerFlags {
            worker_id: Some("from-cli".into()),
            no_cleanup: true,
            ..WorkerFlags::default()
        },
        Some(yaml),
    );
    assert_eq!(cfg.worker_id.as_deref(), Some("from-cli"));
    assert!(!cfg.cleanup);

    // An empty flag counts as not given.
    let cfg = merged(
        WorkerFlags {
            worker_id: Some(String::new()),
            ..WorkerFlags::default()
        },
        Some(yaml),
    );
    assert_eq!(cfg.require_worker_id(), Ok("from-file"));
    assert!(cfg.cleanup);
}

#[test]
fn cleanup_precedence() {
    assert!(merged(flags(), None).cleanup, "enabled by default");
    assert!(!merged(flags(), Some("cleanup: false\n")).cleanup);
    assert!(merged(flags(), Some("cleanup: true\n")).cleanup);
    assert!(
        !merged(
            WorkerFlags {
                no_cleanup: true,
                ..flags()
            },
            Some("cleanup: true\n")
        )
        .cleanup
    );
}

#[test]
fn command_backend_merge() {
    let cfg = merged(
        WorkerFlags {
            env: vec!["SHARED=cli".into(), "EXTRA=1".into()],
            ..flags()
        },
        Some(
            "backend:\n  command:\n    dispatch_command: ./dispatch.py\n    cancel_command: ./cancel.py\n    dispatch_timeout: 30s\n    environment:\n      - name: OZ_DISPATCH_URL\n        value: https://runner.example.com\n      - name: SHARED\n        value: file\n",
        ),
    );
    assert_eq!(cfg.backend, BackendName::Command);
    assert_eq!(cfg.require_worker_id(), Ok("worker-1"));
    let c = cfg.command.as_ref().unwrap();
    assert_eq!(c.dispatch_command, "./dispatch.py");
    assert_eq!(c.cancel_command.as_deref(), Some("./cancel.py"));
    assert_eq!(c.dispatch_timeout, Duration::from_secs(30));
    assert_eq!(
        cfg.env,
        pairs(&[
            ("OZ_DISPATCH_URL", "https://runner.example.com"),
            ("SHARED", "cli"),
            ("EXTRA", "1"),
        ])
    );
    assert!(cfg.kubernetes.is_none());
}

#[test]
fn dispatch_timeout_defaults() {
    for yaml in [
        "backend:\n  command:\n    dispatch_command: d\n",
        "backend:\n  command:\n    dispatch_command: d\n    dispatch_timeout: 0s\n",
        "backend:\n  command:\n    dispatch_command: d\n    dispatch_timeout: -5s\n",
    ] {
        assert_eq!(
            merged(flags(), Some(yaml))
                .command
                .unwrap()
                .dispatch_timeout,
            Duration::from_secs(60),
            "{yaml}"
        );
    }
}

#[test]
fn invalid_dispatch_timeout() {
    assert_eq!(
        merge_err(
            flags(),
            Some("backend:\n  command:\n    dispatch_command: d\n    dispatch_timeout: nope\n")
        ),
        r#"invalid backend.command.dispatch_timeout "nope": time: invalid duration "nope""#
    );
    assert_eq!(
        merge_err(
            flags(),
            Some("backend:\n  command:\n    dispatch_command: d\n    dispatch_timeout: \"90\"\n")
        ),
        r#"invalid backend.command.dispatch_timeout "90": time: missing unit in duration "90""#
    );
}

#[test]
fn command_backend_by_flag_needs_a_dispatch_command() {
    let err = merge(
        WorkerFlags {
            backend: Some("command".into()),
            ..flags()
        },
        None,
        &host_env,
    )
    .unwrap_err();
    assert_eq!(err, MergeError::MissingDispatchCommand);
    assert_eq!(
        err.to_string(),
        "command backend requires a dispatch command"
    );
}

#[test]
fn worker_id_rules() {
    assert_eq!(
        merge_err(
            WorkerFlags {
                worker_id: Some("warp-worker".into()),
                ..WorkerFlags::default()
            },
            None
        ),
        "invalid worker-id: values starting with 'warp' are reserved and cannot be used"
    );
    assert_eq!(
        merge_err(WorkerFlags::default(), Some("worker_id: warpy\n")),
        "invalid worker-id: values starting with 'warp' are reserved and cannot be used"
    );
    // The prefix check is case-sensitive.
    let cfg = merged(
        WorkerFlags {
            worker_id: Some("Warp-worker".into()),
            ..WorkerFlags::default()
        },
        None,
    );
    assert_eq!(cfg.require_worker_id(), Ok("Warp-worker"));
    assert_eq!(validate_worker_id("my-warp"), Ok(()));
    assert_eq!(
        validate_worker_id("warp"),
        Err(MergeError::ReservedWorkerId)
    );
    assert_eq!(validate_worker_id(""), Err(MergeError::WorkerIdRequired));

    // Missing is reported when the caller requires it, not by merge.
    let cfg = merged(WorkerFlags::default(), None);
    assert_eq!(cfg.worker_id, None);
    let err = cfg.require_worker_id().unwrap_err();
    assert_eq!(
        err.to_string(),
        "worker-id is required (via --worker-id flag or config file)"
    );
}

#[test]
fn docker_env_precedence() {
    let cfg = merged(
        WorkerFlags {
            env: vec![
                "SHARED=cli".into(),
                "HOST_TOKEN".into(),
                "WITH_EQUALS=a=b".into(),
                "UNSET_ON_HOST".into(),
            ],
            ..flags()
        },
        Some(
            "backend:\n  docker:\n    environment:\n      - name: EXPLICIT\n        value: file\n      - name: SHARED\n      - name: MISSING_ON_HOST\n      - name: HOST_TOKEN\n        value: file-token\n",
        ),
    );
    assert_eq!(
        cfg.env,
        pairs(&[
            ("EXPLICIT", "file"),
            ("SHARED", "cli"),
            ("MISSING_ON_HOST", ""),
            ("HOST_TOKEN", "from-host"),
            ("WITH_EQUALS", "a=b"),
            ("UNSET_ON_HOST", ""),
        ])
    );
}

#[test]
fn file_env_inherits_from_host() {
    let cfg = merged(
        flags(),
        Some("backend:\n  direct:\n    environment:\n      - name: HOST_TOKEN\n"),
    );
    assert_eq!(cfg.env, pairs(&[("HOST_TOKEN", "from-host")]));
}

#[test]
fn env_flag_errors() {
    for (entry, message) in [
        ("", "invalid --env flag: empty value"),
        ("=x", r#"invalid --env flag: missing key in "=x""#),
        (
            "A B=x",
            r#"invalid --env flag: key contains whitespace in "A B=x""#,
        ),
    ] {
        assert_eq!(
            merge_err(
                WorkerFlags {
                    env: vec!["OK=1".into(), entry.into()],
                    ..flags()
                },
                None
            ),
            message
        );
    }
}

#[test]
fn backend_precedence() {
    let cases = [
        (None, None, BackendName::Docker, BackendSource::Default, ""),
        (
            Some(""),
            None,
            BackendName::Docker,
            BackendSource::Default,
            "",
        ),
        (
            None,
            Some("backend: {}\n"),
            BackendName::Docker,
            BackendSource::Default,
            "",
        ),
        (
            None,
            Some("backend:\n  docker: {}\n"),
            BackendName::Docker,
            BackendSource::ConfigFile,
            "docker",
        ),
        (
            None,
            Some("backend:\n  direct: {}\n"),
            BackendName::Direct,
            BackendSource::ConfigFile,
            "direct",
        ),
        (
            None,
            Some("backend:\n  command:\n    dispatch_command: d\n"),
            BackendName::Command,
            BackendSource::ConfigFile,
            "command",
        ),
        (
            Some("docker"),
            None,
            BackendName::Docker,
            BackendSource::Flag,
            "docker",
        ),
        (
            Some("direct"),
            Some("backend:\n  docker: {}\n"),
            BackendName::Direct,
            BackendSource::Flag,
            "direct",
        ),
    ];
    for (flag, yaml, backend, source, telemetry) in cases {
        let cfg = merged(
            WorkerFlags {
                backend: flag.map(str::to_owned),
                ..flags()
            },
            yaml,
        );
        assert_eq!(cfg.backend, backend, "{flag:?} {yaml:?}");
        assert_eq!(cfg.backend_source, source, "{flag:?} {yaml:?}");
        assert_eq!(
            cfg.backend_name_for_telemetry, telemetry,
            "{flag:?} {yaml:?}"
        );
    }
    assert_eq!(BackendName::default(), BackendName::Docker);
    assert_eq!(BackendName::Kubernetes.to_string(), "kubernetes");
}

#[test]
fn flag_backend_ignores_other_file_block_env() {
    let cfg = merged(
        WorkerFlags {
            backend: Some("direct".into()),
            ..flags()
        },
        Some(
            "backend:\n  docker:\n    environment:\n      - name: DOCKER_ONLY\n        value: x\n",
        ),
    );
    assert_eq!(cfg.backend, BackendName::Direct);
    assert!(cfg.env.is_empty());
}

#[test]
fn unknown_backend_flag() {
    assert_eq!(
        merge_err(
            WorkerFlags {
                backend: Some("podman".into()),
                ..flags()
            },
            None
        ),
        r#"invalid --backend "podman": must be one of docker, direct, kubernetes, command"#
    );
}

#[test]
fn max_concurrent_tasks_precedence() {
    let with = |n: i64| WorkerFlags {
        max_concurrent_tasks: n,
        ..flags()
    };
    assert_eq!(merged(with(0), None).max_concurrent_tasks, 0);
    assert_eq!(
        merged(with(0), Some("max_concurrent_tasks: 4\n")).max_concurrent_tasks,
        4
    );
    assert_eq!(
        merged(with(2), Some("max_concurrent_tasks: 4\n")).max_concurrent_tasks,
        2
    );
    // Negative means unlimited downstream but is kept as given.
    assert_eq!(
        merged(with(-1), Some("max_concurrent_tasks: 4\n")).max_concurrent_tasks,
        -1
    );
}

#[test]
fn idle_on_complete_precedence() {
    let with = |idle: Option<&str>| WorkerFlags {
        idle_on_complete: idle.map(str::to_owned),
        ..flags()
    };
    assert_eq!(merged(with(None), None).idle_on_complete, None);
    assert_eq!(
        merged(with(None), Some("idle_on_complete: 10m\n"))
            .idle_on_complete
            .as_deref(),
        Some("10m")
    );
    assert_eq!(
        merged(with(Some("")), Some("idle_on_complete: 10m\n"))
            .idle_on_complete
            .as_deref(),
        Some("10m")
    );
    assert_eq!(
        merged(with(Some("0s")), Some("idle_on_complete: 10m\n"))
            .idle_on_complete
            .as_deref(),
        Some("0s")
    );
}

#[test]
fn docker_volumes_file_then_cli() {
    let cfg = merged(
        WorkerFlags {
            volumes: vec!["/cli:/cli".into()],
            ..flags()
        },
        Some("backend:\n  docker:\n    volumes: [\"/a:/a:ro\", \"/b:/b\"]\n"),
    );
    assert_eq!(cfg.docker.volumes, ["/a:/a:ro", "/b:/b", "/cli:/cli"]);
}

#[test]
fn direct_settings() {
    let cfg = merged(flags(), Some("backend:\n  direct: {}\n"));
    assert_eq!(
        cfg.direct.workspace_root,
        PathBuf::from("/var/lib/oz/workspaces")
    );
    assert_eq!(cfg.direct.target_dir, None);
    assert_eq!(cfg.direct.oz_path, None);

    let yaml = "backend:\n  direct:\n    workspace_root: /srv/ws\n    target_dir: /srv/file-target\n    oz_path: /opt/oz\n    setup_command: ./s\n    teardown_command: ./t\n";
    let cfg = merged(flags(), Some(yaml));
    assert_eq!(cfg.direct.workspace_root, PathBuf::from("/srv/ws"));
    assert_eq!(
        cfg.direct.target_dir,
        Some(PathBuf::from("/srv/file-target"))
    );
    assert_eq!(cfg.direct.oz_path, Some(PathBuf::from("/opt/oz")));
    assert_eq!(cfg.direct.setup_command.as_deref(), Some("./s"));
    assert_eq!(cfg.direct.teardown_command.as_deref(), Some("./t"));

    let cfg = merged(
        WorkerFlags {
            target_dir: Some("/srv/cli-target".into()),
            ..flags()
        },
        Some(yaml),
    );
    assert_eq!(
        cfg.direct.target_dir,
        Some(PathBuf::from("/srv/cli-target"))
    );
}

#[test]
fn debug_output_hides_env_values() {
    let worker_flags = WorkerFlags {
        env: vec!["API_TOKEN=s3cret-cli".into(), "BARE".into()],
        ..flags()
    };
    let shown = format!("{worker_flags:?}");
    assert!(
        shown.contains("API_TOKEN") && shown.contains("BARE"),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");

    let cfg = merged(
        worker_flags,
        Some(
            "backend:\n  docker:\n    environment:\n      - name: FILE_TOKEN\n        value: s3cret-file\n",
        ),
    );
    let shown = format!("{cfg:?}");
    assert!(
        shown.contains("API_TOKEN") && shown.contains("FILE_TOKEN"),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[test]
fn hand_built_file_config_is_validated() {
    let mut config = FileConfig::default();
    config.backend.kubernetes = Some(ozfleet_worker_config::KubernetesConfig {
        image_pull_policy: "Sometimes".into(),
        ..Default::default()
    });
    let err = merge(flags(), Some(config), &host_env).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"invalid config: FileConfig.Backend.Kubernetes.ImagePullPolicy failed validation "oneof""#
    );
}

#[test]
fn docker_pulls_always_by_default_and_takes_the_extension_keys() {
    use ozfleet_worker_config::ImagePullPolicy;
    let defaults = merged(flags(), Some("backend:\n  docker: {}\n"));
    assert_eq!(defaults.docker.image_pull_policy, ImagePullPolicy::Always);
    assert_eq!(defaults.docker.network_mode, None);
    let set = merged(
        flags(),
        Some("backend:\n  docker:\n    image_pull_policy: Never\n    network_mode: host\n"),
    );
    assert_eq!(set.docker.image_pull_policy, ImagePullPolicy::Never);
    assert_eq!(set.docker.network_mode.as_deref(), Some("host"));
}
