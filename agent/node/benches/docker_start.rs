//! Time to a running task container: the Docker backend against `docker run -d`.
//!
//! Run: `tests/docker/start-docker.sh && cargo bench -p ozfleet-agent --bench docker_start`
//! (a real Docker Engine is needed; the benchmark fails when it is not there).
//!
//! Ours: from calling `DockerBackend::execute()` (the moment a node receives an
//! assignment) until the daemon reports the task container started. Images and the
//! sidecar volume are cached beforehand and the pull policy is IfNotPresent, so this is
//! the steady state: image and volume checks, create, start.
//! CLI: from spawning `docker run -d <same image, env, sidecar volume, workdir, network
//! mode, command>` until the daemon reports that container started.
//!
//! "Started" is the daemon's container `start` event for both, read from one events
//! subscription opened before the first run. Each side runs one warm-up, then N timed runs
//! (alternating, so drift hits both alike); every container is stopped (SIGTERM) and
//! removed, and the daemon gets a short pause, before the next run. Prints median and p90 of both and the ratio ours/CLI (target ≤ 1.0).
//!
//! Environment: `OZFLEET_BENCH_ITERATIONS` (default 10), `OZFLEET_BENCH_DOCKER_CLI` (the
//! CLI binary, default `docker` on PATH), `OZFLEET_BENCH_NETWORK` (network mode of both,
//! default `none` like the tests; `default` = the daemon's default, which on the test
//! daemon's `--bridge=none` skips network namespace setup and is about 100 ms faster).

#[path = "../tests/docker_support/mod.rs"]
mod docker_support;

mod comparison;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::EventMessage;
use bollard::query_parameters::{EventsOptions, RemoveContainerOptions, StopContainerOptions};
use docker_support::{BUSYBOX, Node, SIDECAR, task};
use futures::{Stream, StreamExt as _};
use ozfleet_agent::backend::docker::{
    LABEL_EXECUTION_ID, LABEL_MANAGED, LABEL_NODE_ID, LABEL_TASK_ID,
};
use ozfleet_agent::backend::{DockerBackend, TaskBackend as _};
use secrecy::ExposeSecret as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type Events = Pin<Box<dyn Stream<Item = Result<EventMessage, DockerError>> + Send>>;

/// The demo agent sleeps, so the container is still running when it is measured.
const PROMPT: &str = "sleep 60";
/// Pause after each run's cleanup.
const SETTLE: Duration = Duration::from_millis(300);

#[tokio::main]
async fn main() {
    let iterations = comparison::iterations();
    let cli = std::env::var("OZFLEET_BENCH_DOCKER_CLI").unwrap_or_else(|_| "docker".to_owned());
    let network = std::env::var("OZFLEET_BENCH_NETWORK").unwrap_or_else(|_| "none".to_owned());
    let network = (network != "default").then_some(network);

    let node = Node::new().await;
    let mut config = node.config();
    config.stop_grace = Duration::from_secs(1);
    config.settings.network_mode = network.clone();
    let backend = Arc::new(
        DockerBackend::new(config)
            .await
            .expect("connect the Docker backend"),
    );
    let docker = node.docker.clone();
    let mut events: Events = Box::pin(docker.events(Some(EventsOptions {
        filters: Some(HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("event".to_owned(), vec!["start".to_owned()]),
        ])),
        ..Default::default()
    })));
    let cli_version = tokio::process::Command::new(&cli)
        .args(["version", "--format", "{{.Client.Version}}"])
        .output()
        .await
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_else(|error| panic!("cannot run {cli}: {error}"));

    // Warm-up. The first run of ours also fills the sidecar volume if it is not cached
    // yet; the CLI then mounts the very same volume.
    ours(&backend, &mut events, &node.id).await;
    let volume = sidecar_volume(&docker).await;
    cli_run(
        &docker,
        &mut events,
        &cli,
        network.as_deref(),
        &volume,
        &node.id,
    )
    .await;

    let mut ours_times = Vec::with_capacity(iterations);
    let mut cli_times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        ours_times.push(ours(&backend, &mut events, &node.id).await);
        cli_times.push(
            cli_run(
                &docker,
                &mut events,
                &cli,
                network.as_deref(),
                &volume,
                &node.id,
            )
            .await,
        );
    }

    println!(
        "docker_start: execute() → container running vs `{cli} run -d` (client {cli_version}), network mode {}, {iterations} runs each after 1 warm-up",
        network.as_deref().unwrap_or("default")
    );
    comparison::report(&ours_times, &cli_times);
}

