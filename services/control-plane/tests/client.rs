//! The typed run API client against a real control plane, and each way a call can fail.

mod support;

use std::time::Duration;

use ozfleet_control_plane::client::{ClientError, RunClient};
use ozfleet_control_plane::run_api::{RunRequest, RunState};
use serde_json::json;
use support::{API_KEY, ControlPlane, PATIENCE, assert_refused, blocking};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

const REOFFER_DELAY: Duration = Duration::from_millis(200);

#[test]
fn a_run_request_is_the_json_the_server_reads() {
    let request = RunRequest::new("fix it", "w1")
        .with_title("Fix")
        .with_config("instance_shape", json!({"vcpus": 2}));
    assert_eq!(
        serde_json::to_value(&request).unwrap(),
        json!({
            "prompt": "fix it",
            "title": "Fix",
            "config": {"worker_host": "w1", "instance_shape": {"vcpus": 2}},
        })
    );
    let untitled = serde_json::to_value(RunRequest::new("p", "w1")).unwrap();
    assert_eq!(untitled.get("title"), None, "the server derives the title");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_runs_read_back_typed() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let request = RunRequest::new("fix it", "w1")
        .with_title("Fix")
        .with_config("name", json!("nightly"));
    let created = control_plane.submit(request).await;
    assert_eq!(created.state, RunState::Queued);
    assert_eq!(created.task_id, created.run_id);
    assert!(created.at_capacity, "no worker w1 is connected");

    let run = control_plane.run_item(&created.run_id).await;
    assert_eq!(run.title, "Fix");
    assert_eq!(run.prompt, "fix it");
    assert_eq!(
        serde_json::Value::Object(run.agent_config.clone()),
        json!({"worker_host": "w1", "name": "nightly"})
    );
    assert!(run.created_at <= run.updated_at);
    assert_eq!(run.started_at, None);
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_status_and_the_servers_error() {
    let control_plane = ControlPlane::start(REOFFER_DELAY).await;
    let wrong_key = control_plane.client_with_key("wrong-key");
    let refused = blocking(&wrong_key, |client| client.get("any")).await;
    let error = refused.as_ref().unwrap_err();
    for shown in [
        error.to_string(),
        format!("{error:?}"),
        format!("{wrong_key:?}"),
    ] {
        assert!(
            !shown.contains("wrong-key"),
            "the key is not shown: {shown}"
        );
    }
    assert_refused(refused, 401, "unauthenticated");

    // A run id is one path segment: it cannot reach another route.
    let client = control_plane.client_with_key(API_KEY);
    let missing = blocking(&client, |client| client.get("a/b?c#d")).await;
    let message = assert_refused(missing, 404, "not_found");
    assert_eq!(message, "run a/b?c#d not found");
    control_plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let client = RunClient::new(format!("http://{address}/"), API_KEY.into());
    assert_eq!(client.base_url(), format!("http://{address}"));
    match blocking(&client, |client| client.get("r")).await {
        Err(ClientError::Unreachable { method, url, .. }) => {
            assert_eq!(method, "GET");
            assert_eq!(url, format!("http://{address}/api/v1/agent/runs/r"));
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_that_is_not_the_expected_json_is_bad_json() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut server = JoinSet::new();
    server.spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      Content-Length: 15\r\nConnection: close\r\n\r\n{\"run_id\": 42}\n";
        stream.write_all(answer.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
    });
    let client = RunClient::new(format!("http://{address}"), API_KEY.into()).with_timeout(PATIENCE);
    let cancelled = blocking(&client, |client| client.cancel("r")).await;
    assert!(
        matches!(cancelled, Err(ClientError::BadJson { method: "POST", .. })),
        "{cancelled:?}"
    );
    server.join_next().await.unwrap().unwrap();
}
