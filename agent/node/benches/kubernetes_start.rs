//! Time to a running task pod: the Kubernetes backend against `kubectl create` of the same
//! Job on the same cluster.
//!
//! Run: `tests/docker/start-docker.sh && tests/kubernetes/start-k8s.sh && cargo bench -p
//! ozfleet-agent --bench kubernetes_start` (the v1.20 test cluster is needed; the benchmark
//! fails when it is not there).
//!
//! Ours: from calling `KubernetesBackend::execute()` (the moment a node receives an
//! assignment) until the task pod's phase is `Running` (its init containers, which copy the
//! sidecar, have run and the task container started): Job create, the controller's pod,
//! scheduling, kubelet. CLI: from spawning `kubectl create -f job.json` until that Job's
//! pod is `Running`. The Job is the same: the one the backend created in the warm-up run
//! (read back from the API server, server-set fields removed), under a new name and
//! execution hash. Both sides use the agent's RBAC-limited kubeconfig.
//!
//! "Running" is seen through a pod watch opened (on the run's execution-hash label) before
//! the clock starts, the same for both sides. Each side runs one warm-up, then N timed runs,
//! alternating, so drift hits both alike; after each run the Job is deleted (foreground,
//! grace 1 s: ours by cancelling the task, which is what the backend does) and the next
//! run starts once its pod is gone. Prints median and p90 of both and the ratio ours/CLI
//! (target ≤ 1.0).
//!
//! Environment: `OZFLEET_BENCH_ITERATIONS` (default 10), `OZFLEET_BENCH_KUBECTL` (the CLI,
//! default `kubectl` on PATH), `OZFLEET_K8S_DIR` (the cluster's kubeconfigs, default
//! /tmp/ozfleet-k8s).

#[path = "../tests/kubernetes_support/mod.rs"]
mod kubernetes_support;

mod comparison;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, TryStreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use kubernetes_support::{
    admin, cluster_dir, config, execution_key, job_of, namespace, phase, settings, task, unique,
    wait_for,
};
use ozfleet_agent::backend::kubernetes::job_spec::{LABEL_EXECUTION_HASH, short_hash};
use ozfleet_agent::backend::{KubernetesBackend, TaskBackend as _};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The demo agent sleeps, so the pod is still running when it is measured.
const PROMPT: &str = "sleep 60";
const TIMEOUT: Duration = Duration::from_secs(120);
/// Where a Job manifest has labels: the Job's and its pods'.
const LABEL_PATHS: [&str; 2] = ["/metadata/labels", "/spec/template/metadata/labels"];

