//! End to end for operators: real `grpcurl` and the `ozfleet` CLI against a real gateway
//! with real node agents and control plane, each its own process on loopback.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Stack, accepted_task_ids, grpcurl, wait_until};
use ozfleet::processes_of_run;
use serde_json::Value;

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const ADMIN_TOKEN: &str = "e2e-admin-token";

/// grpcurl against the stack's admin API: `grpcurl -plaintext OPTIONS ADDRESS VERB…`,
/// where `args` are the options then, last, the method (or `list` / `describe SYMBOL`).
fn grpcurl_admin(stack: &Stack, args: &[&str]) -> (bool, String, String) {
    let address = format!("127.0.0.1:{}", stack.admin_port);
    let verb_at = match args {
        ["list", ..] | ["describe", ..] => 0,
        _ => args.len().saturating_sub(1),
    };
    let (options, verb) = args.split_at(verb_at);
    let mut command = Command::new(grpcurl());
    command
        .arg("-plaintext")
        .args(options)
        .arg(&address)
        .args(verb);
    let output = command.output().expect("run grpcurl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A successful grpcurl call whose output is JSON.
fn call(stack: &Stack, args: &[&str]) -> Value {
    let (ok, stdout, stderr) = grpcurl_admin(stack, args);
    assert!(ok, "grpcurl {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

fn rpc(name: &str) -> String {
    format!("ozfleet.v1.AdminService/{name}")
}

fn health(stack: &Stack, service: &str) -> String {
    let request = format!(r#"{{"service":"{service}"}}"#);
    let (ok, stdout, stderr) =
        grpcurl_admin(stack, &["-d", &request, "grpc.health.v1.Health/Check"]);
    assert!(ok, "health check of {service:?}: {stderr}");
    stdout
}

#[test]
fn grpcurl_lists_describes_and_calls_every_admin_rpc() {
    let stack = Stack::start();
    let _agent = stack.agent("agent-a", &[]);
    let node_id = stack.node_id("agent-a");

    let (ok, services, stderr) = grpcurl_admin(&stack, &["list"]);
    assert!(ok, "{stderr}");
    for service in [
        "ozfleet.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(service), "{services}");
    }
    let (ok, described, stderr) = grpcurl_admin(&stack, &["describe", "ozfleet.v1.AdminService"]);
    assert!(ok, "{stderr}");
    for method in [
        "GetFleet",
        "ListNodes",
        "GetNode",
        "ListTasks",
        "GetTask",
        "CancelTask",
        "DrainNode",
        "UndrainNode",
        "WatchEvents",
    ] {
        assert!(described.contains(&format!("rpc {method}")), "{described}");
    }

    let fleet = call(&stack, &[&rpc("GetFleet")]);
    assert_eq!(fleet["workerId"], common::WORKER_ID, "{fleet}");
    assert_eq!(fleet["upstreamConnected"], true, "{fleet}");
    assert_eq!(fleet["nodesConnected"], 1, "{fleet}");
    assert_eq!(fleet["capacityUnlimited"], true, "{fleet}");

    let nodes = call(&stack, &[&rpc("ListNodes")]);
    assert_eq!(nodes["nodes"][0]["nodeId"], node_id.as_str(), "{nodes}");
    assert_eq!(nodes["nodes"][0]["name"], "agent-a", "{nodes}");
    assert_eq!(nodes["nodes"][0]["state"], "NODE_STATE_READY", "{nodes}");
    assert_eq!(
        nodes["nodes"][0]["backend"], "BACKEND_KIND_DIRECT",
        "{nodes}"
    );
    let by_id = format!(r#"{{"node_id":"{node_id}"}}"#);
    let node = call(&stack, &["-d", &by_id, &rpc("GetNode")]);
    assert_eq!(node["node"]["nodeId"], node_id.as_str(), "{node}");
    let (ok, _, stderr) = grpcurl_admin(&stack, &["-d", r#"{"node_id":"nope"}"#, &rpc("GetNode")]);
    assert!(
        !ok && stderr.contains("NotFound") && stderr.contains("nope"),
        "{stderr}"
    );

    // Events, watched while the rest happens.
    let watch_log = stack.dir.path().join("watch.jsonl");
    let mut watcher = Command::new(grpcurl())
        .args(["-plaintext", "-max-time", "60"])
        .arg(format!("127.0.0.1:{}", stack.admin_port))
        .arg(rpc("WatchEvents"))
        .stdout(std::fs::File::create(&watch_log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("start grpcurl WatchEvents");

    // Drain and undrain until the watcher has seen it: from then on it sees everything.
    wait_until(Duration::from_secs(20), "the watcher to subscribe", || {
        let drained = call(&stack, &["-d", &by_id, &rpc("DrainNode")]);
        assert_eq!(drained["node"]["state"], "NODE_STATE_DRAINING", "{drained}");
        let undrained = call(&stack, &["-d", &by_id, &rpc("UndrainNode")]);
        assert_eq!(
            undrained["node"]["state"], "NODE_STATE_READY",
            "{undrained}"
        );
        std::fs::read_to_string(&watch_log).is_ok_and(|log| log.contains("node_undrained"))
    });

    let run = stack.api.create("Sleep 300 seconds");
    stack.api.wait_for_state(&run, "INPROGRESS", RUN_TIMEOUT);
    let running = call(
        &stack,
        &["-d", r#"{"state":"TASK_STATE_RUNNING"}"#, &rpc("ListTasks")],
    );
    assert_eq!(running["tasks"][0]["taskId"], run.as_str(), "{running}");
    assert_eq!(running["tasks"][0]["nodeId"], node_id.as_str(), "{running}");
    let offered = call(
        &stack,
        &["-d", r#"{"state":"TASK_STATE_OFFERED"}"#, &rpc("ListTasks")],
    );
    assert!(offered.get("tasks").is_none(), "{offered}");
    let by_task = format!(r#"{{"task_id":"{run}"}}"#);
    let task = call(&stack, &["-d", &by_task, &rpc("GetTask")]);
    assert_eq!(task["task"]["state"], "TASK_STATE_RUNNING", "{task}");

    let drained = call(&stack, &["-d", &by_id, &rpc("DrainNode")]);
    assert_eq!(drained["node"]["state"], "NODE_STATE_DRAINING", "{drained}");
    let undrained = call(&stack, &["-d", &by_id, &rpc("UndrainNode")]);
    assert_eq!(
        undrained["node"]["state"], "NODE_STATE_READY",
        "{undrained}"
    );

    common::wait_until(Duration::from_secs(10), "the sleep child to start", || {
        processes_of_run(&run).len() >= 2
    });
    let cancelled = call(&stack, &["-d", &by_task, &rpc("CancelTask")]);
    assert_eq!(cancelled["task"]["cancelRequested"], true, "{cancelled}");
    let item = stack.api.wait_for_state(&run, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "task_cancelled", "{item}");
    assert!(
        item["status_message"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("operator")),
        "{item}"
    );
    assert_eq!(processes_of_run(&run), Vec::<u32>::new());

    wait_until(
        Duration::from_secs(20),
        "the watcher to see the task end",
        || std::fs::read_to_string(&watch_log).is_ok_and(|log| log.contains("outcome_relayed")),
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    let watched = std::fs::read_to_string(&watch_log).unwrap();
    for kind in [
        "task_offered",
        "task_claimed",
        "node_draining",
        "node_undrained",
        "task_cancel_requested",
        "task_finished",
    ] {
        assert!(
            watched.contains(&format!("\"{kind}\"")),
            "{kind}: {watched}"
        );
    }
    assert!(watched.contains(&run), "{watched}");
    assert!(watched.contains("failed: task_cancelled"), "{watched}");
}

#[test]
fn a_drained_node_gets_no_new_tasks_also_after_its_agent_restarts() {
    let stack = Stack::start();
    let mut agent_a = stack.agent("agent-a", &[]);
    let agent_b = stack.agent("agent-b", &[]);
    let node_a = stack.node_id("agent-a");

    let (ok, stdout, stderr) = stack.cli(&["drain", &node_a], &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("draining"), "{stdout}");

    let first: Vec<String> = (0..4)
        .map(|i| stack.api.create(&format!("Say hello, run {i}")))
        .collect();
    for run in &first {
        stack.api.wait_for_state(run, "SUCCEEDED", RUN_TIMEOUT);
    }
    assert!(
        accepted_task_ids(&agent_a.log()).is_empty(),
        "{}",
        agent_a.log()
    );
    assert_eq!(accepted_task_ids(&agent_b.log()).len(), 4);

    // The agent restarts: the drain stays.
    agent_a.kill();
    stack
        .gateway
        .wait_for_log("Node disconnected", Duration::from_secs(20));
    let (ok, stdout, stderr) = stack.cli(&["nodes", "--output", "json"], &[]);
    assert!(ok, "{stderr}");
    let nodes: Value = serde_json::from_str(&stdout).unwrap();
    let away = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["node_id"] == node_a.as_str())
        .expect("node-a is still listed");
    assert_eq!(away["state"], "disconnected", "{away}");
    assert_eq!(away["draining"], true, "{away}");

    let agent_a = stack.agent("agent-a", &[]);
    let (ok, stdout, stderr) = stack.cli(&["nodes", "--output", "json"], &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#""state":"draining""#), "{stdout}");
    let second: Vec<String> = (0..2)
        .map(|i| stack.api.create(&format!("Say hello again, run {i}")))
        .collect();
    for run in &second {
        stack.api.wait_for_state(run, "SUCCEEDED", RUN_TIMEOUT);
    }
    assert!(
        accepted_task_ids(&agent_a.log()).is_empty(),
        "{}",
        agent_a.log()
    );

    // Undrained, the idle node is the least loaded again.
    let (ok, _, stderr) = stack.cli(&["undrain", &node_a], &[]);
    assert!(ok, "{stderr}");
    let third = stack.api.create("Sleep 1 seconds");
    stack.api.wait_for_state(&third, "SUCCEEDED", RUN_TIMEOUT);
    assert!(
        accepted_task_ids(&agent_a.log()).contains(&third),
        "the never-used node wins the tie: {}",
        agent_a.log()
    );
    let (ok, stdout, stderr) = stack.cli(&["tasks", "--output", "json"], &[]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "[]", "nothing runs any more");
    let (ok, _, stderr) = stack.cli(&["drain", "no-such-node"], &[]);
    assert!(!ok && stderr.contains("no-such-node"), "{stderr}");
}

#[test]
fn readiness_follows_the_upstream_and_the_nodes_and_liveness_stays_serving() {
    let mut stack = Stack::start();
    assert!(health(&stack, "").contains("NOT_SERVING"), "no node yet");
    assert!(health(&stack, "liveness").contains("\"SERVING\""));
    let _agent = stack.agent("agent-a", &[]);
    wait_until(Duration::from_secs(10), "readiness with a node", || {
        health(&stack, "").contains("\"SERVING\"")
    });

    // The upstream drops (the control plane stops) and comes back.
    stack
        .control_plane
        .terminate(Duration::from_secs(10))
        .expect("control plane exits on SIGTERM");
    wait_until(
        Duration::from_secs(20),
        "readiness to drop with the upstream",
        || health(&stack, "").contains("NOT_SERVING"),
    );
    assert!(health(&stack, "liveness").contains("\"SERVING\""));
    let (ok, stdout, stderr) = stack.cli(&["status"], &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("DISCONNECTED"), "{stdout}");
    stack.restart_control_plane();
    wait_until(Duration::from_secs(30), "readiness to return", || {
        health(&stack, "").contains("\"SERVING\"")
    });
    let (ok, stdout, stderr) = stack.cli(&["status"], &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("upstream (Oz)  connected"), "{stdout}");
}

#[test]
fn with_an_admin_token_every_admin_call_needs_it_but_health_does_not() {
    let stack = Stack::start_full(&[], &[("OZFLEET_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let (ok, _, stderr) = grpcurl_admin(&stack, &[&rpc("GetFleet")]);
    assert!(!ok && stderr.contains("Unauthenticated"), "{stderr}");
    let (ok, _, stderr) = grpcurl_admin(
        &stack,
        &["-H", "authorization: Bearer wrong", &rpc("GetFleet")],
    );
    assert!(!ok && stderr.contains("invalid admin token"), "{stderr}");
    let bearer = format!("authorization: Bearer {ADMIN_TOKEN}");
    let fleet = call(&stack, &["-H", &bearer, &rpc("GetFleet")]);
    assert_eq!(fleet["upstreamConnected"], true, "{fleet}");
    assert!(health(&stack, "liveness").contains("SERVING"));

    let (ok, _, stderr) = stack.cli(&["status"], &[]);
    assert!(
        !ok && stderr.contains("refused the admin token"),
        "{stderr}"
    );
    let token_file = stack.dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let (ok, stdout, stderr) = stack.cli(
        &["status", "--admin-token-file", token_file.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains(common::WORKER_ID), "{stdout}");
    let (ok, _, stderr) = stack.cli(&["nodes"], &[("OZFLEET_ADMIN_TOKEN", ADMIN_TOKEN)]);
    assert!(ok, "{stderr}");
    for log in [stack.gateway.log(), stderr] {
        assert!(!log.contains(ADMIN_TOKEN), "the token leaked: {log}");
    }
}

#[test]
fn an_admin_api_off_loopback_without_a_token_is_refused_at_startup() {
    let output = Command::new(common::ozfleet())
        .args([
            "gateway",
            "--worker-id",
            "w",
            "--admin-listen",
            "0.0.0.0:7071",
        ])
        .env("WARP_API_KEY", "k")
        .env("OZFLEET_JOIN_TOKEN", "j")
        .env_remove("OZFLEET_ADMIN_TOKEN")
        .output()
        .expect("run the gateway");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--admin-listen 0.0.0.0:7071"), "{stderr}");
    assert!(stderr.contains("OZFLEET_ADMIN_TOKEN"), "{stderr}");
}

#[test]
fn an_unreachable_gateway_is_named_by_the_cli() {
    let port = common::free_port();
    let output = Command::new(common::ozfleet())
        .args(["nodes", "--admin", &format!("127.0.0.1:{port}")])
        .output()
        .expect("run the CLI");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the gateway's admin API"),
        "{stderr}"
    );
}

#[test]
fn a_node_agent_serves_health_that_follows_its_attachment() {
    let mut stack = Stack::start();
    let port = common::free_port();
    let address = format!("127.0.0.1:{port}");
    let _agent = stack.agent("agent-a", &["--health-listen", &address]);
    let check = |service: &str| {
        let output = Command::new(grpcurl())
            .args(["-plaintext", "-d", &format!(r#"{{"service":"{service}"}}"#)])
            .arg(&address)
            .arg("grpc.health.v1.Health/Check")
            .output()
            .expect("run grpcurl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    wait_until(
        Duration::from_secs(20),
        "the attached agent to be ready",
        || check("").contains("\"SERVING\""),
    );
    assert!(check("liveness").contains("\"SERVING\""));
    // The gateway goes away: the agent is alive but not ready.
    stack.gateway.kill();
    wait_until(Duration::from_secs(20), "readiness to drop", || {
        check("").contains("NOT_SERVING")
    });
    assert!(check("liveness").contains("\"SERVING\""));
}
