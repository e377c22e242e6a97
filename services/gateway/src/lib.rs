//! ozfleet gateway: holds the single outbound connection to Oz, keeps the registry of
//! node agents, places each assigned task on a node and relays claims, rejections,
//! cancellations and outcomes.

//!
//! Where each job lives: [`upstream`] (the Oz WebSocket), [`outbox`] (messages to Oz that
//! survive reconnects), [`fleet`] (the state machine: node registry, placement, task
//! ledger, reconciliation, deadlines, events), [`node_api`] (the gRPC endpoint nodes
//! attach to), [`proxy`] (reaching Oz through an HTTP proxy).

pub mod fleet;
pub mod node_api;
pub mod outbox;
pub mod proxy;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use ozfleet_proto::v1::UpstreamSettings;
use ozfleet_proto::v1::node_service_server::NodeServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use fleet::{Fleet, FleetEvent, FleetSnapshot, FleetTimings};
pub use node_api::JoinToken;
pub use proxy::ProxyEnv;
pub use upstream::{Keepalive, UpstreamConfig};

/// How long the node gRPC server may take to close once asked to stop.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error("no node {0} is known to this gateway; list the nodes to see their ids")]
    UnknownNode(String),
    #[error(transparent)]
    Stream(#[from] tonic::Status),
    #[error("node API server failed: {0}")]
    Server(#[from] tonic::transport::Error),
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
            GatewayError::UnknownNode(_) => tonic::Status::not_found(error.to_string()),
            GatewayError::Server(_) => tonic::Status::internal(error.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub upstream: UpstreamConfig,
    /// Worker-wide values nodes need for the `oz agent run` argv.
    pub settings: UpstreamSettings,
    pub join_token: JoinToken,
    pub timings: FleetTimings,
}

/// Runs the gateway until `shutdown`: the Oz connection plus the node API (with gRPC
/// health and server reflection) on `node_listener`.
pub async fn run(
    node_listener: TcpListener,
    config: GatewayConfig,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let outbox = Arc::new(outbox::Outbox::default());
    let fleet = Fleet::new(
        outbox.clone(),
        config.settings.clone(),
        config.timings.clone(),
    );
    run_with_fleet(node_listener, config, fleet, outbox, shutdown).await
}

/// [`run`] with a fleet built by the caller, who can then watch its events and
/// snapshots.
pub async fn run_with_fleet(
    node_listener: TcpListener,
    config: GatewayConfig,
    fleet: Arc<Fleet>,
    outbox: Arc<outbox::Outbox>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    // Validate before anything starts, so a bad URL fails the process instead of a loop.
    upstream::connect_url(&config.upstream.web_socket_url, &config.upstream.worker_id)?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<NodeServiceServer<node_api::NodeApi>>()
        .await;
    // Both reflection versions: grpcurl and many other clients still speak v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ozfleet_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |error: tonic_reflection::server::Error| {
        GatewayError::InvalidConfig(format!("reflection: {error}"))
    };
    let reflection = reflection_builder().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(reflection_error)?;
    let server_stop = CancellationToken::new();
    let attach_streams = TaskTracker::new();
    let node_api = NodeServiceServer::new(node_api::NodeApi::new(
        fleet.clone(),
        config.join_token,
        attach_streams.clone(),
        server_stop.clone(),
    ));

    let address = node_listener.local_addr().ok();
    info!(
        worker_id = config.upstream.worker_id,
        "Gateway listening for node agents on {}",
        address.map_or_else(|| "?".into(), |a| a.to_string())
    );
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.timings.node_keepalive))
        .http2_keepalive_timeout(Some(config.timings.node_keepalive))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(node_api)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(node_listener),
            server_stop.clone().cancelled_owned(),
        );
    let mut server = JoinSet::new();
    server.spawn(async move { serve.await.map_err(GatewayError::from) });
    let mut deadlines = JoinSet::new();
    let deadlines_stop = CancellationToken::new();
    deadlines.spawn({
        let fleet = fleet.clone();
        let stop = deadlines_stop.clone();
        async move { fleet.run_deadlines(stop).await }
    });

    let upstream = upstream::run(config.upstream, outbox, fleet.clone(), shutdown.clone());
    let upstream_result = tokio::select! {
        result = upstream => result,
        joined = server.join_next() => {
            shutdown.cancel();
            deadlines_stop.cancel();
            return match joined {
                Some(Ok(result)) => result,
                Some(Err(panic)) => Err(GatewayError::InvalidConfig(format!("node API server task failed: {panic}"))),
                None => Ok(()),
            };
        }
    };

    fleet.close_node_streams();
    server_stop.cancel();
    deadlines_stop.cancel();
    attach_streams.close();
    let stopped = async {
        server.join_all().await;
        attach_streams.wait().await;
        deadlines.join_all().await;
    };
    if tokio::time::timeout(SERVER_STOP_TIMEOUT, stopped)
        .await
        .is_err()
    {
        // Dropping the JoinSets aborts what is left.
        warn!("Node API server did not stop within {SERVER_STOP_TIMEOUT:?}; abandoning it");
    }
    info!("Gateway stopped");
    upstream_result
}