#[tokio::main]
async fn main() {
    let iterations = comparison::iterations();
    let kubectl = std::env::var("OZFLEET_BENCH_KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    let kubeconfig = cluster_dir().join("agent-kubeconfig");
    let kubectl_version = tokio::process::Command::new(&kubectl)
        .args(["version", "--client", "-o", "json"])
        .output()
        .await
        .map(|output| {
            serde_json::from_slice::<Value>(&output.stdout)
                .ok()
                .and_then(|version| {
                    version["clientVersion"]["gitVersion"]
                        .as_str()
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "unknown".to_owned())
        })
        .unwrap_or_else(|error| panic!("cannot run {kubectl}: {error}"));

    let admin = admin().await;
    let mut config = config(&unique("bench-node"), settings());
    config.cancel_grace = Duration::from_secs(1);
    let backend = Arc::new(
        KubernetesBackend::new(config)
            .await
            .expect("start the Kubernetes backend (preflight)"),
    );

    // Warm-up: ours (images and the sidecar copy are local already), which also gives the
    // Job the CLI creates; then the CLI once (its discovery cache).
    let job = ours(&backend, &admin, true)
        .await
        .1
        .expect("the warm-up Job");
    let template = cli_template(job);
    let dir = tempfile::tempdir().expect("temp dir");
    cli_run(&kubectl, &kubeconfig, &template, &admin, dir.path()).await;

    let mut ours_times = Vec::with_capacity(iterations);
    let mut cli_times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        ours_times.push(ours(&backend, &admin, false).await.0);
        cli_times.push(cli_run(&kubectl, &kubeconfig, &template, &admin, dir.path()).await);
    }

    let server = admin
        .apiserver_version()
        .await
        .map(|info| info.git_version)
        .unwrap_or_else(|_| "unknown".to_owned());
    println!(
        "kubernetes_start: execute() → task pod Running vs `{kubectl} create -f` (client {kubectl_version}, server {server}), {iterations} runs each after 1 warm-up"
    );
    comparison::report(&ours_times, &cli_times);
}

type PodWatch = Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<Pod>>> + Send>>;

/// A watch on the pods carrying `execution_hash`, opened before anything creates them.
async fn pod_watch(client: &Client, execution_hash: &str) -> PodWatch {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let params = WatchParams::default()
        .labels(&format!("{LABEL_EXECUTION_HASH}={execution_hash}"))
        .timeout(290);
    Box::pin(pods.watch(&params, "0").await.expect("watch pods"))
}

/// Reads the watch until the pod is Running.
async fn until_running(mut watch: PodWatch, what: &str) {
    let running = async {
        while let Some(event) = watch.try_next().await.expect("pod watch") {
            if let WatchEvent::Added(pod) | WatchEvent::Modified(pod) = event
                && phase(&pod) == "Running"
            {
                return;
            }
        }
        panic!("the pod watch of {what} ended before the pod ran");
    };
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap_or_else(|_| panic!("the pod of {what} did not run within {TIMEOUT:?}"));
}

/// Waits until no pod carries `execution_hash` (the Job's deletion is done).
async fn until_gone(client: &Client, execution_hash: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let selector = format!("{LABEL_EXECUTION_HASH}={execution_hash}");
    wait_for("the pod to go", TIMEOUT, || async {
        let list = pods
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
}

/// One `execute()` until its pod runs; then cancels it (which deletes the Job). With
/// `keep_job`, returns the Job as the backend created it.
async fn ours(
    backend: &Arc<KubernetesBackend>,
    admin: &Client,
    keep_job: bool,
) -> (Duration, Option<Job>) {
    let tasks = TaskTracker::new();
    let run = task(PROMPT);
    let hash = short_hash(execution_key(&run));
    let watch = pod_watch(admin, &hash).await;
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let execution = tasks.spawn({
        let backend = Arc::clone(backend);
        let cancel = cancel.clone();
        let run = run.clone();
        async move { backend.execute(run, cancel).await }
    });
    until_running(watch, "ours").await;
    let elapsed = started.elapsed();
    let job = if keep_job {
        job_of(admin, &run).await
    } else {
        None
    };
    cancel.cancel();
    let outcome = execution.await.expect("execute task");
    assert!(outcome.is_err(), "the task was cancelled, not finished");
    until_gone(admin, &hash).await;
    (elapsed, job)
}

/// The backend's Job as a manifest `kubectl create` accepts: the fields the server set
/// (uid, resource version, the controller's selector and labels, status) removed.
fn cli_template(job: Job) -> Value {
    let mut job = serde_json::to_value(job).expect("a Job is JSON");
    let metadata = job["metadata"].as_object_mut().expect("metadata");
    metadata.retain(|key, _| matches!(key.as_str(), "labels" | "annotations"));
    job.as_object_mut().expect("a Job").remove("status");
    let spec = job["spec"].as_object_mut().expect("spec");
    spec.remove("selector");
    for labels in LABEL_PATHS {
        let labels = job
            .pointer_mut(labels)
            .and_then(Value::as_object_mut)
            .expect("labels");
        labels.remove("controller-uid");
        labels.remove("job-name");
    }
    job["apiVersion"] = "batch/v1".into();
    job["kind"] = "Job".into();
    job
}

/// One `kubectl create -f` of the template under a new name and execution hash, until its
/// pod runs; then deletes the Job as the backend's cancellation does.
async fn cli_run(
    kubectl: &str,
    kubeconfig: &std::path::Path,
    template: &Value,
    admin: &Client,
    dir: &std::path::Path,
) -> Duration {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("oz-bench-cli-{}", &id[..16]);
    let hash = short_hash(&id);
    let mut job = template.clone();
    job["metadata"]["name"] = name.clone().into();
    for labels in LABEL_PATHS {
        job.pointer_mut(labels).expect("labels")[LABEL_EXECUTION_HASH] = hash.clone().into();
    }
    let manifest = dir.join(format!("{name}.json"));
    std::fs::write(&manifest, serde_json::to_vec(&job).expect("JSON")).expect("write the Job");

    let watch = pod_watch(admin, &hash).await;
    let mut command = tokio::process::Command::new(kubectl);
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--namespace", &namespace(), "create", "-f"])
        .arg(&manifest)
        .stdout(std::process::Stdio::null());
    let started = Instant::now();
    let status = command.status().await.expect("run kubectl create");
    assert!(status.success(), "kubectl create failed: {status}");
    until_running(watch, "kubectl create").await;
    let elapsed = started.elapsed();

    let jobs: Api<Job> = Api::namespaced(admin.clone(), &namespace());
    let params = DeleteParams {
        grace_period_seconds: Some(1),
        ..DeleteParams::foreground()
    };
    jobs.delete(&name, &params).await.expect("delete the Job");
    until_gone(admin, &hash).await;
    elapsed
}
