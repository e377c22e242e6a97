//! End to end: a real control plane, gateway and node agents, each its own `ozfleet`
//! process on loopback, driven through the control plane's run API.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common::{Stack, accepted_task_ids, grpcurl};
use ozfleet::processes_of_run;

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn twenty_runs_are_spread_over_two_agents_and_all_succeed() {
    let stack = Stack::start();
    let agent_a = stack.agent("agent-a", &[]);
    let agent_b = stack.agent("agent-b", &[]);

    let runs: Vec<String> = (0..20)
        .map(|i| stack.api.create(&format!("Say hello, run {i}")))
        .collect();
    for run in &runs {
        stack.api.wait_for_state(run, "SUCCEEDED", RUN_TIMEOUT);
    }

    let on_a = accepted_task_ids(&agent_a.log());
    let on_b = accepted_task_ids(&agent_b.log());
    let all: HashSet<String> = runs.iter().cloned().collect();
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "a: {on_a:?}\nb: {on_b:?}"
    );
    assert!(on_a.is_disjoint(&on_b), "a run executed on both agents");
    assert_eq!(&on_a | &on_b, all, "every run ran on exactly one agent");
    assert!(
        on_a.len() >= 5 && on_b.len() >= 5,
        "runs should be spread, got {} / {}",
        on_a.len(),
        on_b.len()
    );
}

#[test]
fn with_both_agents_full_the_third_run_is_rejected_upstream_and_completes_later() {
    let stack = Stack::start();
    let _agent_a = stack.agent("agent-a", &["--max-concurrent-tasks", "1"]);
    let _agent_b = stack.agent("agent-b", &["--max-concurrent-tasks", "1"]);

    let runs: Vec<String> = (0..3)
        .map(|i| stack.api.create(&format!("Sleep 2 seconds, run {i}")))
        .collect();
    stack
        .gateway
        .wait_for_log("No node can take the task; rejecting it", RUN_TIMEOUT);
    for run in &runs {
        stack.api.wait_for_state(run, "SUCCEEDED", RUN_TIMEOUT);
    }
    let rejected_runs: Vec<&String> = runs
        .iter()
        .filter(|run| {
            stack.gateway.log().lines().any(|line| {
                line.contains("No node can take the task") && line.contains(run.as_str())
            })
        })
        .collect();
    assert!(!rejected_runs.is_empty(), "{}", stack.gateway.log());
}

#[test]
fn failed_runs_carry_reason_and_exit_code_and_cancelled_runs_leave_no_process() {
    let stack = Stack::start();
    let _agent = stack.agent("agent-a", &[]);

    let failing = stack.api.create("Please fail with exit 3");
    let item = stack.api.wait_for_state(&failing, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "agent_invocation", "{item}");
    assert_eq!(item["exit_code"], 3, "{item}");
    assert_eq!(
        item["status_message"]["message"],
        "Failed to execute task: oz agent exited with error: exit status 3",
        "{item}"
    );

    let long = stack.api.create("Sleep 300 seconds");
    stack.api.wait_for_state(&long, "INPROGRESS", RUN_TIMEOUT);
    common::wait_until(Duration::from_secs(10), "the sleep child to start", || {
        processes_of_run(&long).len() >= 2
    });
    let (status, body) = stack.api.cancel(&long);
    assert_eq!(status, 200, "{body}");
    stack
        .api
        .wait_for_state(&long, "CANCELLED", Duration::from_secs(20));
    assert_eq!(processes_of_run(&long), Vec::<u32>::new());

    let (status, body) = stack.api.cancel(&long);
    assert_eq!(status, 400, "cancelling a terminal run: {body}");
}

#[test]
fn a_killed_agent_comes_back_with_the_same_node_identity() {
    let stack = Stack::start();
    let mut agent = stack.agent("agent-a", &[]);
    let state_file = stack.dir.path().join("agent-a-state").join("node-id");
    let node_id = std::fs::read_to_string(&state_file)
        .expect("node-id file")
        .trim()
        .to_owned();
    assert!(
        stack.gateway.log().contains(&node_id),
        "{}",
        stack.gateway.log()
    );

    agent.kill();
    stack
        .gateway
        .wait_for_log("Node disconnected", Duration::from_secs(20));
    let _agent = stack.agent("agent-a", &[]);
    let attaches = stack
        .gateway
        .log()
        .lines()
        .filter(|line| line.contains("Node attached") && line.contains(&node_id))
        .count();
    assert_eq!(attaches, 2, "{}", stack.gateway.log());
    let after = std::fs::read_to_string(&state_file).unwrap();
    assert_eq!(after.trim(), node_id);

    let run = stack.api.create("Say hello after the restart");
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);
}

#[test]
fn runs_survive_a_control_plane_restart() {
    let mut stack = Stack::start();
    let run = stack.api.create("Say hello");
    // No agent yet: the run stays queued.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stack.api.get(&run)["state"], "QUEUED");
    stack.restart_control_plane();
    assert_eq!(stack.api.get(&run)["state"], "QUEUED");
    let _agent = stack.agent("agent-a", &[]);
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);
    stack.assert_no_secrets_in_logs();
}

