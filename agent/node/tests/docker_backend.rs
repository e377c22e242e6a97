//! Docker backend against a real Docker Engine (start it with `tests/docker/start-docker.sh`;
//! the tests fail, never skip, when it is not there).
//!
//! Tasks run the demo agent of `localhost:5999/oz-demo-sidecar:1` (mounted at `/agent`) in
//! `localhost:5999/busybox:1`, steered by `OZ_DEMO_PROMPT` (see
//! `tests/docker/oz-demo-sidecar/entrypoint.sh`). Every test uses its own node id and
//! removes that node's containers when it ends.

mod docker_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    ContainerArchiveInfoOptions, CreateContainerOptions, DownloadFromContainerOptions,
    RemoveContainerOptions, UploadToContainerOptions,
};
use docker_support::{BUSYBOX, Node, SIDECAR, SidecarCopy, event_time, events_since, logs, task};
use futures::TryStreamExt as _;
use ozfleet_agent::backend::docker::{
    LABEL_EXECUTION_ID, LABEL_MANAGED, LABEL_NODE_ID, LABEL_SIDECAR_IMAGE, LABEL_TASK_ID,
    container_name,
};
use ozfleet_agent::backend::{
    DockerBackend, RecoveredTask, TaskBackend as _, TaskFailure, secret_env,
};
use ozfleet_proto::oz::{FailureReason, InstanceShape, SidecarMount};
use ozfleet_worker_config::ImagePullPolicy;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

async fn backend(config: ozfleet_agent::backend::DockerConfig) -> DockerBackend {
    DockerBackend::new(config)
        .await
        .expect("connect the Docker backend")
}

fn failure(outcome: Result<(), TaskFailure>) -> TaskFailure {
    outcome.expect_err("the task should fail")
}

#[tokio::test]
async fn successful_task_leaves_no_container() {
    let node = Node::new().await;
    // The daemon's default network mode, unlike the other tests.
    let mut config = node.config();
    config.settings.network_mode = None;
    let docker = backend(config).await;
    docker
        .execute(task("hello"), CancellationToken::new())
        .await
        .expect("task succeeds");
    assert!(node.containers().await.is_empty(), "cleanup removed it");
}

#[tokio::test]
async fn non_zero_exit_is_container_exit_with_the_code() {
    let node = Node::new().await;
    let docker = backend(node.config()).await;
    let failed = failure(
        docker
            .execute(task("sleep 0 then exit 3"), CancellationToken::new())
            .await,
    );
    assert_eq!(
        failed,
        TaskFailure {
            reason: FailureReason::ContainerExit,
            exit_code: 3,
            error: "container exited with non-zero status: 3".into(),
        }
    );
    assert!(node.containers().await.is_empty());
}

#[tokio::test]
async fn memory_hog_is_container_oom() {
    let node = Node::new().await;
    let docker = backend(node.config()).await;
    let mut run = task("allocate 1500");
    run.instance_shape = Some(InstanceShape {
        vcpus: 0,
        memory_gb: 1,
    });
    let failed = failure(docker.execute(run, CancellationToken::new()).await);
    assert_eq!(failed.reason, FailureReason::ContainerOom, "{failed:?}");
    assert_eq!(failed.exit_code, 137);
    assert_eq!(failed.error, "container exited with non-zero status: 137");
}

#[tokio::test]
async fn pull_policies() {
    let node = Node::new().await;

    // Never: a missing image fails before any container exists.
    let mut config = node.config();
    config.settings.image_pull_policy = ImagePullPolicy::Never;
    let docker = backend(config).await;
    let mut run = task("hello");
    run.image = "localhost:5999/no-such-image:1".into();
    let failed = failure(docker.execute(run, CancellationToken::new()).await);
    assert_eq!(failed.reason, FailureReason::ImagePull);
    assert_eq!(
        failed.error,
        "image localhost:5999/no-such-image:1 is not present locally and image_pull_policy is Never"
    );
    assert!(node.containers().await.is_empty());

    // Never and IfNotPresent run a present image. No registry exists, so a pull attempt
    // would fail the task: success proves nothing was pulled (sidecar included).
    docker
        .execute(task("hello"), CancellationToken::new())
        .await
        .expect("Never runs a present image");
    let mut config = node.config();
    config.settings.image_pull_policy = ImagePullPolicy::IfNotPresent;
    backend(config)
        .await
        .execute(task("hello"), CancellationToken::new())
        .await
        .expect("IfNotPresent does not pull a present image");

    // Always pulls even a present image (and here the pull can only fail).
    let mut config = node.config();
    config.settings.image_pull_policy = ImagePullPolicy::Always;
    let failed = failure(
        backend(config)
            .await
            .execute(task("hello"), CancellationToken::new())
            .await,
    );
    assert_eq!(failed.reason, FailureReason::ImagePull);
    assert!(
        failed
            .error
            .starts_with(&format!("failed to pull image {BUSYBOX}: ")),
        "{failed:?}"
    );
    assert!(node.containers().await.is_empty());
}

