//! ozfleet gateway: holds the single outbound connection to Oz, keeps the registry of
//! node agents, places each assigned task on a node and relays claims, rejections,
//! cancellations and outcomes.

//!
//! Where each job lives: [`upstream`] (the Oz WebSocket), [`outbox`] (messages to Oz that
//! survive reconnects), [`fleet`] (the state machine: node registry, placement, task
//! ledger, reconciliation, deadlines, events), [`node_api`] (the gRPC endpoint nodes
//! attach to), [`proxy`] (reaching Oz through an HTTP proxy).

pub mod admin;
pub mod fleet;
pub mod metrics;
pub mod node_api;
mod node_server;
pub mod outbox;
pub mod proxy;
mod spare;
pub mod tls;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use ozfleet_proto::v1::UpstreamSettings;
use ozfleet_proto::v1::admin_service_server::AdminServiceServer;
use ozfleet_proto::v1::node_service_server::NodeServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use admin::AdminToken;
pub use fleet::{Fleet, FleetEvent, FleetSnapshot, FleetTimings};
pub use node_api::JoinToken;
pub use proxy::ProxyEnv;
pub use tls::{NodeTls, NodeTlsFiles};
pub use upstream::{Keepalive, UpstreamConfig};

/// How long the node gRPC server may take to close once asked to stop.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 limits of one node connection (see the node server builder).
const NODE_MAX_STREAMS: u32 = 4;
const NODE_STREAM_WINDOW: u32 = 64 * 1024;
const NODE_CONNECTION_WINDOW: u32 = 128 * 1024;

