//! The Kubernetes backend against a real Kubernetes v1.20 cluster (etcd, apiserver,
//! controller-manager, scheduler, kubelet on Docker) started by
//! `tests/kubernetes/start-k8s.sh`. The backend runs with the ServiceAccount bound to the
//! Role of `deploy/kubernetes/rbac.yaml`, never as cluster admin.

mod kubernetes_support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{LogParams, PostParams};
use ozfleet_agent::backend::{KubernetesBackend, TaskBackend as _};
use ozfleet_proto::oz::{FailureReason, InstanceShape};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use kubernetes_support::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// Pods deleted while starting can stay Terminating for up to ~75 s on the 1.20 kubelet.
const GONE_TIMEOUT: Duration = Duration::from_secs(150);

async fn run(
    backend: &KubernetesBackend,
    task: &ozfleet_agent::backend::TaskRun,
) -> Result<(), ozfleet_agent::backend::TaskFailure> {
    tokio::time::timeout(
        RUN_TIMEOUT,
        backend.execute(task.clone(), CancellationToken::new()),
    )
    .await
    .expect("the task ends")
}

#[tokio::test]
async fn success_runs_one_job_and_deletes_it() {
    let admin = admin().await;
    let backend = backend(&unique("node"), settings()).await;
    let task = task("sleep 1");
    run(&backend, &task).await.expect("success");
    wait_for("the successful Job to be deleted", GONE_TIMEOUT, || async {
        job_of(&admin, &task).await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn non_zero_exit_reports_the_exit_code_and_keeps_the_job() {
    let admin = admin().await;
    let backend = backend(&unique("node"), settings()).await;
    let task = task("exit 3");
    let failure = run(&backend, &task).await.expect_err("exit 3 fails");
    assert_eq!(failure.reason, FailureReason::ContainerExit, "{failure:?}");
    assert_eq!(failure.exit_code, 3);
    assert!(
        failure.error.starts_with("container task in pod oz-task-")
            && failure.error.contains(&format!(
                "(namespace {}, job {}) exited with code 3",
                namespace(),
                job_name(&task)
            )),
        "{}",
        failure.error
    );
    assert!(!failure.error.contains("sk-test-secret"));
    let job = job_of(&admin, &task).await.expect("a failed Job is kept");
    let spec = job.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    assert_eq!(spec.ttl_seconds_after_finished, Some(86_400));
}

#[tokio::test]
async fn an_unschedulable_pod_fails_after_the_timeout() {
    let mut settings = settings();
    settings.unschedulable_timeout = Duration::from_secs(3);
    settings.pod_template = Some(
        serde_json::json!({"hostNetwork": true, "nodeSelector": {"ozfleet.dev/no-such-pool": "x"}}),
    );
    let backend = backend(&unique("node"), settings).await;
    let task = task("sleep 1");
    let failure = run(&backend, &task).await.expect_err("unschedulable");
    assert_eq!(failure.reason, FailureReason::Unschedulable, "{failure:?}");
    assert!(
        failure
            .error
            .contains("is unschedulable. Pod reason: Unschedulable. Pod message: "),
        "{}",
        failure.error
    );
}

#[tokio::test]
async fn a_missing_image_is_an_image_pull_failure() {
    let backend = backend(&unique("node"), settings()).await;
    let mut task = task("sleep 1");
    // Nothing listens on localhost:5999: the pull can only fail, and only on loopback.
    task.image = "localhost:5999/ozfleet-missing:1".to_owned();
    let failure = run(&backend, &task).await.expect_err("no such image");
    assert_eq!(failure.reason, FailureReason::ImagePull, "{failure:?}");
    assert!(
        failure.error.contains("container task in pod"),
        "{}",
        failure.error
    );
}

#[tokio::test]
async fn active_deadline_ends_a_long_task() {
    let mut settings = settings();
    settings.active_deadline_seconds = Some(5);
    let backend = backend(&unique("node"), settings).await;
    let task = task("sleep 120");
    let failure = run(&backend, &task).await.expect_err("deadline");
    assert_eq!(failure.reason, FailureReason::ActiveDeadline, "{failure:?}");
}

#[tokio::test]
async fn pod_template_customises_the_task_container_with_a_secret_env() {
    let admin = admin().await;
    let namespace = namespace();
    let secret_name = unique("tok");
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &namespace);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": secret_name},
        "stringData": {"token": "from-the-secret-42"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let mut settings = settings();
    settings.extra_labels = BTreeMap::from([("team".to_owned(), "ozfleet".to_owned())]);
    settings.setup_command = Some("echo FROM_SETUP=set-up >> \"$OZ_ENVIRONMENT_FILE\"".to_owned());
    settings.pod_template = Some(serde_json::json!({
        "hostNetwork": true,
        "containers": [{
            "name": "task",
            "env": [
                {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "token"}}},
                {"name": "TEMPLATE_ONLY", "value": "kept"}
            ]
        }]
    }));
    // What --no-cleanup gives: no deletion, no TTL.
    settings.ttl_seconds_after_finished = None;
    let mut config = config(&unique("node"), settings);
    config.cleanup = false;
    let backend = KubernetesBackend::new(config).await.unwrap();
    // PID 1 of the task container is the demo agent (the wrapper execs it): its
    // environment is the container's, plus what setup wrote to the env file.
    let task = task("read /proc/1/environ");
    run(&backend, &task).await.expect("success");

    let job = job_of(&admin, &task).await.expect("kept without cleanup");
    assert_eq!(job.metadata.labels.as_ref().unwrap()["team"], "ozfleet");
    assert_eq!(job.spec.as_ref().unwrap().ttl_seconds_after_finished, None);
    let pods = pods_of(&admin, &task).await;
    assert_eq!(pods.len(), 1);
    let pod_name = pods[0].metadata.name.clone().unwrap();
    let pods_api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), &namespace);
    let params = LogParams {
        container: Some("task".into()),
        ..Default::default()
    };
    let log = pods_api.logs(&pod_name, &params).await.unwrap();
    for expected in [
        "FROM_SECRET=from-the-secret-42",
        "TEMPLATE_ONLY=kept",
        "FROM_SETUP=set-up",
        "OZ_WORKER_BACKEND=kubernetes",
        "OPERATOR_VAR=op",
    ] {
        assert!(
            log.contains(expected),
            "{expected} missing from the task output"
        );
    }
}