#[tokio::test]
async fn sidecar_is_read_only_unless_read_write() {
    let node = Node::new().await;
    let docker = backend(node.config()).await;

    let failed = failure(
        docker
            .execute(task("write /agent/probe"), CancellationToken::new())
            .await,
    );
    assert_eq!(
        (failed.reason, failed.exit_code),
        (FailureReason::ContainerExit, 1),
        "{failed:?}"
    );

    let mut run = task("write /mnt/rw/probe read /mnt/rw/entrypoint.sh");
    run.sidecars.push(SidecarMount {
        image: SIDECAR.into(),
        mount_path: "/mnt/rw".into(),
        read_write: true,
    });
    docker
        .execute(run, CancellationToken::new())
        .await
        .expect("a read_write sidecar is writable");
}

#[tokio::test]
async fn sidecar_volume_is_filled_once_and_reused() {
    // Declared first so it is dropped last, after the node's containers are gone.
    let copy = SidecarCopy::new().await;
    let node = Node::new().await;
    let daemon = &node.docker;

    let since = event_time();
    let docker = backend(node.config()).await;
    let with_copy = |prompt: &str| {
        let mut run = task(prompt);
        run.sidecars[0].image = copy.image.clone();
        run
    };
    docker
        .execute(
            with_copy("read /agent/entrypoint.sh"),
            CancellationToken::new(),
        )
        .await
        .expect("first task fills the volume");
    let created_at = daemon
        .inspect_volume(&copy.volume)
        .await
        .expect("the sidecar volume exists")
        .created_at;
    docker
        .execute(with_copy("hello"), CancellationToken::new())
        .await
        .expect("second task reuses the volume");

    let helper_label = format!("{LABEL_SIDECAR_IMAGE}={}", copy.image);
    let helpers = events_since(
        daemon,
        &since,
        &[
            ("type", "container"),
            ("event", "create"),
            ("label", &helper_label),
        ],
    )
    .await;
    // Filling takes one export and one extraction container; the daemon's volume "create"
    // events do not tell, as it emits one for every container that mounts the volume.
    assert_eq!(helpers.len(), 2, "filled once: {helpers:?}");
    let inspected = daemon
        .inspect_volume(&copy.volume)
        .await
        .expect("volume kept");
    assert_eq!(inspected.created_at, created_at);
    let leftovers = docker_support::containers_labelled(daemon, &helper_label).await;
    assert!(
        leftovers.is_empty(),
        "helper containers removed: {leftovers:?}"
    );
}

/// The file the backend writes into a sidecar volume once it is completely filled.
const COMPLETE_MARKER: &str = ".ozfleet-sidecar-complete";

/// Creates `volume` as the backend does before filling it, empty.
async fn create_sidecar_volume(daemon: &Docker, volume: &str, image: &str) {
    daemon
        .create_volume(VolumeCreateRequest {
            name: Some(volume.to_owned()),
            labels: Some(HashMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_SIDECAR_IMAGE.to_owned(), image.to_owned()),
            ])),
            ..Default::default()
        })
        .await
        .expect("create the sidecar volume");
}

