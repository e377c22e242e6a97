//! Fault injection against real processes (the guarantees' tests 4 and 6): a node
//! partitioned from a gateway process by a TCP proxy the test controls, and hostile input
//! from both sides of a gateway process, whose memory is measured from outside.

// The fake Oz and fake nodes of the gateway's own tests spawn their helper tasks freely;
// the test process is their owner and ends them.
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "../services/gateway/tests/common/mod.rs"]
mod gateway_harness;

use std::time::Duration;

use common::proxy::TcpProxy;
use common::{Proc, Stack, free_port, wait_until};
use gateway_harness::{
    FakeNode, FakeOz, OzMode, assign_and_claim, claimed_frame, hello, succeeded,
};
use ozfleet_proto::oz::WorkerMessage;
use ozfleet_proto::v1::node_service_client::NodeServiceClient;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Proves: a node cut off (no FIN, no RST) long enough for the gateway to give up on it
/// has its run reported failed exactly once; when the partition heals, the node's late
/// report of the run's true end is acknowledged but fenced (Oz hears nothing more of it),
/// and the node takes work again.
#[test]
fn a_partitioned_node_is_reported_once_and_its_late_report_is_fenced() {
    // Short timings so the test takes seconds, not the defaults' 80-100 s.
    let stack = Stack::start_with_args(
        &["--log-level", "debug"],
        &["--node-keepalive", "2s", "--node-lost-timeout", "4s"],
    );
    let proxy = TcpProxy::start(stack.gateway_address());
    let agent = stack.agent_via("agent-a", &proxy.url());
    let run = stack.api.create("Sleep 5 seconds");
    stack.api.wait_for_state(&run, "INPROGRESS", RUN_TIMEOUT);

    proxy.blackhole();
    // Only the gateway's keepalive can tell; then the node-lost timeout fails the run.
    let item = stack.api.wait_for_state(&run, "FAILED", RUN_TIMEOUT);
    assert_eq!(item["failure_reason"], "unknown", "{item}");
    // Meanwhile the task ends on the cut-off node; its outcome waits on the node's disk.
    wait_until(
        RUN_TIMEOUT,
        "the cut-off agent to hold the run's outcome",
        || stack.pending_outcomes("agent-a") == 1,
    );

    proxy.heal();
    // The node reconnects and re-sends the outcome; the gateway acknowledges it (the file
    // goes) without relaying it: the run stays failed.
    wait_until(
        RUN_TIMEOUT,
        "the gateway to acknowledge the late outcome",
        || stack.pending_outcomes("agent-a") == 0,
    );
    let after = stack.api.get(&run);
    assert_eq!(after["state"], "FAILED", "{after}");
    // Oz got one terminal report: the control plane (logging at debug) saw no repeat and
    // nothing it ignored for this run.
    let ignored: Vec<String> = stack
        .control_plane
        .log()
        .lines()
        .filter(|line| line.contains(run.as_str()) && line.contains("ignoring"))
        .map(str::to_owned)
        .collect();
    assert!(ignored.is_empty(), "{ignored:#?}");

    // The healed node takes and finishes new work.
    let next = stack.api.create("Say hello after the partition");
    stack.api.wait_for_state(&next, "SUCCEEDED", RUN_TIMEOUT);
    assert!(
        agent.log().contains(next.as_str()),
        "the new run ran elsewhere"
    );
    stack.assert_no_secrets_in_logs();
}