#[tokio::test]
async fn instance_shape_sets_requests_equal_to_limits() {
    let admin = admin().await;
    let mut config = config(&unique("node"), settings());
    config.cleanup = false;
    let backend = KubernetesBackend::new(config).await.unwrap();
    let mut task = task("sleep 1");
    task.instance_shape = Some(InstanceShape {
        vcpus: 1,
        memory_gb: 1,
    });
    run(&backend, &task).await.expect("success");
    let pods = pods_of(&admin, &task).await;
    let task_container = pods[0]
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|container| container.name == "task")
        .unwrap()
        .clone();
    let resources = task_container.resources.unwrap();
    let requests = resources.requests.unwrap();
    assert_eq!(requests["cpu"].0, "1");
    assert_eq!(requests["memory"].0, "1Gi");
    assert_eq!(Some(requests), resources.limits);
}

#[tokio::test]
async fn cancellation_deletes_the_job_and_its_pod() {
    let admin = admin().await;
    let backend = backend(&unique("node"), settings()).await;
    let task = task("sleep 300");
    let cancel = CancellationToken::new();
    let mut running = JoinSet::new();
    {
        let (task, cancel) = (task.clone(), cancel.clone());
        let backend = std::sync::Arc::new(backend);
        running.spawn(async move { backend.execute(task, cancel).await });
    }
    wait_for("the task pod to run", RUN_TIMEOUT, || async {
        pods_of(&admin, &task)
            .await
            .iter()
            .any(|pod| phase(pod) == "Running")
            .then_some(())
    })
    .await;
    cancel.cancel();
    let failure = running
        .join_next()
        .await
        .unwrap()
        .unwrap()
        .expect_err("cancelled");
    assert_eq!(failure.reason, FailureReason::TaskCancelled);
    wait_for(
        "the cancelled Job and its pod to be gone",
        GONE_TIMEOUT,
        || async {
            (job_of(&admin, &task).await.is_none() && pods_of(&admin, &task).await.is_empty())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_restarted_agent_re_adopts_its_running_job() {
    let admin = admin().await;
    let node = unique("node");
    let task = task("sleep 8");
    {
        let first = std::sync::Arc::new(backend(&node, settings()).await);
        let mut running = JoinSet::new();
        let (backend, run_task) = (first.clone(), task.clone());
        running.spawn(async move { backend.execute(run_task, CancellationToken::new()).await });
        wait_for("the task pod to run", RUN_TIMEOUT, || async {
            pods_of(&admin, &task)
                .await
                .iter()
                .any(|pod| phase(pod) == "Running")
                .then_some(())
        })
        .await;
        // The agent dies: its future is dropped mid-run, nothing is cleaned up.
        running.abort_all();
    }
    let second = backend(&node, settings()).await;
    let other_node = backend(&unique("node"), settings()).await;
    assert!(
        other_node
            .recover()
            .await
            .iter()
            .all(|found| found.task_id != task.task_id)
    );
    let recovered = second.recover().await;
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0].task_id, task.task_id);
    assert_eq!(recovered[0].execution_id, task.execution_id);
    assert_eq!(recovered[0].handle, job_name(&task));
    let pods_before = pods_of(&admin, &task).await.len();
    tokio::time::timeout(
        RUN_TIMEOUT,
        second.resume(recovered[0].clone(), CancellationToken::new()),
    )
    .await
    .unwrap()
    .expect("the re-adopted task succeeds");
    assert_eq!(pods_before, 1, "one pod execution");
    assert!(
        second.recover().await.is_empty(),
        "the finished Job was cleaned up"
    );
}

#[tokio::test]
async fn a_job_that_finished_while_the_agent_was_down_reports_its_outcome() {
    let admin = admin().await;
    let node = unique("node");
    let task = task("exit 4");
    {
        let first = std::sync::Arc::new(backend(&node, settings()).await);
        let mut running = JoinSet::new();
        let (backend, run_task) = (first.clone(), task.clone());
        running.spawn(async move { backend.execute(run_task, CancellationToken::new()).await });
        wait_for("the Job to exist", RUN_TIMEOUT, || async {
            job_of(&admin, &task).await.map(|_| ())
        })
        .await;
        running.abort_all();
    }
    wait_for("the Job to fail", RUN_TIMEOUT, || async {
        let job = job_of(&admin, &task).await?;
        (job.status?.failed.unwrap_or(0) > 0).then_some(())
    })
    .await;
    let second = backend(&node, settings()).await;
    let recovered = second.recover().await;
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    let failure = second
        .resume(recovered[0].clone(), CancellationToken::new())
        .await
        .expect_err("it failed while the agent was down");
    assert_eq!(
        (failure.reason, failure.exit_code),
        (FailureReason::ContainerExit, 4)
    );
}

#[tokio::test]
async fn a_duplicate_create_adopts_the_existing_job() {
    let admin = admin().await;
    let backend = std::sync::Arc::new(backend(&unique("node"), settings()).await);
    let task = task("sleep 3");
    let mut runs = JoinSet::new();
    {
        let (backend, task) = (backend.clone(), task.clone());
        runs.spawn(async move { backend.execute(task, CancellationToken::new()).await });
    }
    wait_for("the Job to exist", RUN_TIMEOUT, || async {
        job_of(&admin, &task).await.map(|_| ())
    })
    .await;
    let pods = pods_of(&admin, &task).await.len();
    run(&backend, &task)
        .await
        .expect("the duplicate follows the same Job");
    runs.join_next()
        .await
        .unwrap()
        .unwrap()
        .expect("the first run succeeds");
    assert!(pods <= 1);
}

#[tokio::test]
async fn preflight_without_rbac_is_a_startup_error() {
    let mut settings = settings();
    settings.kubeconfig = Some(cluster_dir().join("denied-kubeconfig"));
    let error = KubernetesBackend::new(config(&unique("node"), settings))
        .await
        .err()
        .expect("no rights, no start");
    let text = format!("{error:#}");
    assert!(
        text.starts_with("kubernetes startup preflight failed: the kubernetes backend requires creating task Jobs with a root init container"),
        "{text}"
    );
    assert!(text.contains("forbidden"), "{text}");
}
