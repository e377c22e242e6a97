//! End to end on the Docker backend: control plane → gateway → node agent → container on
//! a real Docker Engine (`tests/docker/start-docker.sh` starts one and builds the images).
//! The demo agent is the sidecar's `/agent/entrypoint.sh`; it fetches its run from the
//! control plane over the host's loopback (network mode `host`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Proc, Stack};
use serde_json::json;

const TASK_IMAGE: &str = "localhost:5999/busybox:1";
const SIDECAR_IMAGE: &str = "localhost:5999/oz-demo-sidecar:1";
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI (run tests/docker/start-docker.sh)");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Fails loudly (never skips) when there is no daemon or the images are missing.
fn require_docker() {
    let ready = Command::new("docker")
        .args(["image", "inspect", TASK_IMAGE, SIDECAR_IMAGE])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        ready,
        "no Docker Engine with the test images: run tests/docker/start-docker.sh first"
    );
}

/// Containers (running or not) of a run, by ozfleet's labels.
fn containers_of(run_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("label=dev.ozfleet.task-id={run_id}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

fn docker_stack() -> Stack {
    require_docker();
    Stack::start_with(&[
        "--docker-image",
        TASK_IMAGE,
        "--sidecar-image",
        SIDECAR_IMAGE,
    ])
}

fn docker_agent(stack: &Stack, name: &str, extra: &[&str]) -> Proc {
    docker_agent_pulling(stack, name, "IfNotPresent", extra)
}

fn docker_agent_pulling(stack: &Stack, name: &str, pull_policy: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--backend",
        "docker",
        "--image-pull-policy",
        pull_policy,
        "--docker-network",
        "host",
    ];
    args.extend_from_slice(extra);
    stack.node_agent(name, &args)
}

#[test]
fn container_runs_succeed_fail_and_are_cancelled_without_leaks() {
    let stack = docker_stack();
    // At debug level: the task credentials must stay out of the log all the same.
    let agent = docker_agent(&stack, "docker-a", &["--log-level", "debug"]);

    let hello = stack.api.create("Say hello from a container");
    stack.api.wait_for_state(&hello, "SUCCEEDED", RUN_TIMEOUT);

    let failing = stack.api.create("Exit 3 to show a failure");
    let item = stack.api.wait_for_state(&failing, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "container_exit", "{item}");
    assert_eq!(item["exit_code"], 3, "{item}");
    assert_eq!(
        item["status_message"]["message"],
        "Failed to execute task: container exited with non-zero status: 3"
    );
    // The container's output is logged on failure: the demo agent's own lines show up.
    agent.wait_for_log("oz-demo-agent", Duration::from_secs(10));

    let long = stack.api.create("Sleep 300 seconds");
    stack.api.wait_for_state(&long, "INPROGRESS", RUN_TIMEOUT);
    let (status, body) = stack.api.cancel(&long);
    assert_eq!(status, 200, "{body}");
    stack
        .api
        .wait_for_state(&long, "CANCELLED", Duration::from_secs(30));

    for run in [&hello, &failing, &long] {
        common::wait_until(Duration::from_secs(15), "containers to be removed", || {
            containers_of(run).is_empty()
        });
    }
    let log = agent.log();
    assert!(log.contains("DEBUG"), "the agent logged at debug level");
    assert!(
        !log.contains("WARP_API_KEY="),
        "a task credential reached the log"
    );
}

#[test]
fn memory_shape_and_missing_images_are_reported_with_their_reasons() {
    let stack = docker_stack();
    // Never pull: the test images are local, and a missing one must fail without a pull.
    let agent = docker_agent_pulling(&stack, "docker-b", "Never", &[]);

    let oom = stack.api.create_with_config(
        "Allocate 1500 MiB",
        json!({ "instance_shape": { "vcpus": 1, "memory_gb": 1 } }),
    );
    let item = stack.api.wait_for_state(&oom, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "container_oom", "{item}");

    let missing = stack.api.create_with_config(
        "Say hello",
        json!({ "docker_image": "localhost:5999/does-not-exist:1" }),
    );
    let item = stack.api.wait_for_state(&missing, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "image_pull", "{item}");
    let message = item["status_message"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("localhost:5999/does-not-exist:1"),
        "{item}"
    );
    assert!(containers_of(&missing).is_empty());
    assert!(!agent.log().contains("Pulling"), "{}", agent.log());
}

#[test]
fn a_killed_agent_finds_its_container_again_and_reports_the_true_outcome() {
    let stack = docker_stack();
    let mut agent = docker_agent(&stack, "docker-c", &[]);

    let run = stack.api.create("Sleep 6 seconds, then finish");
    stack.api.wait_for_state(&run, "INPROGRESS", RUN_TIMEOUT);
    agent.kill();
    // The container outlives the agent (a crashed agent cannot stop or remove it)…
    // (any state: on a loaded machine the 6 s task may already have ended by now)
    let kept = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=dev.ozfleet.task-id={run}"),
    ]);
    assert!(!kept.trim().is_empty(), "the container outlived the agent");

    // …and the restarted agent (same identity) picks it up and reports how it ended.
    let agent = docker_agent(&stack, "docker-c", &[]);
    agent.wait_for_log("Resuming a task", Duration::from_secs(20));
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);
    common::wait_until(
        Duration::from_secs(15),
        "the container to be removed",
        || containers_of(&run).is_empty(),
    );
    stack.assert_no_secrets_in_logs();
}