/// One `execute()` until its container runs; then cancels it (which stops and removes it).
async fn ours(backend: &Arc<DockerBackend>, events: &mut Events, node_id: &str) -> Duration {
    let tasks = TaskTracker::new();
    let run = task(PROMPT);
    let execution_id = run.execution_id.clone();
    let task_id = run.task_id.clone();
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let execution = tasks.spawn({
        let backend = Arc::clone(backend);
        let cancel = cancel.clone();
        async move { backend.execute(run, cancel).await }
    });
    wait_for_start(events, |attributes| {
        attributes.get(LABEL_NODE_ID).map(String::as_str) == Some(node_id)
            && attributes.get(LABEL_TASK_ID) == Some(&task_id)
            && attributes.get(LABEL_EXECUTION_ID) == Some(&execution_id)
    })
    .await;
    let elapsed = started.elapsed();
    cancel.cancel();
    let outcome = execution.await.expect("execute task");
    assert!(outcome.is_err(), "the task was cancelled, not finished");
    settle().await;
    elapsed
}

/// One `docker run -d` until its container runs; then removes it.
async fn cli_run(
    docker: &Docker,
    events: &mut Events,
    cli: &str,
    network: Option<&str>,
    volume: &str,
    node_id: &str,
) -> Duration {
    let run = task(PROMPT);
    let name = format!("ozfleet-bench-cli-{}", uuid::Uuid::new_v4());
    let mut command = tokio::process::Command::new(cli);
    command
        .args(["run", "-d", "--name", &name, "-w", "/workspace"])
        .args(["-v", &format!("{volume}:/agent:ro")])
        // The node's labels, so the fixture removes it should the benchmark fail.
        .args(["--label", &format!("{LABEL_MANAGED}=true")])
        .args(["--label", &format!("{LABEL_NODE_ID}={node_id}")]);
    if let Some(network) = network {
        command.args(["--network", network]);
    }
    for (key, value) in &run.env {
        command.args(["-e", &format!("{key}={}", value.expose_secret())]);
    }
    command
        .arg(BUSYBOX)
        .arg("/agent/entrypoint.sh")
        .args(&run.base_args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let started = Instant::now();
    let mut child = command.spawn().expect("spawn docker run");
    wait_for_start(events, |attributes| attributes.get("name") == Some(&name)).await;
    let elapsed = started.elapsed();
    let status = child.wait().await.expect("wait for docker run");
    assert!(status.success(), "docker run -d failed: {status}");
    // Ended like ours: SIGTERM (the demo agent exits at once), then removal.
    docker
        .stop_container(
            &name,
            Some(StopContainerOptions {
                t: Some(1),
                ..Default::default()
            }),
        )
        .await
        .expect("stop the CLI container");
    docker
        .remove_container(
            &name,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .expect("remove the CLI container");
    settle().await;
    elapsed
}

/// The daemon finishes tearing a container down (shim, mounts, network namespace) after
/// the API returned; a pause keeps that work out of the next measurement.
async fn settle() {
    tokio::time::sleep(SETTLE).await;
}

/// Reads container start events until one whose attributes (labels, `name`, `image`)
/// satisfy `matches`.
async fn wait_for_start(events: &mut Events, matches: impl Fn(&HashMap<String, String>) -> bool) {
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => panic!("no container start event within 60 s"),
            event = events.next() => {
                let event = event.expect("events stream open").expect("read event");
                let attributes = event
                    .actor
                    .and_then(|actor| actor.attributes)
                    .unwrap_or_default();
                if matches(&attributes) {
                    return;
                }
            }
        }
    }
}

/// The cached volume of the demo sidecar (the backend's naming: repository, then 12 hex
/// chars of the image id).
async fn sidecar_volume(docker: &Docker) -> String {
    let id = docker
        .inspect_image(SIDECAR)
        .await
        .expect("inspect the sidecar image")
        .id
        .expect("image id");
    let volume = format!(
        "localhost-5999-oz-demo-sidecar-{}",
        &id.trim_start_matches("sha256:")[..12]
    );
    docker
        .inspect_volume(&volume)
        .await
        .unwrap_or_else(|error| panic!("sidecar volume {volume} is not cached: {error}"));
    volume
}