/// Creates a never-started container of `image` with `labels` and `binds`.
async fn create_container(
    daemon: &Docker,
    image: &str,
    cmd: &[&str],
    labels: HashMap<String, String>,
    binds: Vec<String>,
) -> String {
    daemon
        .create_container(
            None::<CreateContainerOptions>,
            ContainerCreateBody {
                image: Some(image.to_owned()),
                cmd: Some(cmd.iter().map(|&arg| arg.to_owned()).collect()),
                labels: Some(labels),
                host_config: Some(HostConfig {
                    binds: Some(binds),
                    network_mode: Some("none".to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("create a container")
        .id
}

/// Whether `volume` holds the completion marker.
async fn has_complete_marker(daemon: &Docker, volume: &str, image: &str) -> bool {
    let probe = create_container(
        daemon,
        image,
        &["true"],
        HashMap::new(),
        vec![format!("{volume}:/probe:ro")],
    )
    .await;
    let stat = daemon
        .get_container_archive_info(
            &probe,
            Some(ContainerArchiveInfoOptions {
                path: format!("/probe/{COMPLETE_MARKER}"),
            }),
        )
        .await;
    daemon
        .remove_container(&probe, None::<RemoveContainerOptions>)
        .await
        .expect("remove the probe container");
    match stat {
        Ok(_) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => false,
        Err(error) => panic!("cannot stat the marker in {volume}: {error}"),
    }
}

#[tokio::test]
async fn a_sidecar_volume_left_half_filled_is_filled_again() {
    // Declared first so it is dropped last, after the node's containers are gone.
    let copy = SidecarCopy::new().await;
    let node = Node::new().await;
    let daemon = &node.docker;

    // What an agent killed in the middle of a fill leaves: the volume with part of the
    // image's files (`/bin`, not `/entrypoint.sh`), no marker, and the extraction container
    // that still holds the volume.
    create_sidecar_volume(daemon, &copy.volume, &copy.image).await;
    let extraction = create_container(
        daemon,
        &copy.image,
        &["true"],
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_SIDECAR_IMAGE.to_owned(), copy.image.clone()),
        ]),
        vec![format!("{}:/target", copy.volume)],
    )
    .await;
    // Read whole before writing: the daemon serialises archive requests on one container.
    let part: Vec<_> = daemon
        .download_from_container(
            &extraction,
            Some(DownloadFromContainerOptions {
                path: "/bin".to_owned(),
            }),
        )
        .try_collect()
        .await
        .expect("read part of the image");
    daemon
        .upload_to_container(
            &extraction,
            Some(UploadToContainerOptions {
                path: "/target".to_owned(),
                ..Default::default()
            }),
            bollard::body_try_stream(futures::stream::iter(part.into_iter().map(Ok))),
        )
        .await
        .expect("copy part of the image into the volume");
    assert!(!has_complete_marker(daemon, &copy.volume, &copy.image).await);

    let docker = backend(node.config()).await;
    let mut run = task("read /agent/entrypoint.sh");
    run.sidecars[0].image = copy.image.clone();
    docker
        .execute(run, CancellationToken::new())
        .await
        .expect("the task runs the entrypoint of a complete /agent");
    assert!(
        has_complete_marker(daemon, &copy.volume, &copy.image).await,
        "the volume was filled again, to the end"
    );
    assert!(
        daemon
            .inspect_container(&extraction, None)
            .await
            .is_err_and(|error| matches!(
                error,
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                }
            )),
        "the helper left by the killed fill is removed"
    );
    let helpers = docker_support::containers_labelled(
        daemon,
        &format!("{LABEL_SIDECAR_IMAGE}={}", copy.image),
    )
    .await;
    assert!(helpers.is_empty(), "helpers removed: {helpers:?}");

    // Now complete, the volume is reused as it is.
    let created_at = daemon
        .inspect_volume(&copy.volume)
        .await
        .expect("volume kept")
        .created_at;
    let mut run = task("read /agent/entrypoint.sh");
    run.sidecars[0].image = copy.image.clone();
    docker
        .execute(run, CancellationToken::new())
        .await
        .expect("the task reuses the volume");
    let inspected = daemon.inspect_volume(&copy.volume).await.expect("volume");
    assert_eq!(inspected.created_at, created_at);
}

#[tokio::test]
async fn an_incomplete_sidecar_volume_in_use_fails_the_task_naming_it() {
    let copy = SidecarCopy::new().await;
    let node = Node::new().await;
    let daemon = &node.docker;

    // An incomplete volume a running container still uses (labelled as the node's, so the
    // node fixture removes it).
    create_sidecar_volume(daemon, &copy.volume, &copy.image).await;
    let holder = create_container(
        daemon,
        BUSYBOX,
        &["sleep", "600"],
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_NODE_ID.to_owned(), node.id.clone()),
        ]),
        vec![format!("{}:/holder", copy.volume)],
    )
    .await;
    daemon
        .start_container(&holder, None)
        .await
        .expect("start the container holding the volume");

    let docker = backend(node.config()).await;
    let mut run = task("hello");
    run.sidecars[0].image = copy.image.clone();
    let failed = failure(docker.execute(run, CancellationToken::new()).await);
    assert_eq!(failed.reason, FailureReason::SidecarPrep, "{failed:?}");
    assert!(
        failed
            .error
            .contains(&format!("sidecar volume {} is incomplete", copy.volume)),
        "{failed:?}"
    );
    assert!(
        !has_complete_marker(daemon, &copy.volume, &copy.image).await,
        "an incomplete volume in use is not filled"
    );
    let containers = node.containers().await;
    assert_eq!(containers.len(), 1, "only the holder: {containers:?}");
}

