//! End-to-end tests of the gateway: a fake Oz on one side, fake node agents on the other,
//! `ozfleet_gateway::run` in between, everything on loopback.
#![expect(
    clippy::disallowed_methods,
    reason = "test fakes (Oz, proxies, relays, the gateway under test) serve in tasks that end with the test's runtime"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ozfleet_proto::oz::{self, WorkerMessage};
use ozfleet_proto::v1::{self, NodeHello, attach_request, attach_response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Waits for an assignment on either node; returns 0 for `a`, 1 for `b`.
async fn assignment_on_either(a: &mut FakeNode, b: &mut FakeNode) -> (usize, v1::TaskAssignment) {
    let (index, kind) = tokio::select! {
        kind = a.recv() => (0, kind),
        kind = b.recv() => (1, kind),
    };
    match kind {
        attach_response::Kind::Assignment(assignment) => (index, assignment),
        other => panic!("expected an assignment on either node, got {other:?}"),
    }
}

/// `(chosen, other)` for an index returned by [`assignment_on_either`].
fn chosen<'a>(
    a: &'a mut FakeNode,
    b: &'a mut FakeNode,
    index: usize,
) -> (&'a mut FakeNode, &'a mut FakeNode) {
    if index == 0 { (a, b) } else { (b, a) }
}

fn completed_frame(task_id: &str) -> String {
    format!(
        r#"{{"type":"task_completed","data":{{"task_id":"{task_id}","message":"Task completed successfully"}}}}"#
    )
}

fn rejected_frame(task_id: &str) -> String {
    format!(
        r#"{{"type":"task_rejected","data":{{"task_id":"{task_id}","reason":"worker at maximum concurrency"}}}}"#
    )
}

// ---- 1. handshake --------------------------------------------------------------------

#[tokio::test]
async fn handshake_carries_bearer_key_and_worker_id_and_keeps_other_query_parameters() {
    let mut oz = FakeOz::start(OzMode::Accept).await;
    let _gateway = TestGateway::start(GatewayOptions::new(
        oz.url("?region=eu-west&worker_id=stale&a=x+y"),
    ))
    .await;
    let _upstream = oz.next_connection().await;

    let handshakes = oz.handshakes();
    assert_eq!(handshakes.len(), 1, "{handshakes:?}");
    let handshake = &handshakes[0];
    assert_eq!(
        handshake.authorization.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str())
    );

    let url = url::Url::parse(&format!("ws://oz.test{}", handshake.uri)).unwrap();
    assert_eq!(url.path(), oz::WORKER_WEB_SOCKET_PATH);
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    // worker_id replaced (not duplicated), the others kept, keys sorted like Go's Encode.
    assert_eq!(
        pairs,
        vec![
            ("a".to_owned(), "x y".to_owned()),
            ("region".to_owned(), "eu-west".to_owned()),
            ("worker_id".to_owned(), WORKER_ID.to_owned()),
        ],
        "{}",
        handshake.uri
    );
}

// ---- 2. relay of assignment, claim and outcomes --------------------------------------

#[tokio::test]
async fn assignment_reaches_the_node_verbatim_and_acceptance_claims_it() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;

    let data = upstream.assign("run-1", "exec-1");
    let assignment = node.expect_assignment().await;
    assert_eq!(assignment.task_id, "run-1");
    assert_eq!(assignment.execution_id, "exec-1");
    assert_eq!(
        assignment.oz_assignment_json, data,
        "the Oz data object must be relayed byte for byte"
    );
    let settings = assignment
        .settings
        .clone()
        .expect("settings are sent with every assignment");
    assert_eq!(settings.server_root_url, SERVER_ROOT_URL);
    assert_eq!(settings.worker_id, WORKER_ID);

    // Nothing goes upstream before the node accepts.
    upstream.expect_quiet().await;
    node.accept(&assignment);
    assert_eq!(
        upstream.recv_text().await,
        r#"{"type":"task_claimed","data":{"task_id":"run-1","worker_id":"gw-test-1"}}"#
    );

    node.report(succeeded("run-1", "exec-1"));
    assert_eq!(upstream.recv_text().await, completed_frame("run-1"));
    let ack = node.expect_ack().await;
    assert_eq!(
        (ack.task_id.as_str(), ack.execution_id.as_str()),
        ("run-1", "exec-1")
    );
}

#[tokio::test]
async fn failed_and_cancelled_outcomes_are_relayed_with_their_fields_and_acknowledged() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-f", "exec-f").await;
    assign_and_claim(&mut upstream, &mut node, "run-c", "exec-c").await;

    let message = "Failed to execute task: agent exited with status 3 <oops> & more";
    node.report(failed("run-f", "exec-f", "agent_invocation", 3, message));
    let text = upstream.recv_text().await;
    assert_eq!(
        oz::parse_worker_message(&text).unwrap(),
        WorkerMessage::TaskFailed(oz::TaskFailed {
            task_id: "run-f".into(),
            message: message.into(),
            failure_reason: "agent_invocation".into(),
            exit_code: Some(3),
        })
    );
    assert!(
        text.contains(r#"\u003coops\u003e \u0026 more"#),
        "Go-style escaping expected: {text}"
    );
    let ack = node.expect_ack().await;
    assert_eq!(
        (ack.task_id.as_str(), ack.execution_id.as_str()),
        ("run-f", "exec-f")
    );

    node.report(cancelled("run-c", "exec-c"));
    assert_eq!(
        upstream.recv_text().await,
        r#"{"type":"task_completed","data":{"task_id":"run-c","message":"Task cancelled by user request.","task_state":"CANCELLED"}}"#
    );
    let ack = node.expect_ack().await;
    assert_eq!(
        (ack.task_id.as_str(), ack.execution_id.as_str()),
        ("run-c", "exec-c")
    );
}

