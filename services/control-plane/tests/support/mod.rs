//! A real control plane on 127.0.0.1:0, driven over real HTTP and a fake worker speaking
//! the worker WebSocket protocol.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ozfleet_control_plane::client::{ClientError, RunClient};
use ozfleet_control_plane::run_api::{
    ListRuns, RunCancelled, RunCreated, RunItem, RunPage, RunRequest, RunState,
};
use ozfleet_control_plane::{ControlPlaneConfig, run};
use ozfleet_proto::oz::{WORKER_WEB_SOCKET_PATH, WorkerMessage};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tokio_util::sync::CancellationToken;

pub const API_KEY: &str = "test-api-key";
/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(5);

pub struct ControlPlane {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    server: JoinSet<anyhow::Result<()>>,
    /// The run API client, with the API key.
    client: RunClient,
    /// Raw HTTP for what the typed client does not send: missing or forged credentials,
    /// malformed bodies, unknown routes.
    http: ureq::Agent,
    /// Keeps a fresh database alive for as long as the control plane runs.
    _database_directory: Option<TempDir>,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl ControlPlane {
    /// Starts on a fresh database.
    pub async fn start(reoffer_delay: Duration) -> Self {
        let directory = tempfile::tempdir().unwrap();
        let mut control_plane =
            Self::start_on(&directory.path().join("runs.db"), reoffer_delay).await;
        control_plane._database_directory = Some(directory);
        control_plane
    }

    pub async fn start_on(database_path: &Path, reoffer_delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let config = ControlPlaneConfig {
            reoffer_delay,
            ..ControlPlaneConfig::new(API_KEY, database_path)
        };
        let shutdown = CancellationToken::new();
        let mut server = JoinSet::new();
        server.spawn(run(listener, config, shutdown.clone()));
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(PATIENCE))
            .build()
            .into();
        Self {
            address,
            shutdown,
            server,
            client: client(address, API_KEY),
            http,
            _database_directory: None,
        }
    }

    /// Stops the control plane and checks that it shut down cleanly.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        timeout(PATIENCE, self.server.join_next())
            .await
            .expect("the control plane stops promptly")
            .expect("the control plane was started")
            .expect("the control plane task does not panic")
            .expect("the control plane stops without error");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// A run API client presenting `api_key` (the API key or a run token).
    pub fn client_with_key(&self, api_key: &str) -> RunClient {
        client(self.address, api_key)
    }

    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Reply {
        let (http, url, bearer) = (self.http.clone(), self.url(path), bearer.map(str::to_owned));
        raw(move || {
            let mut request = http.get(&url);
            if let Some(token) = bearer {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            request.call()
        })
        .await
    }

    pub async fn post(&self, path: &str, bearer: Option<&str>, body: &str) -> Reply {
        let (http, url, bearer, body) = (
            self.http.clone(),
            self.url(path),
            bearer.map(str::to_owned),
            body.to_owned(),
        );
        raw(move || {
            let mut request = http.post(&url).header("Content-Type", "application/json");
            if let Some(token) = bearer {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            request.send(body)
        })
        .await
    }

    /// Submits a run and returns the answer.
    pub async fn submit(&self, request: RunRequest) -> RunCreated {
        blocking(&self.client, move |client| client.submit(&request))
            .await
            .expect("the run is queued")
    }

    /// Creates a run of `prompt` for `worker_host`.
    pub async fn create_run(&self, prompt: &str, worker_host: &str) -> RunCreated {
        self.submit(RunRequest::new(prompt, worker_host)).await
    }

    pub async fn create_run_id(&self, prompt: &str, worker_host: &str) -> String {
        self.create_run(prompt, worker_host).await.run_id
    }

    pub async fn run_item(&self, run_id: &str) -> RunItem {
        let run_id = run_id.to_owned();
        blocking(&self.client, move |client| client.get(&run_id))
            .await
            .expect("the run is read")
    }

    pub async fn list(&self, query: ListRuns) -> RunPage {
        blocking(&self.client, move |client| client.list(&query))
            .await
            .expect("the runs are listed")
    }

    pub async fn cancel(&self, run_id: &str) -> Result<RunCancelled, ClientError> {
        let run_id = run_id.to_owned();
        blocking(&self.client, move |client| client.cancel(&run_id)).await
    }

    /// Polls the run until it reaches `state`, and returns it.
    pub async fn wait_for_state(&self, run_id: &str, state: RunState) -> RunItem {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let run = self.run_item(run_id).await;
            if run.state == state {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {run_id} never reached {state}: {run:?}"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
}

fn client(address: SocketAddr, api_key: &str) -> RunClient {
    RunClient::new(format!("http://{address}"), api_key.into()).with_timeout(PATIENCE)
}

/// Runs a blocking client call off the runtime's worker threads.
pub async fn blocking<T: Send + 'static>(
    client: &RunClient,
    call: impl FnOnce(&RunClient) -> T + Send + 'static,
) -> T {
    let client = client.clone();
    tokio::task::spawn_blocking(move || call(&client))
        .await
        .expect("the client call does not panic")
}

async fn raw<F>(call: F) -> Reply
where
    F: FnOnce() -> Result<ureq::http::Response<ureq::Body>, ureq::Error> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut response = call().expect("the control plane answers HTTP");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    })
    .await
    .unwrap()
}