#[test]
fn dev_on_port_0_serves_and_reports_the_port_it_got() {
    let output = Command::new(common::ozfleet())
        .args(["dev", "--exit-after-demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ozfleet dev");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let control_plane = stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("control plane  http://127.0.0.1:"))
        .expect("the control plane's address");
    let port: u16 = control_plane
        .split_whitespace()
        .next()
        .and_then(|port| port.parse().ok())
        .expect("a port number");
    assert_ne!(port, 0, "{stdout}");
    assert!(
        stdout.contains("All demo runs ended as expected."),
        "{stdout}"
    );
}

#[test]
fn dev_runs_the_three_demos_to_their_expected_ends() {
    let stdout = common::run_dev_demos(&[]);
    assert!(
        stdout.contains("All demo runs ended as expected."),
        "{stdout}"
    );
    assert!(
        stdout.contains("SUCCEEDED") && stdout.contains("FAILED") && stdout.contains("CANCELLED")
    );
    assert!(
        stdout.contains("failure_reason = \"agent_invocation\", exit_code = 3"),
        "{stdout}"
    );
}

#[test]
fn even_trace_logging_keeps_credentials_out_of_the_log() {
    let (stdout, log) = common::run_dev_demos_logging(&[], "trace");
    assert!(
        stdout.contains("All demo runs ended as expected."),
        "{stdout}"
    );
    assert!(
        log.contains("DEBUG"),
        "the stack logged at debug level and below"
    );
    common::assert_no_credentials(&log, "ozfleet-dev-key");
}

#[test]
fn bad_configuration_fails_fast_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.yaml");
    std::fs::write(
        &config,
        "worker_id: edge\nbackend:\n  direct:\n    bogus_key: 1\n",
    )
    .unwrap();
    let output = Command::new(common::ozfleet())
        .args([
            "agent",
            "--config-file",
            config.to_str().unwrap(),
            "--join-token",
            "t",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("failed to parse config file"), "{stderr}");
    assert!(stderr.contains("bogus_key"), "{stderr}");

    let output = Command::new(common::ozfleet())
        .args([
            "gateway",
            "--worker-id",
            "warp-1",
            "--api-key",
            "k",
            "--join-token",
            "t",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "invalid worker-id: values starting with 'warp' are reserved and cannot be used"
        ),
        "{stderr}"
    );

    let output = Command::new(common::ozfleet())
        .args([
            "gateway",
            "--worker-id",
            "edge",
            "--join-token",
            "t",
            "--web-socket-url",
            "ws://127.0.0.1:1/ws",
        ])
        .env_remove("WARP_API_KEY")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--api-key"));
}

#[test]
fn a_docker_agent_without_a_daemon_fails_at_startup_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-daemon.sock");
    let output = Command::new(common::ozfleet())
        .args([
            "agent",
            "--backend",
            "docker",
            "--join-token",
            "t",
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
        ])
        .env("DOCKER_HOST", format!("unix://{}", socket.display()))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Failed to create worker"), "{stderr}");
    assert!(stderr.contains("failed to reach Docker daemon"), "{stderr}");
}

#[test]
fn setup_commands_cannot_see_the_join_token() {
    let stack = Stack::start();
    let dump = stack.dir.path().join("setup-env.txt");
    let config = stack.dir.path().join("worker.yaml");
    std::fs::write(
        &config,
        format!(
            "backend:\n  direct:\n    setup_command: env > {}\n",
            dump.display()
        ),
    )
    .unwrap();
    let _agent = stack.agent("agent-a", &["--config-file", config.to_str().unwrap()]);
    let run = stack.api.create("Say hello");
    stack.api.wait_for_state(&run, "SUCCEEDED", RUN_TIMEOUT);
    let env = std::fs::read_to_string(&dump).unwrap();
    assert!(env.contains(&format!("OZ_RUN_ID={run}")), "{env}");
    assert!(!env.contains("OZFLEET_JOIN_TOKEN"), "{env}");
    assert!(!env.contains(common::JOIN_TOKEN), "{env}");
}