// ---- 3. rejection --------------------------------------------------------------------

#[tokio::test]
async fn without_any_node_the_task_is_rejected_at_capacity() {
    let (_oz, _gateway, mut upstream) = start_connected().await;
    upstream.assign("run-1", "exec-1");
    assert_eq!(upstream.recv_text().await, rejected_frame("run-1"));
}

#[tokio::test]
async fn a_fleet_at_capacity_rejects_and_takes_work_again_once_a_slot_frees() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach(
        &gateway,
        NodeHello {
            max_concurrent_tasks: 1,
            ..hello("node-a")
        },
    )
    .await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;

    upstream.assign("run-2", "exec-2");
    assert_eq!(upstream.recv_text().await, rejected_frame("run-2"));

    // The slot frees up: the next task is placed again, and the node never saw run-2
    // (its next messages are the ack and then run-3).
    node.report(succeeded("run-1", "exec-1"));
    assert_eq!(upstream.recv_text().await, completed_frame("run-1"));
    assert_eq!(node.expect_ack().await.task_id, "run-1");
    assign_and_claim(&mut upstream, &mut node, "run-3", "exec-3").await;
}

// ---- 4. refusals ---------------------------------------------------------------------

#[tokio::test]
async fn a_refused_task_goes_to_the_other_node_and_is_rejected_when_all_refuse() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut a = FakeNode::attach_id(&gateway, "node-a").await;
    let mut b = FakeNode::attach_id(&gateway, "node-b").await;

    // One refuses, the other accepts.
    let data = upstream.assign("run-1", "exec-1");
    let (first, assignment) = assignment_on_either(&mut a, &mut b).await;
    let (refuser, other) = chosen(&mut a, &mut b, first);
    refuser.refuse(&assignment, "node at maximum concurrency");
    let second = other.expect_assignment().await;
    assert_eq!(second.task_id, "run-1");
    assert_eq!(second.oz_assignment_json, data);
    other.accept(&second);
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));

    // Both refuse.
    upstream.assign("run-2", "exec-2");
    let (first, assignment) = assignment_on_either(&mut a, &mut b).await;
    let (refuser, other) = chosen(&mut a, &mut b, first);
    refuser.refuse(&assignment, "busy");
    let second = other.expect_assignment().await;
    assert_eq!(second.task_id, "run-2");
    other.refuse(&second, "busy");
    assert_eq!(upstream.recv_text().await, rejected_frame("run-2"));
    // Neither node is asked again.
    a.expect_quiet().await;
    b.expect_quiet().await;
}

// ---- 5. spreading --------------------------------------------------------------------

#[tokio::test]
async fn ten_tasks_spread_five_and_five_over_two_nodes() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut a = FakeNode::attach_id(&gateway, "node-a").await;
    let mut b = FakeNode::attach_id(&gateway, "node-b").await;

    let mut per_node = [0usize; 2];
    for i in 0..10 {
        let task_id = format!("run-{i}");
        upstream.assign(&task_id, &format!("exec-{i}"));
        let (index, assignment) = assignment_on_either(&mut a, &mut b).await;
        assert_eq!(assignment.task_id, task_id);
        let (node, _) = chosen(&mut a, &mut b, index);
        node.accept(&assignment);
        assert_eq!(upstream.recv_text().await, claimed_frame(&task_id));
        per_node[index] += 1;
    }
    assert_eq!(per_node, [5, 5]);
}

// ---- 6. duplicate assignment ---------------------------------------------------------

#[tokio::test]
async fn a_duplicate_assignment_is_not_offered_twice() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;

    upstream.assign("run-1", "exec-1");
    let assignment = node.expect_assignment().await;
    // Again while the offer is pending (same and another execution), and after the claim.
    upstream.assign("run-1", "exec-1");
    upstream.assign("run-1", "exec-other");
    node.accept(&assignment);
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));
    // Once it runs, a repeated assignment (Oz did not see the claim) is answered with the
    // claim again; the running execution carries on and no second one starts.
    upstream.assign("run-1", "exec-1");
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));

    // Barrier: the node's next message is run-2, and Oz's next one its claim, so nothing
    // else was sent for the duplicates (no second offer, no rejection).
    assign_and_claim(&mut upstream, &mut node, "run-2", "exec-2").await;
}

// ---- 7. cancellation -----------------------------------------------------------------

#[tokio::test]
async fn cancellation_reaches_the_node_holding_the_task_and_unknown_ones_are_ignored() {
    let (oz, gateway, mut upstream) = start_connected().await;
    let mut a = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut a, "run-1", "exec-1").await;
    let mut b = FakeNode::attach_id(&gateway, "node-b").await;

    upstream.cancel("no-such-task");
    upstream.cancel("run-1");
    // node-a's next message is the cancellation of run-1, with its execution.
    let cancellation = a.expect_cancellation().await;
    assert_eq!(cancellation.task_id, "run-1");
    assert_eq!(cancellation.execution_id, "exec-1");
    // node-b got nothing: its next message is the next task (it is the less loaded node).
    assign_and_claim(&mut upstream, &mut b, "run-2", "exec-2").await;
    assert_eq!(oz.handshake_count(), 1, "the gateway must stay connected");

    a.report(cancelled("run-1", "exec-1"));
    let message = upstream.recv().await;
    assert_eq!(message, WorkerMessage::cancelled("run-1"));
}

// ---- 8. bad frames -------------------------------------------------------------------