#[tokio::test]
async fn invalid_sidecars_are_sidecar_prep() {
    let node = Node::new().await;
    let docker = backend(node.config()).await;
    let agent = SidecarMount {
        image: SIDECAR.into(),
        mount_path: "/agent".into(),
        read_write: false,
    };
    let cases = [
        (
            vec![
                agent.clone(),
                SidecarMount {
                    image: String::new(),
                    mount_path: "/mnt/x".into(),
                    read_write: false,
                },
            ],
            "additional sidecar has empty image".to_owned(),
        ),
        (
            vec![SidecarMount {
                mount_path: String::new(),
                ..agent.clone()
            }],
            format!("additional sidecar {SIDECAR} has empty mount path"),
        ),
        (
            vec![agent.clone(), agent.clone()],
            format!("duplicate mount path /agent for additional sidecar {SIDECAR}"),
        ),
    ];
    for (sidecars, error) in cases {
        let mut run = task("hello");
        run.sidecars = sidecars;
        let failed = failure(docker.execute(run, CancellationToken::new()).await);
        assert_eq!(
            failed,
            TaskFailure::new(FailureReason::SidecarPrep, error.clone())
        );
    }
    assert!(node.containers().await.is_empty());
}

#[tokio::test]
async fn host_volume_is_visible_in_the_container() {
    let node = Node::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("hello.txt"), "hello-from-the-host").expect("write file");
    let mut config = node.config();
    config.settings.volumes = vec![format!("{}:/data:ro", dir.path().display())];
    config.cleanup = false;
    let docker = backend(config).await;
    let run = task("read /data/hello.txt");
    let name = container_name(&node.id, &run.task_id, &run.execution_id);
    docker
        .execute(run, CancellationToken::new())
        .await
        .expect("task reads the file");
    let output = logs(&node.docker, &name).await;
    assert!(
        output.contains("read /data/hello.txt: hello-from-the-host"),
        "{output}"
    );
}