#[test]
fn an_agent_stopped_with_sigterm_leaves_its_container_running_for_the_next_agent() {
    let stack = docker_stack();
    let mut agent = docker_agent(&stack, "docker-d", &[]);
    let run = stack.api.create("Sleep 6 seconds, then finish");
    stack.api.wait_for_state(&run, "INPROGRESS", RUN_TIMEOUT);
    let status = agent
        .terminate(Duration::from_secs(30))
        .expect("the agent exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // An agent restart or upgrade does not cut the task short…
    let running = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=dev.ozfleet.task-id={run}"),
    ]);
    assert!(!running.trim().is_empty(), "the container kept running");
    assert_eq!(stack.api.get(&run)["state"], "INPROGRESS");
    // …the next agent adopts it and its true outcome is reported once.
    let agent = docker_agent(&stack, "docker-d", &[]);
    agent.wait_for_log("Resuming a task", Duration::from_secs(20));
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);
    stack.assert_no_secrets_in_logs();
}

#[test]
fn the_agent_sidecar_is_read_only_and_configured_volumes_are_mounted() {
    let stack = docker_stack();
    let data = stack.dir.path().join("shared-data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("hello.txt"), "from the host").unwrap();
    let volume = format!("{}:/data:ro", data.display());
    let _agent = docker_agent(&stack, "docker-d", &["-v", &volume]);

    let read = stack.api.create("Read /data/hello.txt");
    stack.api.wait_for_state(&read, "SUCCEEDED", RUN_TIMEOUT);

    for target in ["/agent/probe", "/data/probe"] {
        let write = stack.api.create(&format!("Write {target}"));
        let item = stack.api.wait_for_state(&write, "FAILED", RUN_TIMEOUT);
        assert_eq!(item["exit_code"], 1, "{target}: {item}");
    }
    let writable = stack.api.create("Write /workspace/probe");
    stack
        .api
        .wait_for_state(&writable, "SUCCEEDED", RUN_TIMEOUT);
}

#[test]
fn dev_runs_the_demos_in_containers() {
    require_docker();
    common::assert_dev_demos_pass("docker", "Docker backend");
}

#[test]
fn kept_containers_of_reported_tasks_are_not_reported_again_after_a_restart() {
    let stack = docker_stack();
    let mut agent = docker_agent(&stack, "docker-e", &["--no-cleanup"]);
    let run = stack.api.create("Say hello and keep the container");
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);
    assert_eq!(
        containers_of(&run).len(),
        1,
        "--no-cleanup keeps the container"
    );
    // The agent must have recorded the gateway's acknowledgement before it dies: that
    // record is what tells the restarted agent the kept container was reported.
    let reported = stack
        .dir
        .path()
        .join("docker-e-state")
        .join("reported-executions");
    common::wait_until(
        Duration::from_secs(15),
        "the agent to record the acknowledged outcome",
        || {
            std::fs::read_to_string(&reported).is_ok_and(|log| {
                log.lines()
                    .any(|line| line.starts_with(&format!("{run}\t")))
            })
        },
    );
    agent.kill();

    let agent = docker_agent(&stack, "docker-e", &["--no-cleanup"]);
    let second = stack.api.create("Say hello again");
    stack.api.wait_for_state(&second, "SUCCEEDED", RUN_TIMEOUT);
    assert!(!agent.log().contains("Resuming a task"), "{}", agent.log());
    for kept in [&run, &second] {
        for container in containers_of(kept) {
            docker(&["rm", "-f", &container]);
        }
    }
}

#[test]
fn a_gateway_killed_with_container_runs_in_flight_restarts_and_none_is_lost_or_run_twice() {
    let mut stack = docker_stack();
    let agent = docker_agent(&stack, "docker-g", &[]);
    let runs: Vec<String> = (0..8)
        .map(|i| {
            stack
                .api
                .create(&format!("Sleep 4 seconds, then finish, run {i}"))
        })
        .collect();
    common::wait_until(RUN_TIMEOUT, "some runs to be in progress", || {
        runs.iter()
            .filter(|run| stack.api.get(run)["state"] == "INPROGRESS")
            .count()
            >= 3
    });
    stack.crash_and_restart_gateway();
    for run in &runs {
        stack.api.wait_for_state(run, "SUCCEEDED", RUN_TIMEOUT);
    }
    // Each run started exactly once on the agent (a re-offer is claimed where it runs).
    let log = agent.log();
    for run in &runs {
        let started = log
            .lines()
            .filter(|line| line.contains("Task accepted") && line.contains(run.as_str()))
            .count();
        assert_eq!(started, 1, "run {run} started {started} times");
    }
    stack.assert_no_secrets_in_logs();
}