#[tokio::test]
async fn bad_frames_from_oz_are_ignored_and_the_connection_keeps_working() {
    let (oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;

    let bad = [
        "this is not json",
        "",
        "[1,2,3]",
        r#"{"type":"task_exploded","data":{"task_id":"bad-0"}}"#,
        r#"{"type":"heartbeat"}"#,
        r#"{"type":"heartbeat","data":{}}"#,
        r#"{"type":"task_assignment"}"#,
        r#"{"type":"task_assignment","data":null}"#,
        r#"{"type":"task_assignment","data":{"task_id":"bad-1"}}"#,
        r#"{"type":"task_assignment","data":{"task_id":"bad-2","task":null}}"#,
        r#"{"type":"task_assignment","data":{"task_id":42,"task":{}}}"#,
        r#"{"type":"task_assignment","data":{"task_id":"bad-3","task":{"title":7}}}"#,
        r#"{"type":"task_assignment","data":{"task_id":"bad-4","task":{},"env_vars":["x"]}}"#,
        r#"{"type":"task_assignment","data":{"task_id":"","task":{}}}"#,
        r#"{"type":"task_assignment","data":{"task_id":"bad-5","task":{}}"#,
        r#"{"type":"task_cancellation","data":{"task_id":5}}"#,
        r#"{"type":"task_cancellation"}"#,
    ];
    for frame in bad {
        upstream.send_text(frame);
    }
    // A binary frame is not a message, even when it holds a valid assignment.
    let valid_in_binary = r#"{"type":"task_assignment","data":{"task_id":"bad-bin","task":{}}}"#;
    upstream.send(Message::binary(valid_in_binary.as_bytes().to_vec()));

    // The first thing the node sees is the valid assignment sent after all of them, and
    // the first thing Oz gets is its claim (no rejection for any bad frame).
    assign_and_claim(&mut upstream, &mut node, "run-ok", "exec-ok").await;
    assert_eq!(
        oz.handshake_count(),
        1,
        "the gateway must not have reconnected"
    );
}

// ---- 9. outbox across reconnects -----------------------------------------------------

#[tokio::test]
async fn outcomes_reported_while_oz_is_unreachable_are_sent_after_reconnecting() {
    let (mut oz, gateway, mut upstream) = start_connected_with(|options| {
        // Reconnect at once after a lost connection: the test controls the outage.
        options.keepalive.stable_after = Duration::ZERO;
    })
    .await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;
    assign_and_claim(&mut upstream, &mut node, "run-2", "exec-2").await;

    // Oz goes down: the connection drops and the next handshake is refused.
    oz.set_mode(OzMode::Reject);
    upstream.drop_connection();
    assert!(
        eventually(WAIT, || oz.handshake_count() >= 2).await,
        "the gateway did not try to reconnect"
    );

    // Outcomes while disconnected.
    node.report(succeeded("run-1", "exec-1"));
    node.report(failed(
        "run-2",
        "exec-2",
        "container_exit",
        137,
        "Failed to execute task: killed",
    ));
    // Not written to Oz yet, so not acknowledged: the node must keep them.
    node.expect_quiet().await;

    oz.set_mode(OzMode::Accept);
    let mut upstream = oz.next_connection().await;
    assert_eq!(upstream.recv_text().await, completed_frame("run-1"));
    assert_eq!(
        upstream.recv().await,
        WorkerMessage::failed(
            "run-2",
            oz::FailureReason::ContainerExit,
            "Failed to execute task: killed".into(),
            137
        )
    );
    let last = oz.handshakes().pop().unwrap();
    assert_eq!(
        last.authorization.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    assert!(
        last.uri.ends_with(&format!("worker_id={WORKER_ID}")),
        "{}",
        last.uri
    );
    // Sent once: nothing else follows; and now the node has its acknowledgements.
    upstream.expect_quiet().await;
    let mut acked = vec![
        node.expect_ack().await.task_id,
        node.expect_ack().await.task_id,
    ];
    acked.sort();
    assert_eq!(acked, ["run-1", "run-2"]);
}

// ---- silent node death ----------------------------------------------------------------

/// Copies `from` to `to` until `frozen` is set; then reads and discards, keeping the
/// connection open.
async fn relay_half(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            return;
        }
        if !frozen.load(Ordering::SeqCst) && to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A TCP relay in front of the gateway that can be frozen: it then drops every byte in
/// both directions but keeps the connections open, like a host that lost power or a
/// firewall that silently discards a flow.
async fn start_freezable_relay(
    target: std::net::SocketAddr,
) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(relay_half(client_read, server_write, flag.clone()));
            tokio::spawn(relay_half(server_read, client_write, flag.clone()));
        }
    });
    (format!("http://{address}"), frozen)
}

#[tokio::test]
async fn a_node_that_goes_silent_is_detected_and_its_tasks_reported_lost() {
    let (_oz, gateway, mut upstream) = start_connected_with(|options| {
        options.timings.node_keepalive = Duration::from_millis(300);
        options.timings.node_lost_timeout = Duration::from_millis(500);
    })
    .await;
    let (relay_url, frozen) = start_freezable_relay(gateway.node_addr).await;
    let mut node = FakeNode::attach_via(&relay_url, hello("node-a")).await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;

    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    // No FIN, no RST: only the keepalive can tell. Then the node-lost timeout fails the task.
    match tokio::time::timeout(Duration::from_secs(5), upstream.recv()).await {
        Ok(WorkerMessage::TaskFailed(failed)) => {
            assert_eq!(failed.task_id, "run-1");
            assert_eq!(failed.failure_reason, "unknown");
        }
        other => panic!("expected the task to be reported lost, got {other:?}"),
    }
    // The partition heals: the stale node's late report (the task did finish) is fenced,
    // Oz heard about run-1 once.
    frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    drop(node);
    let returning = NodeHello {
        unacknowledged_outcomes: vec![succeeded("run-1", "exec-1")],
        ..hello("node-a")
    };
    let mut node = FakeNode::attach_via(&relay_url, returning).await;
    assert_eq!(
        node.expect_ack().await.task_id,
        "run-1",
        "acknowledged, not relayed"
    );
    // Barrier: Oz's next message is the claim of a new task, not a second report of run-1.
    assign_and_claim(&mut upstream, &mut node, "run-2", "exec-2").await;
}

