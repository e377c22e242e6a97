//! The node agent's session with the gateway: keeps one attach stream up, announces its
//! full state on every (re)connect, runs the tasks it accepts under supervision and
//! reports each outcome until the gateway acknowledges it.
//!
//! Its two edges are injected, so the whole session runs in a test without sockets or
//! processes: the backend ([`TaskBackend`]) and the connection ([`GatewayConnector`];
//! [`GrpcConnector`] in production). Its timers are tokio's, so tests drive them with
//! paused time.
//!
//! Every task run is owned by the node's [`TaskTracker`]: a run that panics (in the
//! backend, or while building its argv or environment) becomes a `failed` outcome with
//! reason `unknown` and frees its slot; a run still going after the shutdown grace is
//! dropped when the node stops, never left detached.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt as _, StreamExt as _};
use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::Meter;
use opentelemetry::trace::Span as _;
use ozfleet_proto::oz::{self, FailureReason};
use ozfleet_proto::reconnect::{AfterStable, Backoff, reconnect_loop};
use ozfleet_proto::v1::node_service_client::NodeServiceClient;
use ozfleet_proto::v1::{
    self, AttachRequest, AttachResponse, NodeHello, TaskOutcome, TaskRef, attach_request,
    attach_response, task_outcome,
};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataValue;
use tracing::{debug, error, info, warn};

use crate::argv::{ArgvSettings, build_base_args};
use crate::backend::{RecoveredTask, TaskBackend, TaskFailure, TaskRun, kind_name};
use crate::identity::load_or_create_node_id;
use crate::images;
use crate::observe::{NodeMetrics, NodeTelemetry, end_span, execution_span};
use crate::outcomes::OutcomeStore;
use crate::reported::ReportedLog;
use crate::task_env::common_task_env;

/// A connection that stayed up this long resets the reconnect backoff.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// After a stable connection ends (typically: the gateway restarted), a node waits a
/// uniformly drawn delay below this before its first dial, on top of the backoff's. A
/// fleet that lost the gateway at one instant then comes back spread over this window
/// (10,000 nodes: about 2,000 dials a second) instead of all within half a second.
pub const REATTACH_SPREAD: Duration = Duration::from_secs(5);

/// The extra wait before the first dial after a stable connection ended: uniform in
/// `[0, REATTACH_SPREAD)`.
pub fn reattach_spread() -> Duration {
    use rand::Rng as _;
    rand::rng().random_range(Duration::ZERO..REATTACH_SPREAD)
}
/// A node pings the gateway after this long at most without hearing from it, and gives up
/// on a ping unanswered for this long.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// This process's ping interval, uniform in `[3/4 × KEEPALIVE, KEEPALIVE]`: nodes that
/// attached together (after a gateway restart) do not ping the gateway in the same second
/// every 20 s; different intervals drift apart.
fn keepalive_interval() -> Duration {
    use rand::Rng as _;
    rand::rng().random_range(KEEPALIVE.mul_f64(0.75)..=KEEPALIVE)
}
/// How long shutdown waits for the gateway to acknowledge the last outcomes.
const ACK_WAIT: Duration = Duration::from_secs(3);
const BACKEND_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Error text of a task run that panicked (no panic payload: it is not meant for Oz).
const PANICKED_ERROR: &str = "the task run panicked";

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub state_dir: PathBuf,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    /// 0 = unlimited.
    pub max_concurrent_tasks: u32,
    /// Overrides the gateway's `--idle-on-complete` for tasks on this node.
    pub idle_on_complete: Option<String>,
    /// How long shutdown waits for cancelled tasks to end.
    pub shutdown_grace: Duration,
}

/// The node's messages to the gateway, starting with its hello. (A concrete stream: tonic's
/// attach future is provably `Send` with it, not with a boxed one.)
pub type Outbound = UnboundedReceiverStream<AttachRequest>;
/// The gateway's messages to the node; an error ends the session.
pub type Inbound = BoxStream<'static, Result<AttachResponse, tonic::Status>>;

/// Opens attach streams to the gateway, one per (re)connect.
pub trait GatewayConnector: Send + Sync + 'static {
    /// Dials and attaches, sending `outbound`; returns the gateway's side of the stream.
    fn attach(&self, outbound: Outbound) -> BoxFuture<'_, anyhow::Result<Inbound>>;
}

