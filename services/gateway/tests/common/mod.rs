//! Test harness for the gateway: a fake Oz WebSocket server, fake node agents speaking
//! the node gRPC API, and a gateway started with `ozfleet_gateway::run` on loopback.
//!
//! Every wait is a poll with a deadline ([`WAIT`]); the only fixed waits are the short
//! "nothing arrives" windows of negative assertions.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ozfleet_gateway::{
    AdminToken, FleetTimings, GatewayConfig, GatewayError, GatewayListeners, JoinToken, Keepalive,
    UpstreamConfig,
};
use ozfleet_proto::oz::{self, WorkerMessage};
use ozfleet_proto::v1::node_service_client::NodeServiceClient;
use ozfleet_proto::v1::{
    self, AttachRequest, AttachResponse, BackendKind, NodeHello, TaskOutcome, TaskRef,
    UpstreamSettings, attach_request, attach_response, task_outcome,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

pub const API_KEY: &str = "oz-api-key-0123";
pub const WORKER_ID: &str = "gw-test-1";
pub const JOIN_TOKEN: &str = "join-s3cret";
pub const SERVER_ROOT_URL: &str = "https://oz.example.test";
/// Upper bound for anything that is expected to happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a negative assertion ("nothing arrives") watches.
pub const QUIET: Duration = Duration::from_millis(400);

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=ozfleet_gateway=debug`).
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Polls `condition` until it holds or `deadline` passes; returns whether it held.
pub async fn eventually(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- fake Oz ------------------------------------------------------------------------

/// What the fake Oz saw of one WebSocket handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// Request target: path and query.
    pub uri: String,
    pub authorization: Option<String>,
}

/// How the fake Oz answers new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OzMode {
    /// Complete the handshake and hand the connection to the test.
    Accept,
    /// Complete the handshake, then close the connection at once.
    AcceptAndClose,
    /// Refuse the handshake with HTTP 503 (Oz is down).
    Reject,
    /// Refuse the handshake with HTTP 401 (a bad API key).
    Unauthorized,
}

#[derive(Debug)]
struct OzShared {
    handshakes: Mutex<Vec<Handshake>>,
    mode: Mutex<OzMode>,
}

/// A fake Oz worker endpoint on 127.0.0.1.
pub struct FakeOz {
    pub addr: SocketAddr,
    shared: Arc<OzShared>,
    connections: mpsc::UnboundedReceiver<OzConnection>,
    acceptor: JoinHandle<()>,
}

impl Drop for FakeOz {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl FakeOz {
    pub async fn start(mode: OzMode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Oz");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(OzShared {
            handshakes: Mutex::new(Vec::new()),
            mode: Mutex::new(mode),
        });
        let (connections_tx, connections) = mpsc::unbounded_channel();
        let acceptor = tokio::spawn({
            let shared = shared.clone();
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    tokio::spawn(serve_oz_connection(
                        tcp,
                        shared.clone(),
                        connections_tx.clone(),
                    ));
                }
            }
        });
        Self {
            addr,
            shared,
            connections,
            acceptor,
        }
    }

    /// The worker endpoint URL with `extra_query` (e.g. `"?region=eu"`) appended.
    pub fn url(&self, extra_query: &str) -> String {
        format!(
            "ws://{}{}{}",
            self.addr,
            oz::WORKER_WEB_SOCKET_PATH,
            extra_query
        )
    }

    pub fn set_mode(&self, mode: OzMode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn handshakes(&self) -> Vec<Handshake> {
        self.shared.handshakes.lock().unwrap().clone()
    }

    pub fn handshake_count(&self) -> usize {
        self.shared.handshakes.lock().unwrap().len()
    }

    /// Waits for the gateway's next accepted connection.
    pub async fn next_connection(&mut self) -> OzConnection {
        tokio::time::timeout(WAIT, self.connections.recv())
            .await
            .expect("the gateway did not connect to the fake Oz in time")
            .expect("fake Oz acceptor stopped")
    }
}

enum OzCommand {
    Send(Message),
    /// Drop the TCP connection without a close frame.
    Drop,
}

async fn serve_oz_connection(
    tcp: tokio::net::TcpStream,
    shared: Arc<OzShared>,
    connections: mpsc::UnboundedSender<OzConnection>,
) {
    let mode = *shared.mode.lock().unwrap();
    // The signature is tungstenite's `Callback`.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or("<not UTF-8>").to_owned());
        shared.handshakes.lock().unwrap().push(Handshake {
            uri: request.uri().to_string(),
            authorization,
        });
        if mode == OzMode::Reject {
            let mut refusal = ErrorResponse::new(Some("Oz is down".into()));
            *refusal.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            return Err(refusal);
        }
        if mode == OzMode::Unauthorized {
            let mut refusal = ErrorResponse::new(Some("bad API key".into()));
            *refusal.status_mut() = http::StatusCode::UNAUTHORIZED;
            return Err(refusal);
        }
        Ok(response)
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    if mode == OzMode::AcceptAndClose {
        let _ = socket
            .close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "bye".into(),
            }))
            .await;
        return;
    }
    let (commands_tx, mut commands) = mpsc::unbounded_channel();
    let (frames_tx, frames) = mpsc::unbounded_channel();
    let _ = connections.send(OzConnection {
        commands: commands_tx,
        frames,
    });
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(OzCommand::Send(message)) => {
                    if socket.send(message).await.is_err() {
                        return;
                    }
                }
                Some(OzCommand::Drop) | None => return,
            },
            frame = socket.next() => match frame {
                Some(Ok(message)) => {
                    let _ = frames_tx.send(message);
                }
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// One gateway connection as the fake Oz sees it.
pub struct OzConnection {
    commands: mpsc::UnboundedSender<OzCommand>,
    frames: mpsc::UnboundedReceiver<Message>,
}

impl OzConnection {
    pub fn send(&self, message: Message) {
        self.commands
            .send(OzCommand::Send(message))
            .expect("the Oz connection is closed");
    }

    pub fn send_text(&self, text: &str) {
        self.send(Message::text(text));
    }

    /// Sends a `task_assignment` and returns its `data` object exactly as sent. The text
    /// has unusual spacing, key order and an unknown field on purpose: the node must get
    /// these bytes verbatim.
    pub fn assign(&self, task_id: &str, execution_id: &str) -> Vec<u8> {
        let data = format!(
            r#"{{ "execution_id" : "{execution_id}", "task_id":"{task_id}",
  "task": {{"id":"{task_id}","title":"Title of {task_id}","agent_config_snapshot":{{"model_id":"m-1"}}}},
  "env_vars": {{"WARP_API_KEY":"secret-{task_id}"}}, "future_field": [1, 2.50, null] }}"#
        );
        self.send_text(&format!(r#"{{"type":"task_assignment", "data":{data}}}"#));
        data.into_bytes()
    }

    pub fn cancel(&self, task_id: &str) {
        self.send_text(&format!(
            r#"{{"type":"task_cancellation","data":{{"task_id":"{task_id}"}}}}"#
        ));
    }

    /// Drops the TCP connection without a close handshake.
    pub fn drop_connection(self) {
        let _ = self.commands.send(OzCommand::Drop);
    }

    /// The next non-control frame from the gateway; `None` when the connection ended.
    pub async fn next_frame_within(&mut self, wait: Duration) -> Result<Option<Message>, ()> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(until, self.frames.recv()).await {
                Err(_) => return Err(()),
                Ok(None) => return Ok(None),
                Ok(Some(Message::Ping(_) | Message::Pong(_))) => continue,
                Ok(Some(frame)) => return Ok(Some(frame)),
            }
        }
    }

    /// The next text frame from the gateway, verbatim.
    pub async fn recv_text(&mut self) -> String {
        match self.next_frame_within(WAIT).await {
            Err(()) => panic!("the fake Oz got no message from the gateway within {WAIT:?}"),
            Ok(None) => panic!("the gateway closed the connection instead of sending a message"),
            Ok(Some(Message::Text(text))) => text.as_str().to_owned(),
            Ok(Some(other)) => panic!("expected a text frame from the gateway, got {other:?}"),
        }
    }

    /// The next message from the gateway, parsed.
    pub async fn recv(&mut self) -> WorkerMessage {
        let text = self.recv_text().await;
        oz::parse_worker_message(&text)
            .unwrap_or_else(|error| panic!("unparseable frame {text:?}: {error}"))
    }

    /// Asserts the gateway sends nothing for [`QUIET`].
    pub async fn expect_quiet(&mut self) {
        if let Ok(frame) = self.next_frame_within(QUIET).await {
            panic!("expected no message from the gateway, got {frame:?}");
        }
    }
}

/// The exact frame of a `task_claimed` for `task_id`.
pub fn claimed_frame(task_id: &str) -> String {
    format!(
        r#"{{"type":"task_claimed","data":{{"task_id":"{task_id}","worker_id":"{WORKER_ID}"}}}}"#
    )
}

// ---- gateway ------------------------------------------------------------------------

pub fn test_keepalive() -> Keepalive {
    Keepalive {
        drain_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(5),
        ..Keepalive::default()
    }
}

/// Offer and node-lost timeouts far longer than any test flow, so they never fire by
/// accident; the tests about them shorten them.
pub fn test_timings() -> FleetTimings {
    FleetTimings {
        offer_timeout: Duration::from_secs(10),
        node_lost_timeout: Duration::from_secs(10),
        node_keepalive: Duration::from_secs(20),
        reattach_window: Duration::from_secs(60),
    }
}

pub struct GatewayOptions {
    pub web_socket_url: String,
    /// The journal's directory; `None` (the default) journals nothing.
    pub state_dir: Option<std::path::PathBuf>,
    pub admin_token: Option<&'static str>,
    pub keepalive: Keepalive,
    pub timings: FleetTimings,
    pub proxy: ozfleet_gateway::ProxyEnv,
}

impl GatewayOptions {
    pub fn new(web_socket_url: String) -> Self {
        Self {
            web_socket_url,
            state_dir: None,
            admin_token: None,
            keepalive: test_keepalive(),
            timings: test_timings(),
            proxy: ozfleet_gateway::ProxyEnv::default(),
        }
    }
}

pub struct TestGateway {
    pub node_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<Result<(), GatewayError>>>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestGateway {
    pub async fn start(options: GatewayOptions) -> Self {
        init_tracing();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind node API");
        let node_addr = listener.local_addr().unwrap();
        let admin = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin API");
        let admin_addr = admin.local_addr().unwrap();
        let config = GatewayConfig {
            upstream: UpstreamConfig {
                web_socket_url: options.web_socket_url,
                api_key: API_KEY.into(),
                worker_id: WORKER_ID.into(),
                keepalive: options.keepalive,
                proxy: options.proxy,
            },
            settings: UpstreamSettings {
                server_root_url: SERVER_ROOT_URL.into(),
                idle_on_complete: String::new(),
                session_sharing_server_url: String::new(),
                worker_id: WORKER_ID.into(),
            },
            join_token: JoinToken::new(JOIN_TOKEN).unwrap(),
            admin_token: options
                .admin_token
                .map(|token| AdminToken::new(token).unwrap()),
            timings: options.timings,
            node_link: Default::default(),
            state_dir: options.state_dir.clone(),
            max_nodes: ozfleet_gateway::DEFAULT_MAX_NODES,
        };
        let listeners = GatewayListeners {
            node: listener,
            admin,
        };
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(ozfleet_gateway::run(listeners, config, shutdown.clone()));
        Self {
            node_addr,
            admin_addr,
            shutdown,
            handle: Some(handle),
        }
    }

    pub fn node_url(&self) -> String {
        format!("http://{}", self.node_addr)
    }
}

/// A fake Oz in [`OzMode::Accept`], a gateway connected to it, and that connection.
pub async fn start_connected() -> (FakeOz, TestGateway, OzConnection) {
    start_connected_with(|_| {}).await
}

pub async fn start_connected_with(
    adjust: impl FnOnce(&mut GatewayOptions),
) -> (FakeOz, TestGateway, OzConnection) {
    let mut oz = FakeOz::start(OzMode::Accept).await;
    let mut options = GatewayOptions::new(oz.url(""));
    adjust(&mut options);
    let gateway = TestGateway::start(options).await;
    let upstream = oz.next_connection().await;
    (oz, gateway, upstream)
}

// ---- fake nodes ---------------------------------------------------------------------

pub fn hello(node_id: &str) -> NodeHello {
    NodeHello {
        node_id: node_id.into(),
        node_name: format!("host-{node_id}"),
        backend: BackendKind::Direct as i32,
        max_concurrent_tasks: 0,
        labels: Default::default(),
        version: "0.0.0-test".into(),
        running_tasks: Vec::new(),
        unacknowledged_outcomes: Vec::new(),
        // One agent process per fake node id: reattaching is the same process reconnecting.
        instance_id: format!("instance-of-{node_id}"),
    }
}

pub fn running(task_id: &str, execution_id: &str) -> TaskRef {
    TaskRef {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
    }
}

pub fn succeeded(task_id: &str, execution_id: &str) -> TaskOutcome {
    TaskOutcome {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
        result: Some(task_outcome::Result::Succeeded(v1::TaskSucceeded {})),
    }
}

pub fn failed(
    task_id: &str,
    execution_id: &str,
    reason: &str,
    exit_code: i32,
    message: &str,
) -> TaskOutcome {
    TaskOutcome {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
        result: Some(task_outcome::Result::Failed(v1::TaskFailed {
            failure_reason: reason.into(),
            exit_code,
            message: message.into(),
        })),
    }
}

pub fn cancelled(task_id: &str, execution_id: &str) -> TaskOutcome {
    TaskOutcome {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
        result: Some(task_outcome::Result::Cancelled(v1::TaskCancelled {})),
    }
}

/// Opens an attach stream with `token` (`None`: no authorization metadata) after queueing
/// `first` on it. Returns the request sender and the response stream, or the call's error.
pub async fn open_attach(
    gateway_url: &str,
    token: Option<&str>,
    first: Vec<AttachRequest>,
) -> Result<
    (
        mpsc::UnboundedSender<AttachRequest>,
        tonic::Streaming<AttachResponse>,
    ),
    tonic::Status,
> {
    let channel = tonic::transport::Endpoint::from_shared(gateway_url.to_owned())
        .unwrap()
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect to the gateway node API");
    let mut client = NodeServiceClient::new(channel);
    let (sender, receiver) = mpsc::unbounded_channel();
    for message in first {
        sender.send(message).unwrap();
    }
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(receiver));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let call = tokio::time::timeout(WAIT, client.attach(request))
        .await
        .expect("the attach call got no answer in time")?;
    Ok((sender, call.into_inner()))
}

pub fn hello_request(hello: NodeHello) -> AttachRequest {
    AttachRequest {
        kind: Some(attach_request::Kind::Hello(hello)),
    }
}

#[derive(Debug)]
pub enum RecvError {
    Timeout,
    Status(tonic::Status),
}

/// A node agent as the gateway sees it: one attach stream.
pub struct FakeNode {
    pub node_id: String,
    pub epoch: u64,
    sender: Option<mpsc::UnboundedSender<AttachRequest>>,
    responses: tonic::Streaming<AttachResponse>,
}

impl FakeNode {
    /// Attaches with `hello` and the right join token, and reads the welcome.
    pub async fn attach(gateway: &TestGateway, hello: NodeHello) -> Self {
        Self::attach_via(&gateway.node_url(), hello).await
    }

    /// Attaches through `url` (e.g. a relay in front of the gateway).
    pub async fn attach_via(url: &str, hello: NodeHello) -> Self {
        let node_id = hello.node_id.clone();
        let (sender, responses) = open_attach(url, Some(JOIN_TOKEN), vec![hello_request(hello)])
            .await
            .unwrap_or_else(|status| panic!("node {node_id} could not attach: {status}"));
        let mut node = Self {
            node_id,
            epoch: 0,
            sender: Some(sender),
            responses,
        };
        match node.recv().await {
            attach_response::Kind::Welcome(welcome) => {
                assert_eq!(welcome.worker_id, WORKER_ID);
                assert!(welcome.epoch > 0);
                node.epoch = welcome.epoch;
            }
            other => panic!("expected a welcome first, got {other:?}"),
        }
        node
    }

    pub async fn attach_id(gateway: &TestGateway, node_id: &str) -> Self {
        Self::attach(gateway, hello(node_id)).await
    }

    pub fn send(&self, kind: attach_request::Kind) {
        self.sender
            .as_ref()
            .expect("the request side is closed")
            .send(AttachRequest { kind: Some(kind) })
            .expect("the attach stream is closed");
    }

    pub fn accept(&self, assignment: &v1::TaskAssignment) {
        self.send(attach_request::Kind::Accepted(v1::AssignmentAccepted {
            task_id: assignment.task_id.clone(),
            execution_id: assignment.execution_id.clone(),
        }));
    }

    pub fn refuse(&self, assignment: &v1::TaskAssignment, reason: &str) {
        self.send(attach_request::Kind::Refused(v1::AssignmentRefused {
            task_id: assignment.task_id.clone(),
            execution_id: assignment.execution_id.clone(),
            reason: reason.into(),
        }));
    }

    pub fn report(&self, outcome: TaskOutcome) {
        self.send(attach_request::Kind::Outcome(outcome));
    }

    /// Ends the request side of the stream (the node hangs up).
    pub fn hang_up(&mut self) {
        self.sender = None;
    }

    /// The next message from the gateway within `wait`; `Ok(None)` when the gateway ended
    /// the stream cleanly.
    pub async fn recv_within(
        &mut self,
        wait: Duration,
    ) -> Result<Option<attach_response::Kind>, RecvError> {
        match tokio::time::timeout(wait, self.responses.message()).await {
            Err(_) => Err(RecvError::Timeout),
            Ok(Ok(Some(AttachResponse { kind: Some(kind) }))) => Ok(Some(kind)),
            Ok(Ok(Some(AttachResponse { kind: None }))) => {
                panic!("{}: empty message from the gateway", self.node_id)
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Err(RecvError::Status(status)),
        }
    }

    pub async fn recv(&mut self) -> attach_response::Kind {
        match self.recv_within(WAIT).await {
            Ok(Some(kind)) => kind,
            Ok(None) => panic!("{}: the gateway ended the attach stream", self.node_id),
            Err(RecvError::Timeout) => panic!(
                "{}: no message from the gateway within {WAIT:?}",
                self.node_id
            ),
            Err(RecvError::Status(status)) => {
                panic!("{}: attach stream failed: {status}", self.node_id)
            }
        }
    }

    pub async fn expect_assignment(&mut self) -> v1::TaskAssignment {
        match self.recv().await {
            attach_response::Kind::Assignment(assignment) => assignment,
            other => panic!("{}: expected an assignment, got {other:?}", self.node_id),
        }
    }

    pub async fn expect_cancellation(&mut self) -> v1::TaskCancellation {
        match self.recv().await {
            attach_response::Kind::Cancellation(cancellation) => cancellation,
            other => panic!("{}: expected a cancellation, got {other:?}", self.node_id),
        }
    }

    pub async fn expect_ack(&mut self) -> v1::OutcomeAck {
        match self.recv().await {
            attach_response::Kind::OutcomeAck(ack) => ack,
            other => panic!("{}: expected an outcome ack, got {other:?}", self.node_id),
        }
    }

    /// Asserts the gateway sends this node nothing for [`QUIET`].
    pub async fn expect_quiet(&mut self) {
        match self.recv_within(QUIET).await {
            Err(RecvError::Timeout) => {}
            other => panic!(
                "{}: expected nothing from the gateway, got {other:?}",
                self.node_id
            ),
        }
    }
}

/// Oz assigns `task_id`, `node` gets it and accepts, Oz gets the claim. Also serves as a
/// barrier: everything queued to `node` or Oz before it has been received by then.
pub async fn assign_and_claim(
    upstream: &mut OzConnection,
    node: &mut FakeNode,
    task_id: &str,
    execution_id: &str,
) -> v1::TaskAssignment {
    upstream.assign(task_id, execution_id);
    let assignment = node.expect_assignment().await;
    assert_eq!(assignment.task_id, task_id);
    assert_eq!(assignment.execution_id, execution_id);
    node.accept(&assignment);
    assert_eq!(upstream.recv_text().await, claimed_frame(task_id));
    assignment
}

/// Resident memory (VmRSS) of process `pid` (`"self"`: this one), in bytes (Linux).
pub fn resident_bytes(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("read the status of process {pid}: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in the status of process {pid}"))
}

/// A hello announcing 100,000 running tasks is refused (over the 4 MiB message limit, or
/// over the 10,000-task bound), without harm.
pub async fn assert_a_flood_hello_is_refused(node_url: &str) {
    let mut flood = hello("node-flood");
    flood.running_tasks = (0..100_000)
        .map(|task| running(&format!("run-{task}"), "exec"))
        .collect();
    let refused = open_attach(node_url, Some(JOIN_TOKEN), vec![hello_request(flood)])
        .await
        .map(|(_sender, mut responses)| async move { responses.message().await });
    match refused {
        Err(status) => assert_ne!(status.code(), tonic::Code::Ok),
        Ok(next) => assert!(next.await.is_err(), "the flood hello must be refused"),
    }
}