// ---- proxy ---------------------------------------------------------------------------

/// A CONNECT proxy on loopback that tunnels every request to `target`, recording the
/// request heads it saw.
async fn start_connect_proxy(target: std::net::SocketAddr) -> (String, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let Ok(byte) = client.read_u8().await else {
                        return;
                    };
                    head.push(byte);
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (format!("http://{address}"), heads)
}

#[tokio::test]
async fn oz_is_reached_through_the_http_proxy_from_the_environment() {
    let mut oz = FakeOz::start(OzMode::Accept).await;
    let (proxy_url, heads) = start_connect_proxy(oz.addr).await;
    // A non-loopback name: loopback destinations are never proxied. Only the proxy
    // resolves it (to the fake Oz).
    let port = oz.addr.port();
    let mut options = GatewayOptions::new(format!(
        "ws://oz.proxied.test:{port}{}",
        oz::WORKER_WEB_SOCKET_PATH
    ));
    options.proxy = ozfleet_gateway::ProxyEnv::from_lookup(|name| {
        (name == "HTTP_PROXY").then(|| proxy_url.clone())
    });
    let gateway = TestGateway::start(options).await;
    let mut upstream = oz.next_connection().await;
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with(&format!("CONNECT oz.proxied.test:{port} HTTP/1.1\r\n")),
        "{heads:?}"
    );
    assert_eq!(
        oz.handshakes()[0].authorization.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    // The tunnel carries the protocol both ways.
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;
}

// ---- 10. reconnect backoff -----------------------------------------------------------

#[tokio::test]
async fn a_server_that_accepts_and_closes_at_once_is_not_hammered() {
    let oz = FakeOz::start(OzMode::AcceptAndClose).await;
    // Measured from before the first dial, so the elapsed time is never underestimated.
    let started = Instant::now();
    let _gateway = TestGateway::start(GatewayOptions::new(oz.url(""))).await;
    assert!(
        eventually(WAIT, || oz.handshake_count() >= 1).await,
        "the gateway never connected"
    );
    // The policy itself is unit-tested on paused time (ozfleet_proto::reconnect); here the
    // real loop must back off: waits are drawn from [d/2, d] with d = 1 s, 2 s, 4 s…, so
    // attempts 2, 3, 4, 5 come at least 0.5 s, 1.5 s, 3.5 s, 7.5 s after the first. The
    // bound is computed from the time actually elapsed, so a slow machine cannot fail it.
    assert!(
        eventually(WAIT, || oz.handshake_count() >= 2).await,
        "the gateway never retried"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count = oz.handshake_count();
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = 1 + [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
        .iter()
        .filter(|earliest| **earliest <= elapsed)
        .count();
    assert!(
        count <= allowed,
        "{count} handshakes in {elapsed:.1} s; backoff allows at most {allowed}"
    );
}

#[tokio::test]
async fn a_handshake_refused_with_a_4xx_is_retried_only_after_the_long_wait() {
    let oz = FakeOz::start(OzMode::Unauthorized).await;
    let _gateway = TestGateway::start(GatewayOptions {
        keepalive: ozfleet_gateway::Keepalive {
            refused_retry: Duration::from_secs(3600),
            ..test_keepalive()
        },
        ..GatewayOptions::new(oz.url(""))
    })
    .await;
    assert!(
        eventually(WAIT, || oz.handshake_count() >= 1).await,
        "the gateway never connected"
    );
    // A 503 is retried within about a second (see above); a 401 waits the long retry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(oz.handshake_count(), 1, "a refused key is not hammered");
}

// ---- 11. node authentication and hello validation ------------------------------------

#[tokio::test]
async fn nodes_need_the_join_token_and_a_valid_hello_first() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let url = gateway.node_url();
    let code = |result: Result<_, tonic::Status>| match result {
        Ok(_) => panic!("the attach call must fail"),
        Err(status) => status.code(),
    };

    let wrong = open_attach(
        &url,
        Some("not-the-token"),
        vec![hello_request(hello("node-x"))],
    )
    .await;
    assert_eq!(code(wrong), tonic::Code::Unauthenticated);
    let prefix = open_attach(
        &url,
        Some(&format!("{JOIN_TOKEN}x")),
        vec![hello_request(hello("node-x"))],
    )
    .await;
    assert_eq!(code(prefix), tonic::Code::Unauthenticated);
    let missing = open_attach(&url, None, vec![hello_request(hello("node-x"))]).await;
    assert_eq!(code(missing), tonic::Code::Unauthenticated);

    let not_hello = v1::AttachRequest {
        kind: Some(attach_request::Kind::Accepted(v1::AssignmentAccepted {
            task_id: "t".into(),
            execution_id: "e".into(),
        })),
    };
    let result = open_attach(
        &url,
        Some(JOIN_TOKEN),
        vec![not_hello, hello_request(hello("node-x"))],
    )
    .await;
    assert_eq!(code(result), tonic::Code::InvalidArgument);
    let empty = v1::AttachRequest { kind: None };
    let result = open_attach(&url, Some(JOIN_TOKEN), vec![empty]).await;
    assert_eq!(code(result), tonic::Code::InvalidArgument);
    for bad_id in ["", "has space", "slash/y", &"x".repeat(129)] {
        let result = open_attach(&url, Some(JOIN_TOKEN), vec![hello_request(hello(bad_id))]).await;
        assert_eq!(
            code(result),
            tonic::Code::InvalidArgument,
            "node_id {bad_id:?}"
        );
    }
    let bad_running = NodeHello {
        running_tasks: vec![running("", "exec")],
        ..hello("node-x")
    };
    let result = open_attach(&url, Some(JOIN_TOKEN), vec![hello_request(bad_running)]).await;
    assert_eq!(code(result), tonic::Code::InvalidArgument);

    // None of them joined the fleet: a task finds no node.
    upstream.assign("run-0", "exec-0");
    assert_eq!(upstream.recv_text().await, rejected_frame("run-0"));
    // A proper node still can.
    let mut node = FakeNode::attach_id(&gateway, "node-x").await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;
}

// ---- 12. epochs and reconciliation ---------------------------------------------------

#[tokio::test]
async fn a_reattached_node_keeps_its_tasks_and_its_old_stream_is_fenced() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut old = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut old, "run-1", "exec-1").await;
    assign_and_claim(&mut upstream, &mut old, "run-2", "exec-2").await;

    let mut new = FakeNode::attach(
        &gateway,
        NodeHello {
            running_tasks: vec![running("run-1", "exec-1"), running("run-2", "exec-2")],
            ..hello("node-a")
        },
    )
    .await;
    assert!(
        new.epoch > old.epoch,
        "epochs must increase: {} then {}",
        old.epoch,
        new.epoch
    );
    // The old connection is closed by the gateway.
    assert!(
        matches!(
            old.recv_within(WAIT).await,
            Ok(None) | Err(RecvError::Status(_))
        ),
        "the old attach stream must end"
    );

    // A message on the old stream is dropped.
    old.report(succeeded("run-1", "exec-1"));
    tokio::time::sleep(QUIET).await;

    // No new claim; outcomes on the new stream are relayed: Oz's next message is run-2's.
    new.report(failed("run-2", "exec-2", "agent_invocation", 1, "m2"));
    assert_eq!(
        upstream.recv().await,
        WorkerMessage::failed("run-2", oz::FailureReason::AgentInvocation, "m2".into(), 1)
    );
    assert_eq!(new.expect_ack().await.task_id, "run-2");
    // run-1 is still running on the node (the old stream's "succeeded" did not count).
    new.report(failed("run-1", "exec-1", "agent_invocation", 2, "m1"));
    assert_eq!(
        upstream.recv().await,
        WorkerMessage::failed("run-1", oz::FailureReason::AgentInvocation, "m1".into(), 2)
    );
    assert_eq!(new.expect_ack().await.task_id, "run-1");
}