/// The production connector: gRPC to the gateway, authenticated with the join token,
/// the node's client certificate (mTLS, `https://` URLs), or both.
pub struct GrpcConnector {
    endpoint: tonic::transport::Endpoint,
    join_token: Option<SecretString>,
    /// Read again for every connection, so rotated files apply without a restart.
    tls: Option<crate::tls::ClientTls>,
}

impl GrpcConnector {
    /// Checks the gateway URL (e.g. `http://gateway.internal:7070`) and that the token
    /// can travel in gRPC metadata; nothing is dialled yet.
    pub fn new(gateway_url: &str, join_token: SecretString) -> anyhow::Result<Self> {
        Self::with_tls(gateway_url, Some(join_token), None)
    }

    /// [`GrpcConnector::new`] with TLS (needs an `https://` URL; a plain `http://` URL
    /// refuses TLS settings) and the join token optional when TLS carries a client
    /// certificate. The TLS files are checked now, and read again on every dial.
    pub fn with_tls(
        gateway_url: &str,
        join_token: Option<SecretString>,
        tls: Option<crate::tls::ClientTls>,
    ) -> anyhow::Result<Self> {
        let https = gateway_url.starts_with("https://");
        match &tls {
            Some(tls) => {
                if !https {
                    anyhow::bail!(
                        "TLS settings (--tls-ca, --tls-cert, --tls-key) need an https:// gateway URL, not {gateway_url:?}"
                    );
                }
                tls.load()?;
            }
            None if https => anyhow::bail!(
                "an https:// gateway URL needs --tls-ca, the CA that signed the gateway's certificate"
            ),
            None => {}
        }
        let has_client_certificate = tls.as_ref().is_some_and(|tls| tls.identity.is_some());
        if join_token.is_none() && !has_client_certificate {
            anyhow::bail!(
                "a join token is required unless the node has a client certificate (--tls-cert, --tls-key)"
            );
        }
        let endpoint = tonic::transport::Endpoint::from_shared(gateway_url.to_owned())
            .with_context(|| format!("invalid gateway URL {gateway_url:?}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(keepalive_interval())
            .keep_alive_timeout(KEEPALIVE);
        join_token.as_ref().map(bearer).transpose()?;
        Ok(Self {
            endpoint,
            join_token,
            tls,
        })
    }
}

/// The `authorization` value, marked sensitive so HTTP/2 never indexes it.
fn bearer(join_token: &SecretString) -> anyhow::Result<MetadataValue<tonic::metadata::Ascii>> {
    let mut value = MetadataValue::try_from(format!("Bearer {}", join_token.expose_secret()))
        .map_err(|_| {
            anyhow::anyhow!("the join token contains characters not allowed in gRPC metadata")
        })?;
    value.set_sensitive(true);
    Ok(value)
}

impl GrpcConnector {
    async fn dial(&self, outbound: Outbound) -> anyhow::Result<Inbound> {
        info!("Connecting to gateway {}", self.endpoint.uri());
        let channel = match &self.tls {
            Some(tls) => {
                let config = tls.load()?;
                self.endpoint
                    .clone()
                    .tls_config(config)
                    .context("TLS settings")?
                    .connect()
                    .await?
            }
            None => self.endpoint.connect().await?,
        };
        let mut request = tonic::Request::new(outbound);
        if let Some(join_token) = &self.join_token {
            request
                .metadata_mut()
                .insert("authorization", bearer(join_token)?);
        }
        let inbound = NodeServiceClient::new(channel)
            .attach(request)
            .await?
            .into_inner();
        Ok(inbound.boxed())
    }
}

impl GatewayConnector for GrpcConnector {
    fn attach(&self, outbound: Outbound) -> BoxFuture<'_, anyhow::Result<Inbound>> {
        Box::pin(self.dial(outbound))
    }
}

/// Why a task's execution was cancelled; the first source recorded wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelSource {
    /// Oz asked (`task_cancellation`).
    User,
    /// The node agent is stopping.
    Shutdown,
}

struct Running {
    execution_id: String,
    cancel: CancellationToken,
    source: Option<CancelSource>,
}