/// Sets `TCP_NODELAY` on every accepted connection (nodes and operators): tonic's own
/// `tcp_nodelay` setting does not apply to `serve_with_incoming*`, and with Nagle's
/// algorithm on, a small message (an assignment, an ack) waits for the peer's delayed
/// ACK (up to ~40 ms).
fn nodelay(
    incoming: TcpListenerStream,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt as _;
    incoming.map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                warn!("Cannot set TCP_NODELAY on an accepted connection: {error}");
            }
        })
    })
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    InvalidNode(String),
    #[error(
        "node id {0} is already attached from another agent process; two hosts seem to share \
         one node identity: give each its own --state-dir (delete the copied node-id file)"
    )]
    DuplicateNode(String),
    #[error(
        "this gateway already knows {0} nodes, its limit (--max-nodes); raise the limit or \
         run another gateway"
    )]
    TooManyNodes(usize),
    #[error("no node {0} is known to this gateway; list the nodes to see their ids")]
    UnknownNode(String),
    #[error(
        "no task {0} is offered or running on this gateway's nodes; list the tasks to see their ids"
    )]
    UnknownTask(String),
    #[error(transparent)]
    Stream(#[from] tonic::Status),
    #[error("gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("cannot read a listener's address: {0}")]
    Listener(#[from] std::io::Error),
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::Stream(status) => status,
            GatewayError::Unauthenticated(_) => tonic::Status::unauthenticated(error.to_string()),
            GatewayError::InvalidNode(_) | GatewayError::InvalidConfig(_) => {
                tonic::Status::invalid_argument(error.to_string())
            }
            GatewayError::DuplicateNode(_) => tonic::Status::already_exists(error.to_string()),
            GatewayError::TooManyNodes(_) => tonic::Status::resource_exhausted(error.to_string()),
            GatewayError::UnknownNode(_) | GatewayError::UnknownTask(_) => {
                tonic::Status::not_found(error.to_string())
            }
            GatewayError::Server(_) | GatewayError::Listener(_) => {
                tonic::Status::internal(error.to_string())
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub upstream: UpstreamConfig,
    /// Worker-wide values nodes need for the `oz agent run` argv.
    pub settings: UpstreamSettings,
    pub join_token: JoinToken,
    /// Required by every admin call when set; required to serve admin off loopback.
    pub admin_token: Option<AdminToken>,
    pub timings: FleetTimings,
    /// How nodes attach: mTLS or plain (loopback, or explicitly insecure).
    pub node_link: NodeLink,
    /// Most nodes the gateway keeps (attached, or away within the grace); more are refused.
    pub max_nodes: usize,
    /// Where the gateway journals what it hands out, so a restart neither loses nor
    /// repeats work (see [`fleet::journal`]). `None`: a restart forgets.
    pub state_dir: Option<std::path::PathBuf>,
}

/// The node link's security: mTLS with the fleet CA, or plain TCP, which the gateway
/// serves off loopback only when `allow_insecure` says so.
#[derive(Debug, Clone, Default)]
pub struct NodeLink {
    pub tls: Option<NodeTlsFiles>,
    /// `--insecure-node-link`: plain TCP on a non-loopback address (logged at start).
    pub allow_insecure: bool,
}

impl NodeLink {
    /// Why the node listener at `address` must not be served with these settings.
    pub fn check(&self, address: std::net::SocketAddr) -> Result<(), GatewayError> {
        if self.tls.is_none() && !self.allow_insecure && !address.ip().is_loopback() {
            return Err(GatewayError::InvalidConfig(format!(
                "--listen {address} is reachable from other hosts but the node link has no TLS: \
                 set --tls-cert, --tls-key and --tls-client-ca (see `ozfleet certs`), listen on \
                 loopback, or accept a plain-text node link with --insecure-node-link"
            )));
        }
        Ok(())
    }
}

/// The default of [`GatewayConfig::max_nodes`]: far above a real fleet, far below what
/// would exhaust memory (about 40 KB per attached node).
pub const DEFAULT_MAX_NODES: usize = 50_000;

/// The gateway's listeners, bound by the caller (tests bind `127.0.0.1:0`).
pub struct GatewayListeners {
    /// Node agents attach here.
    pub node: TcpListener,
    /// Operators: the admin API, health and reflection.
    pub admin: TcpListener,
}

/// Runs the gateway until `shutdown`: the Oz connection, the node API on the node
/// listener and the admin API on the admin listener (each with gRPC health and server
/// reflection).
pub async fn run(
    listeners: GatewayListeners,
    config: GatewayConfig,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let outbox = Arc::new(outbox::Outbox::default());
    let (fleet, journal) = build_fleet(&config, &outbox).await?;
    serve(listeners, config, fleet, outbox, journal, shutdown).await
}

/// The fleet, journaling into the state dir when there is one.
async fn build_fleet(
    config: &GatewayConfig,
    outbox: &Arc<outbox::Outbox>,
) -> Result<(Arc<Fleet>, Option<fleet::journal::JournalWriter>), GatewayError> {
    let Some(state_dir) = config.state_dir.clone() else {
        warn!("No --state-dir: a restart of this gateway forgets which node runs what");
        let fleet = Fleet::new(
            outbox.clone(),
            config.settings.clone(),
            config.timings.clone(),
        );
        return Ok((fleet, None));
    };
    let shown = state_dir.display().to_string();
    let (journal, writer, recovered) =
        tokio::task::spawn_blocking(move || fleet::journal::Journal::open(&state_dir))
            .await
            .map_err(|error| GatewayError::InvalidConfig(format!("reading the journal: {error}")))?
            .map_err(|error| {
                GatewayError::InvalidConfig(format!(
                    "cannot use the state dir {shown} (--state-dir): {error}"
                ))
            })?;
    // Write-ahead: Oz hears of a claim or an outcome only once its journal entry is on disk.
    outbox.write_ahead_of(journal.durability());
    let fleet = Fleet::with_journal(
        outbox.clone(),
        config.settings.clone(),
        config.timings.clone(),
        journal,
        recovered,
    );
    fleet.limit_nodes(config.max_nodes);
    Ok((fleet, Some(writer)))
}

fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    GatewayError,
> {
    // Both reflection versions: grpcurl and many other clients still speak v1alpha.
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ozfleet_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let error = |error: tonic_reflection::server::Error| {
        GatewayError::InvalidConfig(format!("reflection: {error}"))
    };
    Ok((
        builder().build_v1().map_err(error)?,
        builder().build_v1alpha().map_err(error)?,
    ))
}

/// [`run`], observed: the reference's metric catalog and the fleet metrics on the
/// telemetry's meter (see [`metrics`]), and one span per task when traces are on.
pub async fn run_observed(
    listeners: GatewayListeners,
    config: GatewayConfig,
    telemetry: &ozfleet_telemetry::Telemetry,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let outbox = Arc::new(outbox::Outbox::default());
    let (fleet, journal) = build_fleet(&config, &outbox).await?;
    metrics::register(&telemetry.meter(), &fleet, &config.upstream.worker_id);
    if let Some(tracer) = telemetry.tracer() {
        fleet.trace_with(tracer);
    }
    serve(listeners, config, fleet, outbox, journal, shutdown).await
}

/// [`run`] with a fleet built by the caller, who can then watch its events and
/// snapshots.
pub async fn run_with_fleet(
    listeners: GatewayListeners,
    config: GatewayConfig,
    fleet: Arc<Fleet>,
    outbox: Arc<outbox::Outbox>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    serve(listeners, config, fleet, outbox, None, shutdown).await
}

async fn serve(
    listeners: GatewayListeners,
    config: GatewayConfig,
    fleet: Arc<Fleet>,
    outbox: Arc<outbox::Outbox>,
    journal: Option<fleet::journal::JournalWriter>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    // Validate before anything starts, so a bad URL fails the process instead of a loop.
    upstream::connect_url(&config.upstream.web_socket_url, &config.upstream.worker_id)?;
    let admin_address = listeners.admin.local_addr()?;
    let node_address = listeners.node.local_addr()?;
    config.node_link.check(node_address)?;
    if config.join_token.is_certificate_only() && config.node_link.tls.is_none() {
        return Err(GatewayError::InvalidConfig(
            "a join token is required unless the node link uses TLS".into(),
        ));
    }
    let node_tls = config
        .node_link
        .tls
        .as_ref()
        .map(NodeTls::load)
        .transpose()?;
    if node_tls.is_none() && !node_address.ip().is_loopback() {
        warn!(
            "The node link on {node_address} is plain TCP (--insecure-node-link): join tokens, \
             tasks and their environments cross the network unencrypted and any host that \
             holds the join token can attach; use --tls-cert, --tls-key and --tls-client-ca"
        );
    }
    if config.admin_token.is_none() && !admin_address.ip().is_loopback() {
        return Err(GatewayError::InvalidConfig(format!(
            "--admin-listen {admin_address} is reachable from other hosts but no admin token is set: \
             set --admin-token-file or OZFLEET_ADMIN_TOKEN, or listen on loopback"
        )));
    }

    let (health, node_health) = tonic_health::server::health_reporter();
    health
        .set_serving::<NodeServiceServer<node_api::NodeApi>>()
        .await;
    let admin_health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    );
    let server_stop = CancellationToken::new();
    let attach_streams = TaskTracker::new();
    let node_api = NodeServiceServer::new(node_api::NodeApi::new(
        fleet.clone(),
        config.join_token,
        attach_streams.clone(),
        server_stop.clone(),
    ));
    let admin_api = AdminServiceServer::with_interceptor(
        admin::AdminApi::new(
            fleet.clone(),
            config.upstream.worker_id.clone(),
            server_stop.clone(),
        ),
        admin::AdminAuth::new(config.admin_token),
    );

    info!(
        worker_id = config.upstream.worker_id,
        node_tls = node_tls.is_some(),
        "Gateway listening for node agents on {node_address}, for operators on {admin_address}"
    );
    let (reflection, reflection_v1alpha) = reflection_services()?;
    let node_routes = tonic::service::Routes::new(node_health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(node_api);
    // A node needs one stream (plus health and reflection for operators) and sends
    // little: small windows bound what one connection may buffer (hyper's defaults are
    // 1 MB each, per node).
    let node_connections = node_server::NodeConnectionSettings {
        keepalive: config.timings.node_keepalive,
        max_concurrent_streams: NODE_MAX_STREAMS,
        stream_window: NODE_STREAM_WINDOW,
        connection_window: NODE_CONNECTION_WINDOW,
    };
    let serve_nodes: futures::future::BoxFuture<'static, ()> = match &node_tls {
        Some(node_tls) => Box::pin(node_server::serve(
            node_tls.incoming(listeners.node),
            node_routes,
            node_connections,
            server_stop.clone(),
        )),
        None => Box::pin(node_server::serve(
            nodelay(TcpListenerStream::new(listeners.node)),
            node_routes,
            node_connections,
            server_stop.clone(),
        )),
    };
    let (reflection, reflection_v1alpha) = reflection_services()?;
    let serve_admin = tonic::transport::Server::builder()
        .add_service(admin_health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(admin_api)
        .serve_with_incoming_shutdown(
            nodelay(TcpListenerStream::new(listeners.admin)),
            server_stop.clone().cancelled_owned(),
        );
    let mut servers = JoinSet::new();
    servers.spawn(async move {
        serve_nodes.await;
        Ok(())
    });
    servers.spawn(async move { serve_admin.await.map_err(GatewayError::from) });
    let background_stop = CancellationToken::new();
    let mut background = JoinSet::new();
    if let Some(journal) = journal {
        background.spawn_blocking(move || {
            if let Err(error) = journal.run() {
                // The fleet goes on (messages to Oz are no longer held for the journal);
                // only the restart protection is lost.
                error!(
                    "Cannot write the journal in the state dir: {error}; until this gateway is \
                     restarted with a writable --state-dir, a restart forgets which node runs what"
                );
            }
        });
    }
    background.spawn({
        let fleet = fleet.clone();
        let stop = background_stop.clone();
        async move { fleet.run_deadlines(stop).await }
    });
    background.spawn(admin::track_readiness(
        fleet.clone(),
        health,
        background_stop.clone(),
    ));

    let upstream = upstream::run(config.upstream, outbox, fleet.clone(), shutdown.clone());
    let upstream_result = tokio::select! {
        result = upstream => result,
        joined = servers.join_next() => {
            shutdown.cancel();
            background_stop.cancel();
            server_stop.cancel();
            return match joined {
                Some(Ok(result)) => result,
                Some(Err(panic)) => Err(GatewayError::InvalidConfig(format!("a gRPC server task failed: {panic}"))),
                None => Ok(()),
            };
        }
    };

    fleet.close_node_streams();
    fleet.close_journal();
    server_stop.cancel();
    background_stop.cancel();
    attach_streams.close();
    let stopped = async {
        servers.join_all().await;
        attach_streams.wait().await;
        background.join_all().await;
    };
    if tokio::time::timeout(SERVER_STOP_TIMEOUT, stopped)
        .await
        .is_err()
    {
        // Dropping the JoinSets aborts what is left.
        warn!("gRPC servers did not stop within {SERVER_STOP_TIMEOUT:?}; abandoning them");
    }
    info!("Gateway stopped");
    upstream_result
}