pub fn text(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, got {value}"))
        .to_owned()
}

/// Asserts a JSON error reply with this status and error code, and returns its message.
pub fn assert_error(reply: &Reply, status: u16, code: &str) -> String {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.body["error"], code, "{reply:?}");
    text(&reply.body["message"])
}

/// Asserts that a client call failed with this status and error code, and returns the
/// message.
pub fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
    status: u16,
    code: &str,
) -> String {
    let error = result.expect_err("the call is refused");
    assert_eq!(error.status(), Some(status), "{error}");
    let body = error.api_error().expect("the refusal is an API error");
    assert_eq!(body.error, code, "{error}");
    body.message
}

/// A worker connection driven by the test.
pub struct FakeWorker {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl FakeWorker {
    pub async fn connect(control_plane: &ControlPlane, worker_id: &str) -> Self {
        Self::try_connect(control_plane, &format!("worker_id={worker_id}"), API_KEY)
            .await
            .expect("the worker connects")
    }

    pub async fn try_connect(
        control_plane: &ControlPlane,
        query: &str,
        api_key: &str,
    ) -> Result<Self, tungstenite::Error> {
        let url = format!(
            "ws://{}{WORKER_WEB_SOCKET_PATH}?{query}",
            control_plane.address
        );
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {api_key}")).unwrap(),
        );
        let (socket, _) = connect_async(request).await?;
        Ok(Self { socket })
    }

    pub async fn send(&mut self, message: WorkerMessage) {
        self.send_text(&message.to_frame()).await;
    }

    pub async fn send_text(&mut self, frame: &str) {
        self.socket
            .send(Message::Text(frame.into()))
            .await
            .expect("the frame is sent");
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.socket
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .expect("the frame is sent");
    }

    /// The next data frame, parsed; panics after [`PATIENCE`] or if the connection ends.
    pub async fn next_frame(&mut self) -> Value {
        self.next_frame_within(PATIENCE)
            .await
            .expect("a frame arrives in time")
    }

    async fn next_frame_within(&mut self, patience: Duration) -> Option<Value> {
        let deadline = Instant::now() + patience;
        loop {
            let message = match timeout(deadline - Instant::now(), self.socket.next()).await {
                Err(_) => return None,
                Ok(message) => message,
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(text.as_str()).expect("frames are JSON"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a data frame, got {other:?}"),
            }
        }
    }

    /// The `data` of the next frame, which must have type `message_type`.
    pub async fn expect(&mut self, message_type: &str) -> Value {
        let frame = self.next_frame().await;
        assert_eq!(frame["type"], message_type, "{frame}");
        frame["data"].clone()
    }

    pub async fn expect_assignment(&mut self) -> Value {
        self.expect("task_assignment").await
    }

    pub async fn expect_cancellation_of(&mut self, run_id: &str) {
        let data = self.expect("task_cancellation").await;
        assert_eq!(data, json!({"task_id": run_id}));
    }

    /// Asserts that no data frame arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Some(frame) = self.next_frame_within(quiet).await {
            panic!("expected no frame, got {frame}");
        }
    }

    /// Claims an assignment and returns the run id.
    pub async fn claim_next(&mut self, worker_id: &str) -> String {
        let run_id = text(&self.expect_assignment().await["task_id"]);
        self.send(WorkerMessage::claimed(&run_id, worker_id)).await;
        run_id
    }

    /// Waits for the server to close the connection and returns the close code.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match timeout(PATIENCE, self.socket.next())
                .await
                .expect("the server closes the connection in time")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|frame| frame.code.into()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        self.socket.close(None).await.expect("the close is sent");
        // Drain until the server acknowledges, so the server has seen the close.
        while let Ok(Some(Ok(_))) = timeout(PATIENCE, self.socket.next()).await {}
    }
}