/// An `ozfleet gateway` process dialing `oz` and listening for nodes on `node_port`.
fn gateway_process(dir: &std::path::Path, oz: &FakeOz, node_port: u16) -> Proc {
    let listen = format!("127.0.0.1:{node_port}");
    let admin = format!("127.0.0.1:{}", free_port());
    let state = dir.join("gateway-state");
    Proc::spawn(
        "gateway",
        dir,
        &[
            "gateway",
            "--worker-id",
            gateway_harness::WORKER_ID,
            "--web-socket-url",
            &oz.url(""),
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[
            ("WARP_API_KEY", gateway_harness::API_KEY),
            ("OZFLEET_JOIN_TOKEN", gateway_harness::JOIN_TOKEN),
        ],
    )
}

/// Opens `streams` attach streams on one connection (HTTP/2 multiplexing) that never say
/// hello; each ends when the gateway gives up on it. Returns how each ended.
async fn hello_less_streams(url: String, streams: usize) -> Vec<tonic::Code> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("connect to the gateway");
    let mut calls = JoinSet::new();
    for _ in 0..streams {
        let mut client = NodeServiceClient::new(channel.clone());
        calls.spawn(async move {
            let mut request = tonic::Request::new(tokio_stream::pending());
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", gateway_harness::JOIN_TOKEN)
                    .parse()
                    .unwrap(),
            );
            match client.attach(request).await {
                Ok(_) => tonic::Code::Ok,
                Err(status) => status.code(),
            }
        });
    }
    calls.join_all().await
}