#[tokio::test]
async fn container_spec_env_labels_and_name() {
    let node = Node::new().await;
    let mut config = node.config();
    config.cleanup = false;
    config.environment = secret_env([("SHARED", "from-config"), ("CONFIG_ONLY", "c")]);
    config.settings.volumes = vec!["/tmp:/host-tmp:ro".into()];
    let docker = backend(config).await;
    let mut run = task("hello");
    run.env
        .extend(secret_env([("SHARED", "from-task"), ("TASK_ONLY", "t")]));
    run.instance_shape = Some(InstanceShape {
        vcpus: 1,
        memory_gb: 2,
    });
    let name = container_name(&node.id, &run.task_id, &run.execution_id);
    docker
        .execute(run.clone(), CancellationToken::new())
        .await
        .expect("task succeeds");

    let info = node
        .docker
        .inspect_container(&name, None)
        .await
        .expect("kept container");
    assert_eq!(info.name.as_deref(), Some(format!("/{name}").as_str()));
    let config = info.config.expect("config");
    let env = config.env.expect("env");
    for expected in [
        "SHARED=from-config",
        "CONFIG_ONLY=c",
        "TASK_ONLY=t",
        "OZ_DEMO_PROMPT=hello",
    ] {
        assert!(
            env.iter().any(|entry| entry == expected),
            "{expected} in {env:?}"
        );
    }
    assert_eq!(
        env.iter()
            .filter(|entry| entry.starts_with("SHARED="))
            .count(),
        1,
        "no duplicate names: {env:?}"
    );
    let labels = config.labels.expect("labels");
    assert_eq!(labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
    assert_eq!(labels.get(LABEL_NODE_ID), Some(&node.id));
    assert_eq!(labels.get(LABEL_TASK_ID), Some(&run.task_id));
    assert_eq!(labels.get(LABEL_EXECUTION_ID), Some(&run.execution_id));
    assert_eq!(config.working_dir.as_deref(), Some("/workspace"));
    let mut cmd = vec!["/agent/entrypoint.sh".to_owned()];
    cmd.extend(run.base_args.iter().cloned());
    assert_eq!(config.cmd.as_ref(), Some(&cmd));

    let host = info.host_config.expect("host config");
    let binds = host.binds.expect("binds");
    assert_eq!(binds.len(), 2, "{binds:?}");
    assert!(
        binds[0].starts_with("localhost-5999-oz-demo-sidecar-") && binds[0].ends_with(":/agent:ro"),
        "sidecar bind first: {binds:?}"
    );
    assert_eq!(binds[1], "/tmp:/host-tmp:ro");
    assert_eq!(host.nano_cpus, Some(1_000_000_000));
    assert_eq!(host.memory, Some(2 << 30));
    assert_eq!(host.memory_swap, Some(2 << 30));
    assert_eq!(host.network_mode.as_deref(), Some("none"));

    let output = logs(&node.docker, &name).await;
    assert!(output.contains("CONFIG_ONLY"), "{output}");
    assert!(
        !output.contains("from-config"),
        "values never printed: {output}"
    );
}

#[tokio::test]
async fn a_second_execute_of_one_execution_starts_no_second_container() {
    let tasks = TaskTracker::new();
    let node = Node::new().await;
    let docker = std::sync::Arc::new(backend(node.config()).await);
    let run = task("sleep 2");
    let first = tasks.spawn({
        let docker = docker.clone();
        let run = run.clone();
        async move { docker.execute(run, CancellationToken::new()).await }
    });
    let id = node.wait_running(&run.execution_id).await;
    let started_at = |info: bollard::models::ContainerInspectResponse| {
        info.state.and_then(|state| state.started_at)
    };
    let started = started_at(node.docker.inspect_container(&id, None).await.unwrap());

    let second = tasks.spawn({
        let docker = docker.clone();
        let run = run.clone();
        async move { docker.execute(run, CancellationToken::new()).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let containers = node.containers().await;
    assert_eq!(containers.len(), 1, "{containers:?}");
    let info = node.docker.inspect_container(&id, None).await.unwrap();
    assert_eq!(info.restart_count, Some(0));
    assert_eq!(started_at(info), started, "not started again");

    first.await.unwrap().expect("first execute succeeds");
    second
        .await
        .unwrap()
        .expect("second execute follows the same container");
    assert!(node.containers().await.is_empty());
}

#[tokio::test]
async fn cancellation_stops_the_container_within_the_grace() {
    let tasks = TaskTracker::new();
    let node = Node::new().await;
    let docker = std::sync::Arc::new(backend(node.config()).await);
    let run = task("sleep 60");
    let cancel = CancellationToken::new();
    let execution = tasks.spawn({
        let docker = docker.clone();
        let run = run.clone();
        let cancel = cancel.clone();
        async move { docker.execute(run, cancel).await }
    });
    node.wait_running(&run.execution_id).await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    let failed = failure(execution.await.unwrap());
    assert!(
        cancelled_at.elapsed() < node.config().stop_grace,
        "took {:?}",
        cancelled_at.elapsed()
    );
    // The demo agent exits 143 on SIGTERM.
    assert_eq!(
        failed,
        TaskFailure {
            reason: FailureReason::TaskCancelled,
            exit_code: 143,
            error: "context canceled".into(),
        }
    );
    assert!(
        node.containers().await.is_empty(),
        "removed after cancellation"
    );
}

#[tokio::test]
async fn cleanup_false_keeps_the_container() {
    let node = Node::new().await;
    let mut config = node.config();
    config.cleanup = false;
    let docker = backend(config).await;
    let run = task("hello");
    docker
        .execute(run.clone(), CancellationToken::new())
        .await
        .expect("task succeeds");
    let containers = node.containers().await;
    assert_eq!(containers.len(), 1);
    let info = node
        .docker
        .inspect_container(containers[0].id.as_deref().unwrap(), None)
        .await
        .unwrap();
    let state = info.state.unwrap();
    assert_eq!(state.exit_code, Some(0));
    assert_eq!(
        info.name,
        Some(format!(
            "/{}",
            container_name(&node.id, &run.task_id, &run.execution_id)
        ))
    );
}

#[tokio::test]
async fn a_restarted_agent_recovers_and_resumes_its_running_container() {
    let tasks = TaskTracker::new();
    let node = Node::new().await;
    let other = Node::new().await;

    // The crashed agent: its execute future is dropped without cancelling.
    let crashed = std::sync::Arc::new(backend(node.config()).await);
    let run = task("sleep 3 then exit 5");
    let execution = tasks.spawn({
        let crashed = crashed.clone();
        let run = run.clone();
        async move { crashed.execute(run, CancellationToken::new()).await }
    });
    let id = node.wait_running(&run.execution_id).await;
    execution.abort();
    assert!(execution.await.unwrap_err().is_cancelled());
    drop(crashed);

    // Another node's container on the same daemon.
    let other_backend = std::sync::Arc::new(backend(other.config()).await);
    let other_run = task("sleep 30");
    let other_execution = tasks.spawn({
        let other_backend = other_backend.clone();
        let other_run = other_run.clone();
        async move {
            other_backend
                .execute(other_run, CancellationToken::new())
                .await
        }
    });
    other.wait_running(&other_run.execution_id).await;
    other_execution.abort();

    let state = node
        .docker
        .inspect_container(&id, None)
        .await
        .unwrap()
        .state
        .unwrap();
    assert_eq!(
        state.running,
        Some(true),
        "dropping execute left it running"
    );

    let restarted = backend(node.config()).await;
    let recovered = restarted.recover().await;
    assert_eq!(
        recovered,
        vec![RecoveredTask {
            task_id: run.task_id.clone(),
            execution_id: run.execution_id.clone(),
            handle: id.clone(),
        }]
    );
    let failed = failure(
        restarted
            .resume(recovered[0].clone(), CancellationToken::new())
            .await,
    );
    assert_eq!(
        failed,
        TaskFailure {
            reason: FailureReason::ContainerExit,
            exit_code: 5,
            error: "container exited with non-zero status: 5".into(),
        }
    );
    assert!(
        node.containers().await.is_empty(),
        "cleaned up after resume"
    );
    assert_eq!(other.containers().await.len(), 1, "other node untouched");
}

#[tokio::test]
async fn an_exited_container_is_recovered_with_its_exit_code() {
    let tasks = TaskTracker::new();
    let node = Node::new().await;
    // The agent dies while the task runs; the task ends before a new agent is up.
    let crashed = std::sync::Arc::new(backend(node.config()).await);
    let run = task("sleep 1 then exit 7");
    let execution = tasks.spawn({
        let crashed = crashed.clone();
        let run = run.clone();
        async move { crashed.execute(run, CancellationToken::new()).await }
    });
    let id = node.wait_running(&run.execution_id).await;
    execution.abort();
    drop(crashed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while node
        .docker
        .inspect_container(&id, None)
        .await
        .unwrap()
        .state
        .and_then(|state| state.running)
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "container did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let restarted = backend(node.config()).await;
    let recovered = restarted.recover().await;
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0].handle, id);
    let failed = failure(
        restarted
            .resume(recovered[0].clone(), CancellationToken::new())
            .await,
    );
    assert_eq!(
        failed,
        TaskFailure {
            reason: FailureReason::ContainerExit,
            exit_code: 7,
            error: "container exited with non-zero status: 7".into(),
        }
    );
    assert!(node.containers().await.is_empty());
}
