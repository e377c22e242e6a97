//! End to end on the Kubernetes backend: control plane → gateway → `ozfleet agent
//! --backend kubernetes` → Job on a real Kubernetes v1.20 cluster
//! (`tests/kubernetes/start-k8s.sh` starts it on 127.0.0.1 and leaves its kubeconfigs in
//! `OZFLEET_K8S_DIR`, default /tmp/ozfleet-k8s).
//!
//! The agent runs from a config file (`backend.kubernetes`) with `agent-kubeconfig`, the
//! ServiceAccount bound to the namespace-scoped Role of `deploy/kubernetes/rbac.yaml`; the
//! admin kubeconfig is only used by the test (through `kubectl`) to look at the cluster.
//! The pods use the host network: the demo agent (the sidecar's `/agent/entrypoint.sh`)
//! fetches its run from the control plane on loopback.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Proc, Stack};
use ozfleet_agent::backend::kubernetes::job_spec::{LABEL_TASK_HASH, short_hash};
use serde_json::Value;

const TASK_IMAGE: &str = "localhost:5999/busybox:1";
/// What the control plane names as the sidecar; the agent's `sidecar_image` replaces it
/// with the Kubernetes variant (GNU tar for the copy init container).
const DEMO_SIDECAR_IMAGE: &str = "localhost:5999/oz-demo-sidecar:1";
const K8S_SIDECAR_IMAGE: &str = "localhost:5999/oz-k8s-sidecar:1";
/// Job creation, scheduling, init containers and the demo agent on a 2-core machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// Pods deleted while starting can stay Terminating for up to ~75 s on the 1.20 kubelet.
const GONE_TIMEOUT: Duration = Duration::from_secs(150);
const START_HINT: &str = "start the cluster with `tests/docker/start-docker.sh && tests/kubernetes/start-k8s.sh` (as root)";

/// Where start-k8s.sh left the kubeconfigs. Fails loudly (never skips) without a cluster.
fn cluster_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("OZFLEET_K8S_DIR").unwrap_or_else(|_| "/tmp/ozfleet-k8s".to_owned()),
    );
    for file in ["kubeconfig", "agent-kubeconfig", "namespace"] {
        assert!(
            dir.join(file).exists(),
            "{} is missing: the test cluster is not running; {START_HINT}",
            dir.join(file).display()
        );
    }
    dir
}

fn namespace() -> String {
    std::fs::read_to_string(cluster_dir().join("namespace"))
        .expect("the namespace file")
        .trim()
        .to_owned()
}

/// `kubectl` as cluster admin in the test namespace; returns stdout.
fn kubectl(args: &[&str]) -> String {
    let output = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cluster_dir().join("kubeconfig"))
        .args(["--namespace", &namespace()])
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run kubectl ({START_HINT}): {error}"));
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The objects of `kind` (`jobs`, `pods`) that belong to run `run_id`, by its label hash.
fn objects_of(kind: &str, run_id: &str) -> Vec<Value> {
    let selector = format!("{LABEL_TASK_HASH}={}", short_hash(run_id));
    let list: Value = serde_json::from_str(&kubectl(&["get", kind, "-l", &selector, "-o", "json"]))
        .expect("kubectl prints JSON");
    list["items"].as_array().cloned().unwrap_or_default()
}

fn jobs_of(run_id: &str) -> Vec<Value> {
    objects_of("jobs", run_id)
}

fn pods_of(run_id: &str) -> Vec<Value> {
    objects_of("pods", run_id)
}

fn delete_jobs_of(run_id: &str) {
    let selector = format!("{LABEL_TASK_HASH}={}", short_hash(run_id));
    kubectl(&["delete", "jobs", "-l", &selector, "--wait=false"]);
}

/// A control plane that names the demo images, with reports logged at debug level (a
/// repeated terminal report shows up as "ignoring a repeated report").
fn kubernetes_stack() -> Stack {
    cluster_dir();
    Stack::start_with(&[
        "--docker-image",
        TASK_IMAGE,
        "--sidecar-image",
        DEMO_SIDECAR_IMAGE,
        "--log-level",
        "debug",
    ])
}

/// The agent's config file: `backend.kubernetes` as an operator would write it.
fn write_config(stack: &Stack, name: &str) -> PathBuf {
    let path = stack.dir.path().join(format!("{name}.yaml"));
    let kubeconfig = cluster_dir().join("agent-kubeconfig");
    let yaml = format!(
        "backend:
  kubernetes:
    kubeconfig: {kubeconfig}
    namespace: {namespace}
    default_image: {TASK_IMAGE}
    image_pull_policy: IfNotPresent
    preflight_image: {TASK_IMAGE}
    sidecar_image: {K8S_SIDECAR_IMAGE}
    # The test kubelet runs on Docker with --bridge=none: pods need the host network.
    pod_template:
      hostNetwork: true
",
        kubeconfig = kubeconfig.display(),
        namespace = namespace(),
    );
    std::fs::write(&path, yaml).expect("write the agent config");
    path
}