#[tokio::test]
async fn a_reattach_announcing_a_pending_offer_as_running_claims_it() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut old = FakeNode::attach_id(&gateway, "node-a").await;
    upstream.assign("run-1", "exec-1");
    old.expect_assignment().await;
    // The node accepted and started the task, but the acceptance was lost with a
    // connection the gateway has not yet seen die; the node comes back on a new one.
    let new = FakeNode::attach(
        &gateway,
        NodeHello {
            running_tasks: vec![running("run-1", "exec-1")],
            ..hello("node-a")
        },
    )
    .await;
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));
    new.report(succeeded("run-1", "exec-1"));
    assert_eq!(upstream.recv_text().await, completed_frame("run-1"));
    drop(old);
}

#[tokio::test]
async fn a_lost_offer_is_made_again_on_reattach_even_with_an_older_execution_unacknowledged() {
    // Run "run-1" had a first execution, finished and relayed; Oz then sent a follow-up
    // execution (same task_id, new execution_id), offered to the node. The node's
    // connection breaks before the offer arrives, and it still holds the first
    // execution's outcome as unacknowledged (the ack was lost too).
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut old = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut old, "run-1", "exec-1").await;
    old.report(succeeded("run-1", "exec-1"));
    assert_eq!(upstream.recv_text().await, completed_frame("run-1"));
    upstream.assign("run-1", "exec-2");
    // (The old stream receives the ack and the offer; the node never processes them.)

    let mut new = FakeNode::attach(
        &gateway,
        NodeHello {
            unacknowledged_outcomes: vec![succeeded("run-1", "exec-1")],
            ..hello("node-a")
        },
    )
    .await;
    // The node does not run exec-2, so the lost offer must be made again now (it is the
    // only node), not left pending until the offer timeout.
    let until = tokio::time::Instant::now() + WAIT;
    let offer = loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match new.recv_within(left).await {
            Ok(Some(attach_response::Kind::Assignment(assignment))) => break assignment,
            Ok(Some(attach_response::Kind::OutcomeAck(ack))) => {
                assert_eq!(ack.execution_id, "exec-1")
            }
            other => panic!("the lost offer of run-1/exec-2 was not made again: {other:?}"),
        }
    };
    assert_eq!(
        (offer.task_id.as_str(), offer.execution_id.as_str()),
        ("run-1", "exec-2")
    );
    new.accept(&offer);
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));
    drop(old);
}

#[tokio::test]
async fn a_node_that_restarted_without_its_task_gets_the_task_failed_upstream() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut old = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut old, "run-1", "exec-1").await;
    drop(old);

    let mut new = FakeNode::attach_id(&gateway, "node-a").await;
    match upstream.recv().await {
        WorkerMessage::TaskFailed(failed) => {
            assert_eq!(failed.task_id, "run-1");
            assert_eq!(failed.failure_reason, "unknown");
            assert_eq!(failed.exit_code, None);
            assert!(
                failed.message.starts_with("Failed to execute task: "),
                "{}",
                failed.message
            );
        }
        other => panic!("expected task_failed, got {other:?}"),
    }
    // The restarted node is in service.
    assign_and_claim(&mut upstream, &mut new, "run-2", "exec-2").await;
}