/// Proves: malformed and hostile input from Oz and from nodes (garbage, truncated,
/// binary and oversized frames, assignments without a task or with wrong types, a
/// duplicate, unknown cancellations, deep nesting, an assignment over the node link's
/// limit, forged outcomes, a 100,000-task hello, 2,000 streams that never say hello)
/// crashes nothing, loses no real task, and leaves the gateway process's memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_against_a_gateway_process_loses_nothing_and_keeps_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut oz = FakeOz::start(OzMode::Accept).await;
    let node_port = free_port();
    let mut gateway = gateway_process(dir.path(), &oz, node_port);
    let mut upstream = oz.next_connection().await;
    let node_url = format!("http://127.0.0.1:{node_port}");
    let listening = tokio::time::timeout(RUN_TIMEOUT, async {
        while tokio::net::TcpStream::connect(("127.0.0.1", node_port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    listening.await.expect("the gateway to listen for nodes");
    let mut node = FakeNode::attach_via(&node_url, hello("node-a")).await;
    assign_and_claim(&mut upstream, &mut node, "run-warm", "exec-warm").await;
    node.report(succeeded("run-warm", "exec-warm"));
    assert_eq!(upstream.recv().await, WorkerMessage::completed("run-warm"));
    assert_eq!(node.expect_ack().await.task_id, "run-warm");
    let baseline = gateway_harness::resident_bytes(&gateway.pid().to_string());

    // From Oz: frames that are not messages at all, or not the right ones.
    upstream.send(Message::binary(vec![0xff_u8, 0x00, 0x13, 0x37]));
    for frame in [
        "",
        "\u{0}\u{1}garbage",
        r#"{"type":"task_assign"#,
        "[1,2,3]",
        r#"{"type":"task_assignment"}"#,
        r#"{"type":"task_assignment","data":{"task_id":"no-task","execution_id":"e"}}"#,
        r#"{"type":"task_assignment","data":{"task_id":42,"execution_id":["e"],"task":"x"}}"#,
        r#"{"type":"task_cancellation","data":{"task_id":null}}"#,
        r#"{"type":"what_is_this","data":{}}"#,
    ] {
        upstream.send_text(frame);
    }
    for task in 0..200 {
        upstream.cancel(&format!("never-assigned-{task}"));
    }
    // Nested 100,000 levels deep in a field the gateway passes on: offered like any task
    // (the node refuses it; with no other node Oz gets a rejection).
    upstream.send_text(&format!(
        r#"{{"type":"task_assignment","data":{{"task_id":"deep","execution_id":"e","task":{{"id":"t"}},"x":{}{}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    ));
    let deep = node.expect_assignment().await;
    assert_eq!(deep.task_id, "deep");
    node.refuse(&deep, "not today");
    match upstream.recv().await {
        WorkerMessage::TaskRejected(rejected) => assert_eq!(rejected.task_id, "deep"),
        other => panic!("expected the refused task to be rejected, got {other:?}"),
    }
    // A duplicate assignment is offered once (the node's next offer, further down, is
    // another task). Oz may hear the claim twice: a repeat that arrives once the task
    // runs is answered with the claim again, in case Oz missed it.
    upstream.assign("run-dup", "exec-dup");
    upstream.assign("run-dup", "exec-dup");
    let dup = node.expect_assignment().await;
    node.accept(&dup);
    assert_eq!(upstream.recv_text().await, claimed_frame("run-dup"));
    node.report(succeeded("run-dup", "exec-dup"));
    loop {
        match upstream.recv().await {
            WorkerMessage::TaskClaimed(claimed) => assert_eq!(claimed.task_id, "run-dup"),
            completed => {
                assert_eq!(completed, WorkerMessage::completed("run-dup"));
                break;
            }
        }
    }
    assert_eq!(node.expect_ack().await.task_id, "run-dup");
    // Over the node link's limit: failed upstream, never offered.
    let huge_title = "t".repeat(ozfleet_gateway::fleet::MAX_ASSIGNMENT_BYTES);
    upstream.send_text(&format!(
        r#"{{"type":"task_assignment","data":{{"task_id":"huge","execution_id":"e","task":{{"id":"t","title":"{huge_title}"}}}}}}"#
    ));
    match upstream.recv().await {
        WorkerMessage::TaskFailed(failed) => {
            assert_eq!(failed.task_id, "huge");
            assert!(
                failed.message.contains("over the node link's limit"),
                "{}",
                failed.message
            );
        }
        other => panic!("expected the oversized task to fail, got {other:?}"),
    }

    // From nodes: outcomes for tasks never given are acknowledged and dropped.
    for forged in 0..50 {
        node.report(succeeded(&format!("forged-{forged}"), "exec"));
        assert_eq!(node.expect_ack().await.task_id, format!("forged-{forged}"));
    }
    // A hello announcing 100,000 tasks is refused.
    gateway_harness::assert_a_flood_hello_is_refused(&node_url).await;
    // 2,000 streams that never say hello, 4 per connection (the gateway's cap): while
    // they hang, real work flows; then each is ended by the gateway.
    let mut flood = JoinSet::new();
    for _ in 0..500 {
        flood.spawn(hello_less_streams(node_url.clone(), 4));
    }
    assign_and_claim(&mut upstream, &mut node, "run-during-flood", "exec-flood").await;
    node.report(succeeded("run-during-flood", "exec-flood"));
    assert_eq!(
        upstream.recv().await,
        WorkerMessage::completed("run-during-flood")
    );
    assert_eq!(node.expect_ack().await.task_id, "run-during-flood");
    // Each stream ends at the gateway's 10 s hello timeout; a minute is a generous bound.
    let ended: Vec<tonic::Code> = tokio::time::timeout(RUN_TIMEOUT, flood.join_all())
        .await
        .expect("the gateway to end every stream that never said hello")
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(ended.len(), 2_000);
    assert!(
        ended.iter().all(|code| *code != tonic::Code::Ok),
        "a stream without a hello was served"
    );

    // A frame over the WebSocket limit ends that connection; the gateway dials again.
    upstream.send_text(&"x".repeat(ozfleet_gateway::upstream::MAX_WEBSOCKET_MESSAGE_BYTES + 1));
    let mut upstream = oz.next_connection().await;

    // Real work still flows, nothing hostile was relayed, and the process is alive with
    // its memory bounded.
    assign_and_claim(&mut upstream, &mut node, "run-ok", "exec-ok").await;
    node.report(succeeded("run-ok", "exec-ok"));
    assert_eq!(upstream.recv().await, WorkerMessage::completed("run-ok"));
    assert_eq!(node.expect_ack().await.task_id, "run-ok");
    upstream.expect_quiet().await;
    assert!(gateway.is_running(), "{}", gateway.log());
    let grown =
        gateway_harness::resident_bytes(&gateway.pid().to_string()).saturating_sub(baseline);
    eprintln!(
        "gateway RSS: {} MiB before the hostile input, grown by {} MiB",
        baseline / (1024 * 1024),
        grown / (1024 * 1024)
    );
    assert!(
        grown < 64 * 1024 * 1024,
        "hostile input ratcheted the gateway's memory up by {} MiB",
        grown / (1024 * 1024)
    );
    let log = gateway.log();
    for secret in [
        gateway_harness::API_KEY,
        gateway_harness::JOIN_TOKEN,
        "secret-run-",
    ] {
        assert!(!log.contains(secret), "{secret} is in the gateway's log");
    }
}