/// Starts `ozfleet agent --backend kubernetes --config-file …` named `name` (the same
/// name again reuses the state dir, so the node id) and waits until it attached, which
/// happens after its startup preflight Job passed.
fn kubernetes_agent(stack: &Stack, name: &str, extra: &[&str]) -> Proc {
    let config = write_config(stack, name);
    let mut args = vec![
        "--backend",
        "kubernetes",
        "--config-file",
        config.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    stack.node_agent(name, &args)
}

/// The lines of the control plane's log about terminal reports for `run_id`: the one
/// that settled it and any repeated one it ignored.
fn terminal_reports(stack: &Stack, run_id: &str) -> Vec<String> {
    stack
        .control_plane
        .log()
        .lines()
        .filter(|line| {
            line.contains(run_id)
                && (line.contains("reported by worker") || line.contains("repeated report"))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn job_runs_succeed_fail_with_their_exit_code_and_are_cancelled() {
    let stack = kubernetes_stack();
    let agent = kubernetes_agent(&stack, "k8s-a", &[]);
    assert!(
        agent.log().contains("kubernetes startup preflight passed"),
        "{}",
        agent.log()
    );

    let hello = stack.api.create("Say hello from a Job");
    stack.api.wait_for_state(&hello, "SUCCEEDED", RUN_TIMEOUT);

    let failing = stack.api.create("Exit 3 to show a failure");
    let item = stack.api.wait_for_state(&failing, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "container_exit", "{item}");
    assert_eq!(item["exit_code"], 3, "{item}");
    let message = item["status_message"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("exited with code 3"), "{item}");
    // A failed Job is kept for its TTL; its output (the demo agent's lines) is logged.
    assert_eq!(jobs_of(&failing).len(), 1, "the failed Job is kept");
    agent.wait_for_log("oz-demo-agent", Duration::from_secs(10));

    let long = stack.api.create("Sleep 300 seconds");
    stack.api.wait_for_state(&long, "INPROGRESS", RUN_TIMEOUT);
    // INPROGRESS: the demo agent in the task container reported in; the kubelet's pod
    // status follows.
    common::wait_until(RUN_TIMEOUT, "the pod to be Running", || {
        let pods = pods_of(&long);
        pods.len() == 1 && pods[0]["status"]["phase"] == "Running"
    });
    let (status, body) = stack.api.cancel(&long);
    assert_eq!(status, 200, "{body}");
    stack
        .api
        .wait_for_state(&long, "CANCELLED", Duration::from_secs(60));
    // Cancellation deletes the Job (foreground): the pod really stops and goes away.
    common::wait_until(
        GONE_TIMEOUT,
        "the cancelled run's Job and pod to go",
        || jobs_of(&long).is_empty() && pods_of(&long).is_empty(),
    );
    // The successful Job was deleted too (cleanup on).
    common::wait_until(GONE_TIMEOUT, "the successful Job to be deleted", || {
        jobs_of(&hello).is_empty()
    });

    for run in [&hello, &failing, &long] {
        assert_eq!(terminal_reports(&stack, run).len(), 1, "run {run}");
    }
    assert!(
        !agent.log().contains("WARP_API_KEY="),
        "a task credential reached the log"
    );
    delete_jobs_of(&failing);
}

#[test]
fn a_killed_agent_re_adopts_its_job_and_reports_once() {
    let stack = kubernetes_stack();
    // --no-cleanup keeps the Job and its pod, so the test can count the pod executions.
    let mut agent = kubernetes_agent(&stack, "k8s-b", &["--no-cleanup"]);

    let run = stack.api.create("Sleep 20 seconds, then finish");
    stack.api.wait_for_state(&run, "INPROGRESS", RUN_TIMEOUT);
    agent.kill();
    // The Job outlives the agent (kill -9: nothing could stop it)…
    let jobs = jobs_of(&run);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(
        jobs[0]["status"]["succeeded"].is_null(),
        "the Job was still running when the agent died: {}",
        jobs[0]["status"]
    );

    // …and the restarted agent (same state dir, so the same node id) re-adopts it and
    // reports how it ended.
    let agent = kubernetes_agent(&stack, "k8s-b", &["--no-cleanup"]);
    agent.wait_for_log("re-adopted task Job", Duration::from_secs(30));
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);

    // The agent records the gateway's acknowledgement: after that it sends nothing more
    // about this run.
    let reported = stack
        .dir
        .path()
        .join("k8s-b-state")
        .join("reported-executions");
    common::wait_until(
        Duration::from_secs(30),
        "the agent to record the acknowledged outcome",
        || {
            std::fs::read_to_string(&reported).is_ok_and(|log| {
                log.lines()
                    .any(|line| line.starts_with(&format!("{run}\t")))
            })
        },
    );
    let reports = terminal_reports(&stack, &run);
    assert_eq!(
        reports.len(),
        1,
        "exactly one terminal report: {reports:#?}"
    );
    assert!(reports[0].contains("-> SUCCEEDED"), "{reports:?}");

    // Exactly one pod execution: one Job, succeeded once, one pod, never restarted.
    let jobs = jobs_of(&run);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["status"]["succeeded"], 1, "{}", jobs[0]["status"]);
    assert!(
        jobs[0]["status"]["failed"].is_null(),
        "{}",
        jobs[0]["status"]
    );
    let pods = pods_of(&run);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let restarts: Vec<&Value> = pods[0]["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|status| &status["restartCount"])
        .collect();
    assert!(
        !restarts.is_empty() && restarts.iter().all(|count| **count == 0),
        "{}",
        pods[0]["status"]
    );
    delete_jobs_of(&run);
    stack.assert_no_secrets_in_logs();
}

#[test]
fn dev_runs_the_demos_as_jobs() {
    cluster_dir();
    common::assert_dev_demos_pass("kubernetes", "Kubernetes backend");
}