#[tokio::test]
async fn an_unacknowledged_outcome_in_a_hello_is_relayed_exactly_once() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut first = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut first, "run-1", "exec-1").await;
    drop(first);

    let outcome = failed(
        "run-1",
        "exec-1",
        "setup_command",
        2,
        "Failed to execute task: setup",
    );
    let with_outcome = || NodeHello {
        unacknowledged_outcomes: vec![outcome.clone()],
        ..hello("node-a")
    };
    let mut second = FakeNode::attach(&gateway, with_outcome()).await;
    assert_eq!(
        upstream.recv().await,
        WorkerMessage::failed(
            "run-1",
            oz::FailureReason::SetupCommand,
            "Failed to execute task: setup".into(),
            2
        )
    );
    let ack = second.expect_ack().await;
    assert_eq!(
        (ack.task_id.as_str(), ack.execution_id.as_str()),
        ("run-1", "exec-1")
    );
    drop(second);

    // The ack was lost: the node announces the outcome again.
    let mut third = FakeNode::attach(&gateway, with_outcome()).await;
    assert_eq!(third.expect_ack().await.task_id, "run-1");
    // Barrier: Oz's next message is the claim of a new task, not a second task_failed.
    assign_and_claim(&mut upstream, &mut third, "run-2", "exec-2").await;
    // And once more on the live stream.
    third.report(outcome.clone());
    assert_eq!(third.expect_ack().await.task_id, "run-1");
    third.report(succeeded("run-2", "exec-2"));
    assert_eq!(upstream.recv_text().await, completed_frame("run-2"));
}

// ---- 13. node lost with a pending offer ----------------------------------------------

#[tokio::test]
async fn a_pending_offer_moves_to_the_other_node_when_its_node_disconnects() {
    let (_oz, gateway, mut upstream) = start_connected_with(|options| {
        options.timings.offer_timeout = Duration::from_millis(1500);
    })
    .await;
    let mut a = FakeNode::attach_id(&gateway, "node-a").await;
    let mut b = FakeNode::attach_id(&gateway, "node-b").await;

    let data = upstream.assign("run-1", "exec-1");
    let (first, _) = assignment_on_either(&mut a, &mut b).await;
    let (gone, other) = chosen(&mut a, &mut b, first);
    gone.hang_up();

    // Not at once (the gone node may have accepted just before its connection broke), but
    // when the offer times out.
    other.expect_quiet().await;
    let assignment = other.expect_assignment().await;
    assert_eq!(assignment.task_id, "run-1");
    assert_eq!(assignment.oz_assignment_json, data);
    other.accept(&assignment);
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));
    upstream.expect_quiet().await;
}

// ---- timeouts ------------------------------------------------------------------------

#[tokio::test]
async fn an_unanswered_offer_is_placed_on_another_node_after_the_offer_timeout() {
    let (_oz, gateway, mut upstream) = start_connected_with(|options| {
        options.timings.offer_timeout = Duration::from_millis(500);
    })
    .await;
    let mut a = FakeNode::attach_id(&gateway, "node-a").await;
    let mut b = FakeNode::attach_id(&gateway, "node-b").await;

    upstream.assign("run-1", "exec-1");
    let (first, _) = assignment_on_either(&mut a, &mut b).await;
    let (silent, other) = chosen(&mut a, &mut b, first);
    let assignment = other.expect_assignment().await;
    assert_eq!(assignment.task_id, "run-1");
    other.accept(&assignment);
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));
    silent.expect_quiet().await;
}

#[tokio::test]
async fn a_late_acceptance_of_a_withdrawn_offer_is_cancelled_on_that_node() {
    let (_oz, gateway, mut upstream) = start_connected_with(|options| {
        options.timings.offer_timeout = Duration::from_millis(500);
    })
    .await;
    let mut a = FakeNode::attach_id(&gateway, "node-a").await;
    let mut b = FakeNode::attach_id(&gateway, "node-b").await;

    upstream.assign("run-1", "exec-1");
    let (first, late_offer) = assignment_on_either(&mut a, &mut b).await;
    let (late, other) = chosen(&mut a, &mut b, first);
    let assignment = other.expect_assignment().await;
    other.accept(&assignment);
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));

    // The first node accepts after all: it has started the task, which now runs on the
    // other node too. It must be told to stop, and must not cause a second claim.
    late.accept(&late_offer);
    let cancellation = late.expect_cancellation().await;
    assert_eq!(
        (
            cancellation.task_id.as_str(),
            cancellation.execution_id.as_str()
        ),
        ("run-1", "exec-1")
    );
    upstream.expect_quiet().await;
}

#[tokio::test]
async fn tasks_of_a_node_gone_past_the_node_lost_timeout_are_failed_upstream() {
    let (_oz, gateway, mut upstream) = start_connected_with(|options| {
        options.timings.node_lost_timeout = Duration::from_millis(500);
    })
    .await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;
    let gone_at = Instant::now();
    node.hang_up();

    match upstream.recv().await {
        WorkerMessage::TaskFailed(failed) => {
            assert_eq!(failed.task_id, "run-1");
            assert_eq!(failed.failure_reason, "unknown");
        }
        other => panic!("expected task_failed, got {other:?}"),
    }
    assert!(
        gone_at.elapsed() >= Duration::from_millis(500),
        "failed before the timeout"
    );
}

#[tokio::test]
async fn a_node_back_within_the_node_lost_timeout_keeps_its_task() {
    let (_oz, gateway, mut upstream) = start_connected_with(|options| {
        options.timings.node_lost_timeout = Duration::from_millis(500);
    })
    .await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;
    node.hang_up();
    let node = FakeNode::attach(
        &gateway,
        NodeHello {
            running_tasks: vec![running("run-1", "exec-1")],
            ..hello("node-a")
        },
    )
    .await;
    // Past the timeout of the first connection: nothing is failed.
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.report(succeeded("run-1", "exec-1"));
    assert_eq!(upstream.recv_text().await, completed_frame("run-1"));
}

// ---- cancellation races --------------------------------------------------------------

