//! The task pod (spec §5.4): workspace and sidecar volumes, the sidecar copy or image
//! volumes, the setup init container, the `task` container with its wrapper, env,
//! teardown hook and instance shape, merged into the operator's `pod_template`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, ExecAction, ImageVolumeSource, Lifecycle,
    LifecycleHandler, PodSpec, ResourceRequirements, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use ozfleet_proto::oz::{InstanceShape, SidecarMount};
use secrecy::ExposeSecret as _;

use crate::backend::TaskEnv;
use crate::images::SidecarChecks;

/// Name of the worker's main container (a template container of that name is patched).
pub const TASK_CONTAINER: &str = "task";
/// Name of the setup init container.
pub const SETUP_CONTAINER: &str = "setup";
/// Where the workspace emptyDir is mounted.
pub const WORKSPACE_PATH: &str = "/workspace";
/// The dotenv file setup may write and the wrapper sources.
pub const ENVIRONMENT_FILE: &str = "/workspace/.oz-env";
const WORKSPACE_VOLUME: &str = "workspace";

/// `$0` of the task container's shell.
const WRAPPER_NAME: &str = "oz-task";

/// Sources `$OZ_ENVIRONMENT_FILE` (auto-export on) when it exists, then execs the agent
/// sidecar's entrypoint with the oz argv. `report-shutdown` is the entrypoint's job.
pub const TASK_WRAPPER_SCRIPT: &str = r#"if [ -n "${OZ_ENVIRONMENT_FILE:-}" ] && [ -f "$OZ_ENVIRONMENT_FILE" ]; then
  set -a
  . "$OZ_ENVIRONMENT_FILE"
  set +a
fi
exec /agent/entrypoint.sh "$@""#;

/// Copies a sidecar image's root filesystem into the data volume at `/target` (GNU tar:
/// `--exclude`, `--no-same-owner`, `--no-same-permissions`).
pub const SIDECAR_COPY_SCRIPT: &str = "set -eu\ncd /\ntar -cf - --exclude=./target --exclude=./proc --exclude=./sys --exclude=./dev --exclude=./.dockerenv --exclude=./var/run/secrets --exclude=./run/secrets . | tar -xf - -C /target --no-same-owner --no-same-permissions";

/// Everything the worker contributes to a task pod.
pub struct PodInputs<'a> {
    pub image: &'a str,
    pub pull_policy: &'a str,
    pub base_args: &'a [String],
    /// The task env of [`task_env`]; values are credentials.
    pub env: &'a TaskEnv,
    /// Validated, overrides applied.
    pub sidecars: &'a [SidecarMount],
    pub use_image_volumes: bool,
    pub setup_command: Option<&'a str>,
    pub teardown_command: Option<&'a str>,
    pub workspace_size_limit: Option<&'a str>,
    pub instance_shape: Option<InstanceShape>,
}

/// The task env (spec §5.4): common env, then the operator's `-e` sorted by name, then
/// the `OZ_*` variables; duplicates removed with the last value winning, empty names
/// dropped. `OZ_EXECUTION_ID` is deliberately absent.
pub fn task_env(common: &TaskEnv, operator: &TaskEnv, task_id: &str) -> TaskEnv {
    let mut operator = operator.clone();
    operator.sort_by(|a, b| a.0.cmp(&b.0));
    let oz = crate::backend::secret_env([
        ("OZ_ENVIRONMENT_FILE", ENVIRONMENT_FILE),
        ("OZ_WORKSPACE_ROOT", WORKSPACE_PATH),
        ("OZ_WORKER_BACKEND", "kubernetes"),
        ("OZ_RUN_ID", task_id),
    ]);
    let all: TaskEnv = common
        .iter()
        .chain(&operator)
        .chain(&oz)
        .filter(|(name, _)| !name.is_empty())
        .cloned()
        .collect();
    crate::task_env::dedupe_last_wins(all)
}