struct NodeState {
    running: HashMap<String, Running>,
    /// Outcomes not yet acknowledged, keyed by (task id, execution id).
    unacknowledged: BTreeMap<(String, String), TaskOutcome>,
    /// The live attach stream, if any.
    link: Option<UnboundedSender<AttachRequest>>,
    shutting_down: bool,
    reported: ReportedLog,
}

impl NodeState {
    fn send(&self, kind: attach_request::Kind) {
        if let Some(link) = &self.link {
            let _ = link.send(AttachRequest { kind: Some(kind) });
        }
    }
}

struct Node {
    config: NodeConfig,
    node_id: String,
    /// Identifies this process to the gateway, which refuses a second process claiming
    /// the same node id while one is attached.
    instance_id: String,
    backend: Arc<dyn TaskBackend>,
    connector: Arc<dyn GatewayConnector>,
    state: Mutex<NodeState>,
    changed: tokio::sync::Notify,
    /// Owns every task run.
    runs: TaskTracker,
    /// Fired when the node stops: runs still going are dropped.
    abandon: CancellationToken,
    metrics: NodeMetrics,
    tracer: Option<BoxedTracer>,
    /// Outcomes not yet acknowledged, on disk.
    outcomes: OutcomeStore,
    /// Whether the node is attached to the gateway (for health probes).
    attached: tokio::sync::watch::Sender<bool>,
}

/// Runs the node agent until `shutdown`, then cancels its tasks, waits for them
/// (bounded by `shutdown_grace`), delivers their outcomes and stops.
pub async fn run(
    config: NodeConfig,
    backend: Arc<dyn TaskBackend>,
    connector: Arc<dyn GatewayConnector>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_observed(
        config,
        backend,
        connector,
        NodeTelemetry::disabled(),
        shutdown,
    )
    .await
}

/// [`run`], recording `ozfleet_agent_*` metrics and execution spans with `telemetry`.
pub async fn run_observed(
    config: NodeConfig,
    backend: Arc<dyn TaskBackend>,
    connector: Arc<dyn GatewayConnector>,
    telemetry: NodeTelemetry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state_dir = config.state_dir.clone();
    let node_id = tokio::task::spawn_blocking(move || load_or_create_node_id(&state_dir))
        .await
        .context("reading the node identity did not finish")??;
    let (reported, reported_writer) =
        ReportedLog::open(&config.state_dir)
            .await
            .with_context(|| {
                format!(
                    "cannot read the reported executions in {}",
                    config.state_dir.display()
                )
            })?;
    // Outcomes a killed agent had not delivered: announced in the first hello.
    let outcomes = OutcomeStore::new(&config.state_dir);
    let pending = {
        let outcomes = outcomes.clone();
        tokio::task::spawn_blocking(move || outcomes.load())
            .await
            .context("reading the pending outcomes did not finish")?
            .with_context(|| {
                format!(
                    "cannot read the pending outcomes in {}",
                    config.state_dir.display()
                )
            })?
    };
    let mut unacknowledged = BTreeMap::new();
    for (key, outcome) in pending {
        if reported.contains(&key.0, &key.1) {
            // Acknowledged just before the agent stopped: only the file was left.
            let _ = outcomes.remove(&key.0, &key.1);
        } else {
            unacknowledged.insert(key, outcome);
        }
    }
    if !unacknowledged.is_empty() {
        info!(
            count = unacknowledged.len(),
            "Re-sending outcomes the gateway had not acknowledged"
        );
    }
    info!(
        node_id,
        node_name = config.node_name,
        backend = backend.kind().as_str_name(),
        max_concurrent_tasks = config.max_concurrent_tasks,
        "Node agent starting"
    );
    let node = Arc::new(Node {
        config,
        node_id,
        instance_id: uuid::Uuid::new_v4().to_string(),
        backend,
        connector,
        state: Mutex::new(NodeState {
            running: HashMap::new(),
            unacknowledged,
            link: None,
            shutting_down: false,
            reported,
        }),
        changed: tokio::sync::Notify::new(),
        runs: TaskTracker::new(),
        abandon: CancellationToken::new(),
        metrics: NodeMetrics::new(&telemetry.meter),
        tracer: telemetry.tracer,
        outcomes,
        attached: telemetry.attached,
    });
    register_gauges(&telemetry.meter, &node);
    // Tasks an earlier run of this agent left behind are resumed before the first hello,
    // so the gateway learns about them from the node's very first full-state report.
    for task in node.backend.recover().await {
        if node
            .lock()
            .reported
            .contains(&task.task_id, &task.execution_id)
        {
            debug!(
                task_id = task.task_id,
                "Kept container of an already reported task"
            );
            continue;
        }
        node.resume(task);
    }

    let session = async {
        let stop_connecting = CancellationToken::new();
        let stopping = async {
            shutdown.cancelled().await;
            node.drain().await;
            stop_connecting.cancel();
        };
        tokio::join!(node.stay_connected(&stop_connecting), stopping);
        node.abandon.cancel();
        node.runs.close();
        node.runs.wait().await;
        // Every acknowledgement is in; the writer finishes the queued records and ends.
        node.lock().reported.close();
    };
    tokio::join!(session, reported_writer.run());
    node.backend.shutdown(BACKEND_SHUTDOWN_TIMEOUT).await;
    info!("Node agent stopped");
    Ok(())
}