#[tokio::test]
async fn a_task_cancelled_while_offered_is_not_started_elsewhere_after_a_refusal() {
    let (_oz, gateway, upstream) = start_connected().await;
    let mut a = FakeNode::attach_id(&gateway, "node-a").await;
    let mut b = FakeNode::attach_id(&gateway, "node-b").await;

    upstream.assign("run-1", "exec-1");
    let (first, offer) = assignment_on_either(&mut a, &mut b).await;
    let (refuser, other) = chosen(&mut a, &mut b, first);
    upstream.cancel("run-1");
    assert_eq!(refuser.expect_cancellation().await.task_id, "run-1");
    // The node had decided to refuse before it saw the cancellation.
    refuser.refuse(&offer, "node at maximum concurrency");

    // The other node must not be left running a task the user cancelled: either it is
    // not offered at all, or the offer is followed by the cancellation.
    match other.recv_within(QUIET).await {
        Err(RecvError::Timeout) => {}
        Ok(Some(attach_response::Kind::Assignment(assignment))) => {
            assert_eq!(assignment.task_id, "run-1");
            match other.recv_within(WAIT).await {
                Ok(Some(attach_response::Kind::Cancellation(c))) => assert_eq!(c.task_id, "run-1"),
                got => panic!(
                    "the cancelled task was offered to {} without its cancellation: {got:?}",
                    other.node_id
                ),
            }
        }
        got => panic!("unexpected message: {got:?}"),
    }
}

#[tokio::test]
async fn a_cancellation_for_a_disconnected_node_is_delivered_when_it_returns() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;
    node.hang_up();
    drop(node);
    upstream.cancel("run-1");
    // Give the cancellation time to arrive while the node is away.
    tokio::time::sleep(QUIET).await;
    let mut node = FakeNode::attach(
        &gateway,
        NodeHello {
            running_tasks: vec![running("run-1", "exec-1")],
            ..hello("node-a")
        },
    )
    .await;
    let cancellation = node.expect_cancellation().await;
    assert_eq!(
        (
            cancellation.task_id.as_str(),
            cancellation.execution_id.as_str()
        ),
        ("run-1", "exec-1")
    );
}

// ---- 14. shutdown --------------------------------------------------------------------

