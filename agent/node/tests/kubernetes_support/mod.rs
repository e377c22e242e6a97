//! Shared pieces of the Kubernetes backend tests and benchmark: the cluster started by
//! `tests/kubernetes/start-k8s.sh`, clients, task and config builders.
//!
//! The backend always runs with `agent-kubeconfig`, the ServiceAccount bound to the Role in
//! `deploy/kubernetes/rbac.yaml`; the admin kubeconfig is only used to look at the cluster.

#![allow(dead_code)] // each target uses a different subset

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use ozfleet_agent::backend::kubernetes::job_spec::{LABEL_EXECUTION_HASH, short_hash};
use ozfleet_agent::backend::{
    KubernetesBackend, KubernetesConfig, KubernetesSettings, TaskRun, secret_env,
};
use ozfleet_proto::oz::SidecarMount;
use ozfleet_worker_config::{ImagePullPolicy, WorkerFlags};

pub const BUSYBOX: &str = "localhost:5999/busybox:1";
pub const SIDECAR: &str = "localhost:5999/oz-k8s-sidecar:1";
const START_HINT: &str = "start the cluster with `tests/docker/start-docker.sh && tests/kubernetes/start-k8s.sh` (as root)";

/// Where start-k8s.sh left the kubeconfigs (`OZFLEET_K8S_DIR`, default /tmp/ozfleet-k8s).
pub fn cluster_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("OZFLEET_K8S_DIR").unwrap_or_else(|_| "/tmp/ozfleet-k8s".to_owned()),
    );
    for file in [
        "kubeconfig",
        "agent-kubeconfig",
        "denied-kubeconfig",
        "namespace",
    ] {
        assert!(
            dir.join(file).exists(),
            "{} is missing: the test cluster is not running; {START_HINT}",
            dir.join(file).display()
        );
    }
    dir
}

pub fn namespace() -> String {
    std::fs::read_to_string(cluster_dir().join("namespace"))
        .unwrap()
        .trim()
        .to_owned()
}

/// A cluster-admin client, for looking at the cluster and setting up fixtures.
pub async fn admin() -> Client {
    let path = cluster_dir().join("kubeconfig");
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    Client::try_from(config).unwrap()
}

/// Settings as the config file would give them (defaults through the real merge), with the
/// agent's RBAC-limited kubeconfig, local images and the test namespace.
pub fn settings() -> KubernetesSettings {
    let merged = ozfleet_worker_config::merge(
        WorkerFlags {
            backend: Some("kubernetes".into()),
            ..Default::default()
        },
        None,
        &|_| None,
    )
    .unwrap();
    let mut settings = merged.kubernetes.unwrap();
    settings.kubeconfig = Some(cluster_dir().join("agent-kubeconfig"));
    settings.namespace = namespace();
    settings.preflight_image = BUSYBOX.to_owned();
    settings.image_pull_policy = ImagePullPolicy::IfNotPresent;
    // The test kubelet runs on Docker with `--bridge=none`: a pod without the host network
    // gets no IP, and the 1.20 kubelet then replaces its sandbox after the first container
    // exits (init containers never hand over to the task container).
    settings.pod_template = Some(serde_json::json!({"hostNetwork": true}));
    settings
}

pub fn config(node_id: &str, settings: KubernetesSettings) -> KubernetesConfig {
    KubernetesConfig {
        node_id: node_id.to_owned(),
        worker_id: "ozfleet-tests".to_owned(),
        settings,
        environment: secret_env([("OPERATOR_VAR", "op")]),
        cleanup: true,
        cancel_grace: Duration::from_secs(5),
    }
}

pub async fn backend(node_id: &str, settings: KubernetesSettings) -> KubernetesBackend {
    KubernetesBackend::new(config(node_id, settings))
        .await
        .unwrap_or_else(|error| panic!("backend start: {error:#}; {START_HINT}"))
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

/// A task running the demo agent (from the sidecar at /agent) with `prompt`.
pub fn task(prompt: &str) -> TaskRun {
    let task_id = unique("run");
    TaskRun {
        execution_id: unique("exec"),
        base_args: vec![
            "agent".into(),
            "run".into(),
            "--task-id".into(),
            task_id.clone(),
            "--sandboxed".into(),
        ],
        env: secret_env([
            ("TASK_ID", task_id.as_str()),
            ("OZ_DEMO_PROMPT", prompt),
            ("WARP_API_KEY", "sk-test-secret"),
        ]),
        task_id,
        harness: None,
        image: BUSYBOX.to_owned(),
        sidecars: vec![SidecarMount {
            image: SIDECAR.to_owned(),
            mount_path: "/agent".to_owned(),
            read_write: false,
        }],
        instance_shape: None,
    }
}

pub fn execution_key(task: &TaskRun) -> &str {
    ozfleet_agent::backend::kubernetes::job_spec::execution_key(&task.task_id, &task.execution_id)
}

pub fn job_name(task: &TaskRun) -> String {
    ozfleet_agent::backend::kubernetes::job_name(&task.task_id, execution_key(task))
}

pub async fn pods_of(client: &Client, task: &TaskRun) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let selector = format!("{LABEL_EXECUTION_HASH}={}", short_hash(execution_key(task)));
    pods.list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
}

pub async fn job_of(client: &Client, task: &TaskRun) -> Option<Job> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace());
    jobs.get_opt(&job_name(task)).await.unwrap()
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .unwrap_or_default()
}