impl Node {
    /// A panic never happens under this lock (it guards plain data updates), so a
    /// poisoned lock still holds consistent state.
    fn lock(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn stay_connected(self: &Arc<Self>, stop: &CancellationToken) {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        reconnect_loop(
            backoff,
            STABLE_CONNECTION,
            AfterStable::AfterInitialDelay,
            stop,
            || async {
                let mut connected_at = None;
                let result = tokio::select! {
                    result = self.session(&mut connected_at) => result,
                    () = stop.cancelled() => Ok(()),
                };
                self.lock().link = None;
                self.attached.send_replace(false);
                if !stop.is_cancelled() {
                    self.metrics.reconnects.add(1, &[]);
                    match result {
                        Ok(()) => warn!("Gateway closed the attach stream; reconnecting"),
                        Err(error) => error!("Gateway connection failed: {error:#}"),
                    }
                    if connected_at.is_some_and(|at| at.elapsed() >= STABLE_CONNECTION) {
                        tokio::select! {
                            () = tokio::time::sleep(reattach_spread()) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                }
                connected_at
            },
        )
        .await;
    }

    fn hello(&self, state: &NodeState) -> NodeHello {
        NodeHello {
            node_id: self.node_id.clone(),
            node_name: self.config.node_name.clone(),
            backend: self.backend.kind().into(),
            max_concurrent_tasks: self.config.max_concurrent_tasks,
            labels: self.config.labels.clone().into_iter().collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            running_tasks: state
                .running
                .iter()
                .map(|(task_id, running)| TaskRef {
                    task_id: task_id.clone(),
                    execution_id: running.execution_id.clone(),
                })
                .collect(),
            unacknowledged_outcomes: state.unacknowledged.values().cloned().collect(),
            instance_id: self.instance_id.clone(),
        }
    }

    /// One attach stream, from the hello until the gateway ends it. `connected_at` is set
    /// once the gateway accepted the stream.
    async fn session(self: &Arc<Self>, connected_at: &mut Option<Instant>) -> anyhow::Result<()> {
        let (link, outbound) = tokio::sync::mpsc::unbounded_channel();
        {
            // The hello snapshot and the link switch happen under one lock so no outcome
            // falls between them.
            let mut state = self.lock();
            let hello = self.hello(&state);
            let _ = link.send(AttachRequest {
                kind: Some(attach_request::Kind::Hello(hello)),
            });
            state.link = Some(link);
        }
        let mut inbound = self
            .connector
            .attach(UnboundedReceiverStream::new(outbound))
            .await?;
        *connected_at = Some(Instant::now());
        while let Some(message) = inbound.next().await {
            match message?.kind {
                Some(attach_response::Kind::Welcome(welcome)) => {
                    info!(
                        node_id = self.node_id,
                        epoch = welcome.epoch,
                        worker_id = welcome.worker_id,
                        "Attached to gateway"
                    );
                    self.attached.send_replace(true);
                }
                Some(attach_response::Kind::Assignment(assignment)) => {
                    self.on_assignment(assignment)
                }
                Some(attach_response::Kind::Cancellation(cancellation)) => self.cancel(
                    &cancellation.task_id,
                    Some(&cancellation.execution_id),
                    CancelSource::User,
                ),
                Some(attach_response::Kind::OutcomeAck(ack)) => {
                    let mut state = self.lock();
                    state.reported.record(&ack.task_id, &ack.execution_id);
                    state
                        .unacknowledged
                        .remove(&(ack.task_id.clone(), ack.execution_id.clone()));
                    drop(state);
                    self.changed.notify_waiters();
                    let store = self.outcomes.clone();
                    self.runs.spawn_blocking(move || {
                        if let Err(error) = store.remove(&ack.task_id, &ack.execution_id) {
                            warn!(
                                task_id = ack.task_id,
                                "Cannot forget an acknowledged outcome: {error}"
                            );
                        }
                    });
                }
                None => warn!("Ignoring an empty message from the gateway"),
            }
        }
        Ok(())
    }

    fn on_assignment(self: &Arc<Self>, assignment: v1::TaskAssignment) {
        let task_id = assignment.task_id.clone();
        let execution_id = assignment.execution_id.clone();
        let mut state = self.lock();
        let refusal = if state.shutting_down {
            Some("node is shutting down".to_owned())
        } else if let Some(running) = state.running.get(&task_id) {
            if running.execution_id == execution_id {
                // A repeated offer (e.g. after a reconnect): accepting again is idempotent.
                state.send(attach_request::Kind::Accepted(v1::AssignmentAccepted {
                    task_id,
                    execution_id,
                }));
                return;
            }
            Some(format!(
                "task is already running here as execution {}",
                running.execution_id
            ))
        } else if self.config.max_concurrent_tasks > 0
            && state.running.len() >= self.config.max_concurrent_tasks as usize
        {
            Some("node at maximum concurrency".to_owned())
        } else {
            None
        };
        if let Some(reason) = refusal {
            info!(task_id, reason, "Refusing task");
            state.send(attach_request::Kind::Refused(v1::AssignmentRefused {
                task_id,
                execution_id,
                reason,
            }));
            return;
        }
        let cancel = CancellationToken::new();
        state.running.insert(
            task_id.clone(),
            Running {
                execution_id: execution_id.clone(),
                cancel: cancel.clone(),
                source: None,
            },
        );
        state.send(attach_request::Kind::Accepted(v1::AssignmentAccepted {
            task_id: task_id.clone(),
            execution_id: execution_id.clone(),
        }));
        drop(state);
        info!(
            task_id,
            execution_id,
            node_id = self.node_id,
            "Task accepted; starting it"
        );
        let node = self.clone();
        let trace_context = assignment.trace_context.clone();
        self.supervise(task_id, execution_id, &trace_context, async move {
            node.execute(&assignment, cancel).await
        });
    }

    fn resume(self: &Arc<Self>, task: RecoveredTask) {
        let cancel = CancellationToken::new();
        let (task_id, execution_id) = (task.task_id.clone(), task.execution_id.clone());
        self.lock().running.insert(
            task_id.clone(),
            Running {
                execution_id: execution_id.clone(),
                cancel: cancel.clone(),
                source: None,
            },
        );
        info!(
            task_id,
            execution_id,
            handle = task.handle,
            "Resuming a task left by an earlier run of this agent"
        );
        let node = self.clone();
        self.supervise(task_id, execution_id, &HashMap::new(), async move {
            node.backend.resume(task, cancel).await
        });
    }

    /// Runs a task in the node's tracker and reports how it ended, a panic included. The
    /// run is dropped if it is still going when the node stops.
    fn supervise(
        self: &Arc<Self>,
        task_id: String,
        execution_id: String,
        trace_context: &HashMap<String, String>,
        run: impl Future<Output = Result<(), TaskFailure>> + Send + 'static,
    ) {
        let node = self.clone();
        let backend = kind_name(self.backend.kind());
        let mut span = execution_span(
            self.tracer.as_ref(),
            trace_context,
            vec![
                KeyValue::new("task.id", task_id.clone()),
                KeyValue::new("execution.id", execution_id.clone()),
                KeyValue::new("node.id", self.node_id.clone()),
                KeyValue::new("worker.backend", backend),
            ],
        );
        if let Some(span) = span.as_mut() {
            span.add_event("backend.started", vec![KeyValue::new("backend", backend)]);
        }
        self.metrics.started();
        self.runs.spawn(async move {
            let started = Instant::now();
            let result = tokio::select! {
                result = AssertUnwindSafe(run).catch_unwind() => result.unwrap_or_else(|_| {
                    error!(task_id, execution_id, "Task run panicked; reporting it as failed");
                    Err(TaskFailure::new(FailureReason::Unknown, PANICKED_ERROR))
                }),
                () = node.abandon.cancelled() => {
                    warn!(task_id, "Task still running as the node stops; abandoning it");
                    return;
                }
            };
            let took = started.elapsed();
            let result = node.finish(&task_id, &execution_id, result, took).await;
            node.metrics.finished(&result, took.as_secs_f64());
            end_span(span, &result);
        });
    }

    async fn execute(
        &self,
        assignment: &v1::TaskAssignment,
        cancel: CancellationToken,
    ) -> Result<(), TaskFailure> {
        let oz_assignment =
            oz::parse_assignment_data(&assignment.oz_assignment_json).map_err(|error| {
                TaskFailure::new(
                    FailureReason::Unknown,
                    format!("invalid assignment: {error}"),
                )
            })?;
        let settings = assignment.settings.clone().unwrap_or_default();
        let non_empty = |value: String| (!value.is_empty()).then_some(value);
        let argv_settings = ArgvSettings {
            server_root_url: settings.server_root_url.clone(),
            idle_on_complete: self
                .config
                .idle_on_complete
                .clone()
                .or_else(|| non_empty(settings.idle_on_complete)),
            session_sharing_server_url: non_empty(settings.session_sharing_server_url),
        };
        let harness = oz_assignment
            .task
            .agent_config_snapshot
            .as_ref()
            .and_then(|config| config.harness_type())
            .map(str::trim)
            .filter(|harness| !harness.is_empty())
            .map(str::to_owned);
        let task = TaskRun {
            task_id: assignment.task_id.clone(),
            execution_id: assignment.execution_id.clone(),
            base_args: build_base_args(&oz_assignment, &argv_settings),
            env: common_task_env(&oz_assignment, &settings.server_root_url),
            harness,
            image: images::task_image(&oz_assignment),
            sidecars: images::sidecars(&oz_assignment),
            instance_shape: oz_assignment.instance_shape,
        };
        self.backend.execute(task, cancel).await
    }

    /// Records the outcome durably, then keeps it until acknowledged and sends it;
    /// returns it. The task stays in `running` until its outcome is kept, so a hello in
    /// between still lists it (the gateway must never see it vanish without an outcome).
    async fn finish(
        &self,
        task_id: &str,
        execution_id: &str,
        result: Result<(), TaskFailure>,
        took: Duration,
    ) -> task_outcome::Result {
        let source = self
            .lock()
            .running
            .get(task_id)
            .filter(|running| running.execution_id == execution_id)
            .and_then(|running| running.source);
        let result = outcome_result(result, source);
        match &result {
            task_outcome::Result::Failed(failed) => info!(
                task_id,
                reason = failed.failure_reason,
                exit_code = failed.exit_code,
                "Task failed after {took:.1?}"
            ),
            task_outcome::Result::Succeeded(_) => info!(task_id, "Task succeeded after {took:.1?}"),
            task_outcome::Result::Cancelled(_) => info!(task_id, "Task cancelled after {took:.1?}"),
        }
        let outcome = TaskOutcome {
            task_id: task_id.to_owned(),
            execution_id: execution_id.to_owned(),
            result: Some(result.clone()),
        };
        let store = self.outcomes.clone();
        let to_save = outcome.clone();
        match tokio::task::spawn_blocking(move || store.save(&to_save)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(
                task_id,
                "Cannot keep the outcome in the state dir ({error}); reporting it anyway"
            ),
            Err(error) => warn!(task_id, "Keeping the outcome did not finish: {error}"),
        }
        let mut state = self.lock();
        if state
            .running
            .get(task_id)
            .is_some_and(|running| running.execution_id == execution_id)
        {
            state.running.remove(task_id);
        }
        state.unacknowledged.insert(
            (task_id.to_owned(), execution_id.to_owned()),
            outcome.clone(),
        );
        state.send(attach_request::Kind::Outcome(outcome));
        drop(state);
        self.changed.notify_waiters();
        result
    }

    /// Cancels the task; with `execution_id`, only that execution (a stale cancellation
    /// must not stop a newer execution of the same run).
    fn cancel(&self, task_id: &str, execution_id: Option<&str>, source: CancelSource) {
        let mut state = self.lock();
        match state.running.get_mut(task_id) {
            Some(running)
                if execution_id.is_some_and(|execution| execution != running.execution_id) =>
            {
                warn!(
                    task_id,
                    running_execution_id = running.execution_id,
                    "Ignoring a cancellation for another execution"
                );
            }
            Some(running) => {
                running.source.get_or_insert(source);
                info!(task_id, ?source, "Cancelling task");
                running.cancel.cancel();
            }
            None => warn!(task_id, "Cancellation for a task that is not running here"),
        }
    }

    /// Shutdown: stop taking tasks, cancel the running ones, wait for them to end and for
    /// their outcomes to be acknowledged (each bounded).
    async fn drain(&self) {
        let task_ids: Vec<String> = {
            let mut state = self.lock();
            state.shutting_down = true;
            state.running.keys().cloned().collect()
        };
        if self.backend.preserves_tasks_on_shutdown() {
            // Tasks outlive the agent (Kubernetes Jobs): they are left running, unreported,
            // for the next run of this agent to recover.
            if !task_ids.is_empty() {
                info!(
                    count = task_ids.len(),
                    "Leaving running tasks to the backend for the next agent run"
                );
            }
            let delivered = self
                .wait_until(ACK_WAIT, |state| {
                    state.unacknowledged.is_empty() || state.link.is_none()
                })
                .await;
            if !delivered {
                warn!("Stopping with outcomes the gateway has not acknowledged");
            }
            return;
        }
        if !task_ids.is_empty() {
            info!(
                count = task_ids.len(),
                "Cancelling running tasks for shutdown"
            );
        }
        for task_id in &task_ids {
            self.cancel(task_id, None, CancelSource::Shutdown);
        }
        self.wait_until(self.config.shutdown_grace, |state| state.running.is_empty())
            .await;
        let delivered = self
            .wait_until(ACK_WAIT, |state| {
                state.unacknowledged.is_empty() || state.link.is_none()
            })
            .await;
        let pending = self.lock().unacknowledged.len();
        if !delivered || pending > 0 {
            warn!(
                pending,
                "Stopping with outcomes the gateway has not acknowledged"
            );
        }
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&NodeState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if done(&self.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done(&self.lock());
            }
        }
    }
}

/// The node's gauges, read at collection time.
fn register_gauges(meter: &Meter, node: &Arc<Node>) {
    let weak = Arc::downgrade(node);
    meter
        .i64_observable_gauge("ozfleet_agent_tasks_active")
        .with_description("Task executions running on this node agent.")
        .with_callback(move |observer| {
            if let Some(node) = weak.upgrade() {
                observer.observe(node.lock().running.len() as i64, &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(node);
    meter
        .i64_observable_gauge("ozfleet_agent_gateway_connected")
        .with_description("1 while the node agent has an attach stream to the gateway.")
        .with_callback(move |observer| {
            if let Some(node) = weak.upgrade() {
                observer.observe(i64::from(node.lock().link.is_some()), &[]);
            }
        })
        .build();
    let capacity = i64::from(node.config.max_concurrent_tasks);
    meter
        .i64_observable_gauge("ozfleet_agent_max_concurrent_tasks")
        .with_description("This node's maximum concurrent tasks (0 = unlimited).")
        .with_callback(move |observer| observer.observe(capacity, &[]))
        .build();
}

/// Turns a backend result into the outcome the gateway relays (spec §1.9, §3.6, §9.1).
pub fn outcome_result(
    result: Result<(), TaskFailure>,
    source: Option<CancelSource>,
) -> task_outcome::Result {
    let failure = match result {
        Ok(()) => return task_outcome::Result::Succeeded(v1::TaskSucceeded {}),
        Err(failure) => failure,
    };
    if source == Some(CancelSource::User) {
        return task_outcome::Result::Cancelled(v1::TaskCancelled {});
    }
    let mut reason = failure.reason;
    if source == Some(CancelSource::Shutdown)
        && (reason == FailureReason::TaskCancelled || failure.exit_code == 143)
    {
        reason = FailureReason::GracefulShutdown;
    }
    let message = match failure.reason {
        FailureReason::TaskCancelled => oz::INTERRUPTED_MESSAGE.to_owned(),
        FailureReason::TaskTimeout => oz::TIMEOUT_MESSAGE.to_owned(),
        _ => oz::failed_to_execute_message(&failure.error),
    };
    task_outcome::Result::Failed(v1::TaskFailed {
        failure_reason: reason.as_str().to_owned(),
        exit_code: failure.exit_code,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(result: task_outcome::Result) -> v1::TaskFailed {
        match result {
            task_outcome::Result::Failed(failed) => failed,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn nodes_ping_after_their_own_interval_in_the_last_quarter_of_the_keepalive() {
        let drawn: Vec<Duration> = (0..1_000).map(|_| keepalive_interval()).collect();
        assert!(
            drawn
                .iter()
                .all(|interval| (KEEPALIVE.mul_f64(0.75)..=KEEPALIVE).contains(interval))
        );
        let distinct: std::collections::HashSet<_> = drawn.iter().collect();
        assert!(
            distinct.len() > 900,
            "{} distinct intervals of 1,000",
            distinct.len()
        );
    }

    #[test]
    fn success_is_success_whatever_the_source() {
        assert_eq!(
            outcome_result(Ok(()), None),
            task_outcome::Result::Succeeded(v1::TaskSucceeded {})
        );
    }

    #[test]
    fn user_cancellation_reports_cancelled() {
        let failure = TaskFailure::new(FailureReason::TaskCancelled, "context canceled");
        assert_eq!(
            outcome_result(Err(failure), Some(CancelSource::User)),
            task_outcome::Result::Cancelled(v1::TaskCancelled {})
        );
    }

    #[test]
    fn shutdown_cancellation_is_graceful_shutdown_with_the_interrupted_text() {
        let failure =
            TaskFailure::new(FailureReason::TaskCancelled, "context canceled").with_exit_code(143);
        let failed = failed(outcome_result(Err(failure), Some(CancelSource::Shutdown)));
        assert_eq!(failed.failure_reason, "graceful_shutdown");
        assert_eq!(failed.exit_code, 143);
        assert_eq!(failed.message, oz::INTERRUPTED_MESSAGE);
    }

    #[test]
    fn agent_exiting_143_during_shutdown_is_graceful_shutdown_with_its_own_text() {
        let failure = TaskFailure::new(
            FailureReason::AgentInvocation,
            "oz agent exited with error: exit status 143",
        )
        .with_exit_code(143);
        let failed = failed(outcome_result(Err(failure), Some(CancelSource::Shutdown)));
        assert_eq!(failed.failure_reason, "graceful_shutdown");
        assert_eq!(
            failed.message,
            "Failed to execute task: oz agent exited with error: exit status 143"
        );
    }

    #[test]
    fn plain_failures_keep_reason_code_and_backend_text() {
        let failure = TaskFailure::new(
            FailureReason::AgentInvocation,
            "oz agent exited with error: exit status 3",
        )
        .with_exit_code(3);
        let failed = failed(outcome_result(Err(failure), None));
        assert_eq!(failed.failure_reason, "agent_invocation");
        assert_eq!(failed.exit_code, 3);
        assert_eq!(
            failed.message,
            "Failed to execute task: oz agent exited with error: exit status 3"
        );
    }

    #[test]
    fn cancellation_without_a_request_is_a_task_cancelled_failure() {
        let failure = TaskFailure::new(FailureReason::TaskCancelled, "context canceled");
        let failed = failed(outcome_result(Err(failure), None));
        assert_eq!(failed.failure_reason, "task_cancelled");
        assert_eq!(failed.message, oz::INTERRUPTED_MESSAGE);
    }

    #[test]
    fn timeouts_use_the_deadline_text() {
        let failure = TaskFailure::new(FailureReason::TaskTimeout, "deadline exceeded");
        let failed = failed(outcome_result(Err(failure), None));
        assert_eq!(failed.failure_reason, "task_timeout");
        assert_eq!(failed.message, oz::TIMEOUT_MESSAGE);
    }
}