/// The sidecar list with the Kubernetes overrides (spec §3.4): `sidecar_image` replaces
/// the `/agent` entry's image; a configured `coding_cli_sidecars` image for the task's
/// harness replaces (or adds, read-only) the `/mnt/<harness>-cli-sidecar` entry.
pub fn apply_sidecar_overrides(
    mut sidecars: Vec<SidecarMount>,
    sidecar_image: Option<&str>,
    harness: Option<&str>,
    coding_cli_sidecars: &BTreeMap<String, String>,
) -> Vec<SidecarMount> {
    if let Some(image) = sidecar_image.filter(|image| !image.is_empty())
        && let Some(agent) = sidecars
            .iter_mut()
            .find(|sidecar| sidecar.mount_path == crate::images::AGENT_SIDECAR_MOUNT)
    {
        tracing::info!(
            server_image = %agent.image,
            image,
            "using the configured sidecar_image for /agent"
        );
        agent.image = image.to_owned();
    }
    let harness = harness.map(str::trim).filter(|harness| !harness.is_empty());
    if let Some(harness) = harness
        && let Some(image) = coding_cli_sidecars
            .get(harness)
            .filter(|image| !image.is_empty())
    {
        let mount_path = format!("/mnt/{harness}-cli-sidecar");
        match sidecars
            .iter_mut()
            .find(|sidecar| sidecar.mount_path == mount_path)
        {
            Some(sidecar) => sidecar.image = image.clone(),
            None => sidecars.push(SidecarMount {
                image: image.clone(),
                mount_path,
                read_write: false,
            }),
        }
    }
    sidecars
}

/// Rejects what cannot be mounted (reason `sidecar_prep`): empty image or mount path,
/// `/workspace`, duplicate mount paths, and read-write image volumes.
pub fn validate_sidecars(sidecars: &[SidecarMount], use_image_volumes: bool) -> Result<(), String> {
    let mut checks = SidecarChecks::default();
    for sidecar in sidecars {
        SidecarChecks::required_fields(sidecar)?;
        if sidecar.mount_path.trim_end_matches('/') == WORKSPACE_PATH {
            return Err(format!(
                "sidecar {} cannot be mounted at reserved path {WORKSPACE_PATH}",
                sidecar.image
            ));
        }
        checks.unique_mount_path(sidecar)?;
        if use_image_volumes && sidecar.read_write {
            return Err(format!(
                "sidecar {} at {} requests read_write, but image volumes are read-only",
                sidecar.image, sidecar.mount_path
            ));
        }
    }
    Ok(())
}

/// Kubernetes env entries; the values leave the process only inside the Job.
fn env_vars(env: &TaskEnv) -> Vec<EnvVar> {
    env.iter()
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.expose_secret().to_owned()),
            value_from: None,
        })
        .collect()
}

/// requests = limits per positive axis: cpu in cores, memory in Gi.
pub fn shape_resources(shape: Option<InstanceShape>) -> BTreeMap<String, Quantity> {
    let mut resources = BTreeMap::new();
    if let Some(shape) = shape {
        if shape.vcpus > 0 {
            resources.insert("cpu".to_owned(), Quantity(shape.vcpus.to_string()));
        }
        if shape.memory_gb > 0 {
            resources.insert(
                "memory".to_owned(),
                Quantity(format!("{}Gi", shape.memory_gb)),
            );
        }
    }
    resources
}

/// Merges the shape into a container's resources per resource name (other entries kept).
fn apply_shape(resources: &mut Option<ResourceRequirements>, shape: Option<InstanceShape>) {
    let shaped = shape_resources(shape);
    if shaped.is_empty() {
        return;
    }
    let resources = resources.get_or_insert_with(Default::default);
    for map in [&mut resources.requests, &mut resources.limits] {
        let map = map.get_or_insert_with(BTreeMap::new);
        for (name, quantity) in &shaped {
            map.insert(name.clone(), quantity.clone());
        }
    }
}