/// Asserts the next frame Oz gets is a close frame with code 1000 and no reason.
async fn expect_normal_close(upstream: &mut OzConnection) {
    match upstream.next_frame_within(WAIT).await {
        Ok(Some(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "");
        }
        other => panic!("expected a close frame with code 1000, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_returns_promptly_and_closes_upstream_with_1000() {
    let (_oz, mut gateway, mut upstream) = start_connected().await;
    // Barrier: the gateway is past its handshake and serving the connection.
    upstream.assign("run-0", "exec-0");
    assert_eq!(upstream.recv_text().await, rejected_frame("run-0"));

    let started = Instant::now();
    gateway.shutdown.cancel();
    let handle = gateway.handle.take().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(3), handle)
        .await
        .expect("run did not return within 3 s of shutdown")
        .expect("run panicked");
    assert!(result.is_ok(), "run failed: {result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    expect_normal_close(&mut upstream).await;
}

#[tokio::test]
async fn shutdown_with_a_node_attached_closes_its_stream_and_returns_promptly() {
    let (_oz, mut gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;

    let started = Instant::now();
    gateway.shutdown.cancel();
    let handle = gateway.handle.take().unwrap();
    // The node's stream ends (it keeps its task and will reconnect); like the real agent,
    // the node then hangs up its side.
    assert!(
        matches!(
            node.recv_within(WAIT).await,
            Ok(None) | Err(RecvError::Status(_))
        ),
        "the node's attach stream must end"
    );
    node.hang_up();
    let result = tokio::time::timeout(Duration::from_secs(3), handle)
        .await
        .expect("run did not return within 3 s of shutdown")
        .expect("run panicked");
    assert!(result.is_ok(), "run failed: {result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    expect_normal_close(&mut upstream).await;
}

#[tokio::test]
async fn shutdown_is_not_held_up_by_a_node_that_never_hangs_up() {
    let (_oz, mut gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-1", "exec-1").await;

    let started = Instant::now();
    gateway.shutdown.cancel();
    let handle = gateway.handle.take().unwrap();
    // The node keeps its request side open; the gateway ends its stream itself, well
    // before the 5 s server stop timeout.
    let result = tokio::time::timeout(Duration::from_secs(8), handle)
        .await
        .expect("run did not return within 8 s of shutdown")
        .expect("run panicked");
    assert!(result.is_ok(), "run failed: {result:?}");
    expect_normal_close(&mut upstream).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(node);
}

// ---- review fixes ---------------------------------------------------------------------

#[tokio::test]
async fn a_cancellation_sent_before_the_node_returns_is_applied_when_it_does() {
    let (_oz, gateway, upstream) = start_connected().await;
    // As after a gateway restart: Oz cancels a run whose node has not reattached yet.
    upstream.cancel("run-1");
    let mut returning = hello("node-a");
    returning.running_tasks.push(running("run-1", "exec-1"));
    let mut node = FakeNode::attach(&gateway, returning).await;
    let cancellation = node.expect_cancellation().await;
    assert_eq!(cancellation.task_id, "run-1");
    assert_eq!(cancellation.execution_id, "exec-1");
}

#[tokio::test]
async fn a_live_outcome_for_an_unknown_task_is_not_relayed() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    // Never announced in a hello and never placed here: dropped (but acknowledged).
    node.report(succeeded("someone-elses-run", "exec-9"));
    assert_eq!(node.expect_ack().await.task_id, "someone-elses-run");
    assign_and_claim(&mut upstream, &mut node, "run-2", "exec-2").await;
}

#[tokio::test]
async fn an_outcome_for_an_offer_whose_acceptance_was_lost_is_preceded_by_the_claim() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    upstream.assign("run-1", "exec-1");
    node.expect_assignment().await;
    // The node ran and finished the task but its acceptance never arrived.
    node.report(succeeded("run-1", "exec-1"));
    assert_eq!(upstream.recv_text().await, claimed_frame("run-1"));
    assert_eq!(
        upstream.recv().await,
        WorkerMessage::completed("run-1"),
        "the outcome follows the claim"
    );
}

#[tokio::test]
async fn a_second_process_with_the_same_node_id_is_refused_while_the_first_is_attached() {
    let (_oz, gateway, mut upstream) = start_connected().await;
    let mut first = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut first, "run-1", "exec-1").await;

    let mut clone = hello("node-a");
    clone.instance_id = "another-host".into();
    let node_url = gateway.node_url();
    let attempt = || {
        open_attach(
            &node_url,
            Some(JOIN_TOKEN),
            vec![hello_request(clone.clone())],
        )
    };
    let Err(refused) = attempt().await else {
        panic!("a second process with the same node id was let in");
    };
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused}");
    assert!(refused.message().contains("--state-dir"), "{refused}");
    // The running task was not touched: its outcome still relays.
    first.report(succeeded("run-1", "exec-1"));
    assert_eq!(upstream.recv().await, WorkerMessage::completed("run-1"));

    // Once the first process is gone, the identity may attach from a new process.
    first.hang_up();
    let deadline = Instant::now() + WAIT;
    loop {
        match attempt().await {
            Ok(_) => break,
            Err(status)
                if status.code() == tonic::Code::AlreadyExists && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("the new process could not attach: {status}"),
        }
    }
}

#[tokio::test]
async fn a_node_that_leaves_an_offer_unanswered_gets_no_more_and_is_disconnected() {
    let (_oz, gateway, mut upstream) = start_connected_with(|options| {
        options.timings.offer_timeout = Duration::from_millis(200);
    })
    .await;
    let mut stuck = FakeNode::attach_id(&gateway, "node-stuck").await;
    upstream.assign("run-1", "exec");
    assert_eq!(stuck.expect_assignment().await.task_id, "run-1");
    // Never answered: taken back, and with no other node, rejected upstream.
    assert_eq!(upstream.recv_text().await, rejected_frame("run-1"));
    // Quiet now: the next task is not offered to it (rejected at once, no other node).
    upstream.assign("run-2", "exec");
    assert_eq!(upstream.recv_text().await, rejected_frame("run-2"));
    // Still silent an offer timeout later: the gateway drops the connection (a healthy
    // agent would reconnect with its full state).
    match stuck.recv_within(WAIT).await {
        Ok(None) | Err(RecvError::Status(_)) => {}
        other => panic!("expected the stream to end, got {other:?}"),
    }
}

// ---- hostile input (fault-injection test 6 of the guarantees) --------------------------

#[tokio::test]
async fn hostile_input_from_oz_and_from_nodes_loses_nothing_and_keeps_memory_bounded() {
    let (mut oz, gateway, mut upstream) = start_connected().await;
    let mut node = FakeNode::attach_id(&gateway, "node-a").await;
    assign_and_claim(&mut upstream, &mut node, "run-warm", "exec-warm").await;
    let before = resident_bytes("self");

    for round in 0..3 {
        // Deep nesting, duplicate assignments, unknown cancellations.
        let nested = format!(
            r#"{{"type":"task_assignment","data":{{"task_id":"deep-{round}","execution_id":"e","task":{{"id":"t"}},"x":{}{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        upstream.send_text(&nested);
        // Valid JSON within the limits, however odd: offered like any task. The node
        // refuses it; with no other node it is rejected upstream.
        let deep = node.expect_assignment().await;
        assert_eq!(deep.task_id, format!("deep-{round}"));
        node.refuse(&deep, "not today");
        assert_eq!(
            upstream.recv_text().await,
            rejected_frame(&format!("deep-{round}"))
        );
        for task in 0..50 {
            upstream.cancel(&format!("never-assigned-{round}-{task}"));
        }
        // An assignment over the node link's limit: failed upstream, never offered.
        let huge_title = "t".repeat(ozfleet_gateway::fleet::MAX_ASSIGNMENT_BYTES);
        upstream.send_text(&format!(
            r#"{{"type":"task_assignment","data":{{"task_id":"huge-{round}","execution_id":"e","task":{{"id":"t","title":"{huge_title}"}}}}}}"#
        ));
        match upstream.recv().await {
            WorkerMessage::TaskFailed(failed) => {
                assert_eq!(failed.task_id, format!("huge-{round}"));
                assert!(
                    failed.message.contains("over the node link's limit"),
                    "{}",
                    failed.message
                );
            }
            other => panic!("expected the oversized task to fail, got {other:?}"),
        }
        // A node reports outcomes for tasks it never got: fenced, acknowledged.
        node.report(succeeded(&format!("forged-{round}"), "exec"));
        assert_eq!(node.expect_ack().await.task_id, format!("forged-{round}"));
    }
    assert_a_flood_hello_is_refused(&gateway.node_url()).await;

    // A frame over the WebSocket limit ends that connection; the gateway reconnects.
    let oversized = "x".repeat(ozfleet_gateway::upstream::MAX_WEBSOCKET_MESSAGE_BYTES + 1);
    upstream.send_text(&oversized);
    let mut upstream = oz.next_connection().await;

    // Real work still flows, and nothing the hostile input did shows up upstream.
    assign_and_claim(&mut upstream, &mut node, "run-ok", "exec-ok").await;
    node.report(succeeded("run-ok", "exec-ok"));
    assert_eq!(upstream.recv().await, WorkerMessage::completed("run-ok"));
    let grown = resident_bytes("self").saturating_sub(before);
    assert!(
        grown < 256 * 1024 * 1024,
        "hostile input ratcheted memory up by {} MiB",
        grown / (1024 * 1024)
    );
}