#[test]
fn ops_can_inspect_the_gateway_with_grpcurl() {
    let stack = Stack::start();
    let address = format!("127.0.0.1:{}", stack.gateway_port);
    let run = |args: &[&str]| {
        let output = Command::new(grpcurl())
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("run grpcurl");
        assert!(
            output.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let services = run(&[&address, "list"]);
    for service in ["ozfleet.v1.NodeService", "grpc.health.v1.Health"] {
        assert!(services.contains(service), "{services}");
    }
    let described = run(&[&address, "describe", "ozfleet.v1.NodeService"]);
    assert!(described.contains("rpc Attach"), "{described}");
    let health = run(&[
        "-d",
        r#"{"service":"ozfleet.v1.NodeService"}"#,
        &address,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("SERVING"), "{health}");
}

#[test]
fn no_direct_task_process_outlives_a_killed_agent_and_the_run_is_reported_once() {
    let stack = Stack::start();
    let mut agent = stack.agent("agent-a", &[]);
    let run = stack.api.create("Sleep 300 seconds");
    stack.api.wait_for_state(&run, "INPROGRESS", RUN_TIMEOUT);
    common::wait_until(Duration::from_secs(10), "the sleep child to start", || {
        processes_of_run(&run).len() >= 2
    });
    // kill -9: the agent cannot clean up; the task shim sees its parent die and ends
    // the whole process group.
    agent.kill();
    common::wait_until(
        Duration::from_secs(20),
        "every process of the run to end with the agent",
        || processes_of_run(&run).is_empty(),
    );
    // Back with the same identity and without the task: the gateway reports it, once.
    let _agent = stack.agent("agent-a", &[]);
    let item = stack.api.wait_for_state(&run, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "unknown", "{item}");
    let reports = || {
        stack
            .gateway
            .log()
            .lines()
            .filter(|line| {
                line.contains(&run)
                    && (line.contains("Task lost") || line.contains("Task finished"))
            })
            .count()
    };
    // The gateway writes its log from a background thread: the line may trail the run's
    // state by a moment.
    common::wait_until(
        Duration::from_secs(5),
        "the gateway to log the run's end",
        || reports() >= 1,
    );
    assert_eq!(reports(), 1, "{}", stack.gateway.log());
    stack.assert_no_secrets_in_logs();
}

#[test]
fn a_gateway_killed_with_runs_in_flight_restarts_and_no_run_is_lost_or_run_twice() {
    let mut stack = Stack::start();
    let agent_a = stack.agent("agent-a", &[]);
    let agent_b = stack.agent("agent-b", &[]);
    let runs: Vec<String> = (0..20)
        .map(|i| stack.api.create(&format!("Sleep 3 seconds, run {i}")))
        .collect();
    common::wait_until(RUN_TIMEOUT, "some runs to be in progress", || {
        runs.iter()
            .filter(|run| stack.api.get(run)["state"] == "INPROGRESS")
            .count()
            >= 5
    });
    // kill -9 mid-flight: claims, outcomes and offers are cut wherever they are.
    stack.crash_and_restart_gateway();
    for run in &runs {
        let item = stack.api.wait_for_state(run, "SUCCEEDED", RUN_TIMEOUT);
        assert_eq!(item["state"], "SUCCEEDED", "{item}");
    }
    // Each run executed exactly once, on one agent.
    let logs = [agent_a.log(), agent_b.log()];
    for run in &runs {
        let executions: usize = logs
            .iter()
            .map(|log| {
                log.lines()
                    .filter(|line| line.contains("Task accepted") && line.contains(run.as_str()))
                    .count()
            })
            .sum();
        assert_eq!(executions, 1, "run {run} executed {executions} times");
    }
    stack.assert_no_secrets_in_logs();
}

#[test]
fn logs_can_be_json_lines_for_log_pipelines() {
    let output = Command::new(common::ozfleet())
        .args([
            "gateway",
            "--log-format",
            "json",
            "--worker-id",
            "w",
            "--web-socket-url",
            "not a url",
        ])
        .env("WARP_API_KEY", "k")
        .env("OZFLEET_JOIN_TOKEN", "j")
        .output()
        .expect("run the gateway");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let logged: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    assert!(
        logged.iter().any(|line| line["level"] == "ERROR"
            && line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("--web-socket-url"))),
        "{stderr}"
    );
}

#[test]
fn runs_completing_while_the_control_plane_restarts_are_each_reported_once() {
    let mut stack = Stack::start();
    let _agent = stack.agent("agent-a", &[]);
    let runs: Vec<String> = (0..10)
        .map(|i| stack.api.create(&format!("Sleep 2 seconds, run {i}")))
        .collect();
    common::wait_until(RUN_TIMEOUT, "the runs to be in progress", || {
        runs.iter()
            .all(|run| stack.api.get(run)["state"] == "INPROGRESS")
    });
    // The runs finish while Oz is away: their outcomes wait in the gateway's outbox.
    stack.restart_control_plane();
    for run in &runs {
        stack.api.wait_for_state(run, "SUCCEEDED", RUN_TIMEOUT);
    }
    let finished_lines = |run: &str| {
        stack
            .gateway
            .log()
            .lines()
            .filter(|line| line.contains(run) && line.contains("Task finished"))
            .count()
    };
    // The gateway writes its log in batches: a run can be SUCCEEDED before its line is out.
    common::wait_until(
        RUN_TIMEOUT,
        "every run's outcome in the gateway log",
        || runs.iter().all(|run| finished_lines(run) > 0),
    );
    for run in &runs {
        let relayed = finished_lines(run);
        assert_eq!(relayed, 1, "run {run} relayed {relayed} times");
    }
    stack.assert_no_secrets_in_logs();
}