fn root_security_context() -> SecurityContext {
    SecurityContext {
        run_as_user: Some(0),
        run_as_group: Some(0),
        ..Default::default()
    }
}

/// The pod spec: the template (deep-copied by value) with the worker's parts merged in.
pub fn build_pod_spec(template: Option<&PodSpec>, inputs: &PodInputs<'_>) -> PodSpec {
    let mut volumes = vec![Volume {
        name: WORKSPACE_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: inputs.workspace_size_limit.map(|q| Quantity(q.to_owned())),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: WORKSPACE_VOLUME.to_owned(),
        mount_path: WORKSPACE_PATH.to_owned(),
        ..Default::default()
    }];
    let mut init_containers = Vec::new();
    for (index, sidecar) in inputs.sidecars.iter().enumerate() {
        if inputs.use_image_volumes {
            let name = format!("sidecar-{index}-image");
            volumes.push(Volume {
                name: name.clone(),
                image: Some(ImageVolumeSource {
                    reference: Some(sidecar.image.clone()),
                    pull_policy: Some(inputs.pull_policy.to_owned()),
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name,
                mount_path: sidecar.mount_path.clone(),
                read_only: Some(true),
                ..Default::default()
            });
        } else {
            let name = format!("sidecar-{index}-data");
            volumes.push(Volume {
                name: name.clone(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            });
            init_containers.push(Container {
                name: format!("copy-sidecar-{index}"),
                image: Some(sidecar.image.clone()),
                image_pull_policy: Some(inputs.pull_policy.to_owned()),
                command: Some(vec![
                    "/bin/sh".to_owned(),
                    "-c".to_owned(),
                    SIDECAR_COPY_SCRIPT.to_owned(),
                ]),
                security_context: Some(root_security_context()),
                volume_mounts: Some(vec![VolumeMount {
                    name: name.clone(),
                    mount_path: "/target".to_owned(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name,
                mount_path: sidecar.mount_path.clone(),
                read_only: Some(!sidecar.read_write),
                ..Default::default()
            });
        }
    }
    let env = env_vars(inputs.env);
    if let Some(setup) = inputs.setup_command {
        init_containers.push(Container {
            name: SETUP_CONTAINER.to_owned(),
            image: Some(inputs.image.to_owned()),
            image_pull_policy: Some(inputs.pull_policy.to_owned()),
            command: Some(vec!["/bin/sh".into(), "-c".into(), setup.to_owned()]),
            working_dir: Some(WORKSPACE_PATH.to_owned()),
            env: Some(env.clone()),
            volume_mounts: Some(mounts.clone()),
            ..Default::default()
        });
    }
    let lifecycle = inputs.teardown_command.map(|teardown| Lifecycle {
        pre_stop: Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec!["/bin/sh".into(), "-c".into(), teardown.to_owned()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    });

    let mut spec = template.cloned().unwrap_or_default();
    spec.restart_policy = Some("Never".to_owned());
    init_containers.extend(spec.init_containers.take().unwrap_or_default());
    spec.init_containers = Some(init_containers);
    let mut all_volumes = spec.volumes.take().unwrap_or_default();
    all_volumes.extend(volumes);
    spec.volumes = Some(all_volumes);

    let command = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        TASK_WRAPPER_SCRIPT.to_owned(),
        WRAPPER_NAME.to_owned(),
    ];
    match spec
        .containers
        .iter_mut()
        .find(|container| container.name == TASK_CONTAINER)
    {
        Some(task) => {
            task.image = Some(inputs.image.to_owned());
            task.command = Some(command);
            task.args = Some(inputs.base_args.to_vec());
            task.working_dir = Some(WORKSPACE_PATH.to_owned());
            if task.image_pull_policy.as_deref().is_none_or(str::is_empty) {
                task.image_pull_policy = Some(inputs.pull_policy.to_owned());
            }
            task.volume_mounts
                .get_or_insert_with(Vec::new)
                .extend(mounts);
            let merged = task.env.get_or_insert_with(Vec::new);
            for var in env {
                match merged.iter_mut().find(|existing| existing.name == var.name) {
                    Some(existing) => *existing = var,
                    None => merged.push(var),
                }
            }
            if lifecycle.is_some() {
                task.lifecycle = lifecycle;
            }
            apply_shape(&mut task.resources, inputs.instance_shape);
        }
        None => {
            let mut task = Container {
                name: TASK_CONTAINER.to_owned(),
                image: Some(inputs.image.to_owned()),
                image_pull_policy: Some(inputs.pull_policy.to_owned()),
                command: Some(command),
                args: Some(inputs.base_args.to_vec()),
                working_dir: Some(WORKSPACE_PATH.to_owned()),
                env: Some(env),
                volume_mounts: Some(mounts),
                lifecycle,
                ..Default::default()
            };
            apply_shape(&mut task.resources, inputs.instance_shape);
            spec.containers.push(task);
        }
    }
    spec
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EnvVarSource, SecretKeySelector};

    use super::*;
    use crate::backend::secret_env;

    fn sidecar(image: &str, mount_path: &str, read_write: bool) -> SidecarMount {
        SidecarMount {
            image: image.into(),
            mount_path: mount_path.into(),
            read_write,
        }
    }

    fn inputs<'a>(
        env: &'a TaskEnv,
        sidecars: &'a [SidecarMount],
        args: &'a [String],
    ) -> PodInputs<'a> {
        PodInputs {
            image: "img:1",
            pull_policy: "IfNotPresent",
            base_args: args,
            env,
            sidecars,
            use_image_volumes: false,
            setup_command: Some("echo A=1 > $OZ_ENVIRONMENT_FILE"),
            teardown_command: None,
            workspace_size_limit: Some("8Gi"),
            instance_shape: None,
        }
    }

    fn names(env: &TaskEnv) -> Vec<&str> {
        env.iter().map(|(name, _)| name.as_str()).collect()
    }

    #[test]
    fn task_env_orders_and_dedupes() {
        let common = secret_env([("TASK_ID", "t"), ("OZ_RUN_ID", "spoof"), ("", "x")]);
        let operator = secret_env([("Z", "1"), ("A", "2"), ("TASK_ID", "op")]);
        let env = task_env(&common, &operator, "run-1");
        assert_eq!(
            names(&env),
            [
                "TASK_ID",
                "OZ_RUN_ID",
                "A",
                "Z",
                "OZ_ENVIRONMENT_FILE",
                "OZ_WORKSPACE_ROOT",
                "OZ_WORKER_BACKEND"
            ]
        );
        let value = |name: &str| {
            env.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.expose_secret().to_owned())
        };
        assert_eq!(value("TASK_ID").as_deref(), Some("op"));
        assert_eq!(value("OZ_RUN_ID").as_deref(), Some("run-1"));
        assert_eq!(value("OZ_WORKER_BACKEND").as_deref(), Some("kubernetes"));
        assert!(value("OZ_EXECUTION_ID").is_none());
    }

    #[test]
    fn overrides_replace_agent_and_harness_sidecars() {
        let sidecars = vec![sidecar("server-agent:1", "/agent", false)];
        let clis = BTreeMap::from([("claude".to_owned(), "claude-cli:2".to_owned())]);
        let out =
            apply_sidecar_overrides(sidecars.clone(), Some("mine:1"), Some(" claude "), &clis);
        assert_eq!(
            out,
            [
                sidecar("mine:1", "/agent", false),
                sidecar("claude-cli:2", "/mnt/claude-cli-sidecar", false)
            ]
        );
        let with_cli = vec![sidecar("old:1", "/mnt/claude-cli-sidecar", true)];
        let out = apply_sidecar_overrides(with_cli, None, Some("claude"), &clis);
        assert_eq!(
            out,
            [sidecar("claude-cli:2", "/mnt/claude-cli-sidecar", true)]
        );
        assert_eq!(
            apply_sidecar_overrides(vec![], Some("x:1"), Some("codex"), &clis),
            []
        );
    }

    #[test]
    fn sidecar_validation() {
        assert!(validate_sidecars(&[sidecar("a:1", "/agent", true)], false).is_ok());
        let error = validate_sidecars(&[sidecar("a:1", "/agent", true)], true).unwrap_err();
        assert!(error.contains("read-only"), "{error}");
        assert!(validate_sidecars(&[sidecar("a:1", "/workspace", false)], false).is_err());
        assert!(validate_sidecars(&[sidecar("", "/a", false)], false).is_err());
        assert!(validate_sidecars(&[sidecar("a:1", "", false)], false).is_err());
        let dupes = [sidecar("a:1", "/a", false), sidecar("b:1", "/a", false)];
        assert!(
            validate_sidecars(&dupes, false)
                .unwrap_err()
                .contains("duplicate")
        );
    }

    #[test]
    fn default_mode_copies_sidecars_as_root_and_mounts_them() {
        let env = secret_env([("TASK_ID", "t")]);
        let sidecars = [
            sidecar("agent:1", "/agent", false),
            sidecar("cli:1", "/mnt/x", true),
        ];
        let args = vec!["agent".to_owned(), "run".to_owned()];
        let spec = build_pod_spec(None, &inputs(&env, &sidecars, &args));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let init: Vec<_> = spec
            .init_containers
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(init, ["copy-sidecar-0", "copy-sidecar-1", "setup"]);
        let copy = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(copy.security_context.as_ref().unwrap().run_as_user, Some(0));
        assert_eq!(copy.command.as_ref().unwrap()[2], SIDECAR_COPY_SCRIPT);
        let volumes = spec.volumes.as_ref().unwrap();
        assert_eq!(volumes[0].name, "workspace");
        assert_eq!(
            volumes[0].empty_dir.as_ref().unwrap().size_limit,
            Some(Quantity("8Gi".into()))
        );
        assert_eq!(volumes[1].name, "sidecar-0-data");
        let task = &spec.containers[0];
        assert_eq!(task.name, "task");
        assert_eq!(
            task.command.as_ref().unwrap(),
            &["/bin/sh", "-c", TASK_WRAPPER_SCRIPT, "oz-task"]
        );
        assert_eq!(task.args.as_ref().unwrap(), &args);
        let mounts = task.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts[1].read_only, Some(true));
        assert_eq!(mounts[2].read_only, Some(false));
        assert!(TASK_WRAPPER_SCRIPT.contains("set -a"));
        assert!(TASK_WRAPPER_SCRIPT.contains("exec /agent/entrypoint.sh \"$@\""));
        assert!(!TASK_WRAPPER_SCRIPT.contains("report-shutdown"));
    }

    /// Image volumes need Kubernetes ≥ 1.31 (beta, feature gate ImageVolume); v1.20 in
    /// the test cluster cannot run them, so the object is checked here.
    #[test]
    fn image_volume_mode_mounts_images_read_only_without_copy_containers() {
        let env = secret_env([("TASK_ID", "t")]);
        let sidecars = [sidecar("agent:1", "/agent", false)];
        let mut inputs = inputs(&env, &sidecars, &[]);
        inputs.use_image_volumes = true;
        inputs.pull_policy = "Always";
        let spec = build_pod_spec(None, &inputs);
        let init: Vec<_> = spec
            .init_containers
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(init, ["setup"]);
        let volumes = spec.volumes.as_ref().unwrap();
        assert_eq!(volumes.len(), 2);
        let image = volumes[1].image.as_ref().unwrap();
        assert_eq!(volumes[1].name, "sidecar-0-image");
        assert_eq!(image.reference.as_deref(), Some("agent:1"));
        assert_eq!(image.pull_policy.as_deref(), Some("Always"));
        for container in [
            &spec.containers[0],
            &spec.init_containers.as_ref().unwrap()[0],
        ] {
            let mount = &container.volume_mounts.as_ref().unwrap()[1];
            assert_eq!(
                (mount.mount_path.as_str(), mount.read_only),
                ("/agent", Some(true))
            );
        }
    }

    /// Native sidecars (init containers with `restartPolicy: Always`) need Kubernetes ≥
    /// 1.28 (1.29 by default); the worker's init containers come first so they start after
    /// setup.
    #[test]
    fn template_is_merged_with_worker_parts_first() {
        let template: PodSpec = serde_json::from_value(serde_json::json!({
            "serviceAccountName": "runner",
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "agents"},
            "initContainers": [{"name": "proxy", "image": "proxy:1", "restartPolicy": "Always"}],
            "volumes": [{"name": "cache", "emptyDir": {}}],
            "containers": [{
                "name": "task",
                "imagePullPolicy": "Always",
                "securityContext": {"runAsNonRoot": true},
                "env": [
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                    {"name": "TASK_ID", "value": "template"}
                ],
                "resources": {"requests": {"cpu": "250m", "ephemeral-storage": "1Gi"}},
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]
            }, {"name": "logger", "image": "logger:1"}]
        }))
        .unwrap();
        let env = secret_env([("TASK_ID", "t")]);
        let mut inputs = inputs(&env, &[], &[]);
        inputs.teardown_command = Some("echo bye");
        inputs.instance_shape = Some(InstanceShape {
            vcpus: 2,
            memory_gb: 4,
        });
        let spec = build_pod_spec(Some(&template), &inputs);
        assert_eq!(spec.service_account_name.as_deref(), Some("runner"));
        assert_eq!(spec.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "agents");
        let init: Vec<_> = spec
            .init_containers
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(init, ["setup", "proxy"]);
        let volumes: Vec<_> = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, ["cache", "workspace"]);
        assert_eq!(spec.containers.len(), 2);
        let task = &spec.containers[0];
        assert_eq!(task.image.as_deref(), Some("img:1"));
        assert_eq!(task.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(
            task.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let env = task.env.as_ref().unwrap();
        assert_eq!(env[0].name, "TOKEN");
        assert_eq!(
            env[0].value_from,
            Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "s".into(),
                    key: "k".into(),
                    optional: None
                }),
                ..Default::default()
            })
        );
        assert_eq!(env[1].value.as_deref(), Some("t"), "worker value wins");
        let mounts: Vec<_> = task
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/cache", "/workspace"]);
        let resources = task.resources.as_ref().unwrap();
        let requests = resources.requests.as_ref().unwrap();
        assert_eq!(requests["cpu"], Quantity("2".into()));
        assert_eq!(requests["memory"], Quantity("4Gi".into()));
        assert_eq!(requests["ephemeral-storage"], Quantity("1Gi".into()));
        assert_eq!(
            resources.limits.as_ref().unwrap()["memory"],
            Quantity("4Gi".into())
        );
        let pre_stop = task.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        assert_eq!(
            pre_stop.exec.as_ref().unwrap().command.as_ref().unwrap(),
            &["/bin/sh", "-c", "echo bye"]
        );
    }

    #[test]
    fn shape_sets_requests_equal_to_limits_per_positive_axis() {
        assert!(shape_resources(None).is_empty());
        let cpu_only = shape_resources(Some(InstanceShape {
            vcpus: 1,
            memory_gb: 0,
        }));
        assert_eq!(
            cpu_only,
            BTreeMap::from([("cpu".to_owned(), Quantity("1".into()))])
        );
        let env = secret_env([("A", "1")]);
        let mut inputs = inputs(&env, &[], &[]);
        inputs.instance_shape = Some(InstanceShape {
            vcpus: 1,
            memory_gb: 2,
        });
        let spec = build_pod_spec(None, &inputs);
        let resources = spec.containers[0].resources.as_ref().unwrap();
        assert_eq!(resources.requests, resources.limits);
    }
}
