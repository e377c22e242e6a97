use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinSet;

use anyhow::{Context, bail};
use ozfleet_agent::NodeTelemetry;
use ozfleet_agent::backend::{BackendContext, from_settings};
use ozfleet_agent::identity::load_or_create_node_id;
use ozfleet_agent::tls::ClientTls;
use ozfleet_agent::{GrpcConnector, NodeConfig};
use ozfleet_worker_config::{FileConfig, ImagePullPolicy, MergedConfig, WorkerFlags, merge};

use crate::cli::AgentArgs;
use crate::runtime::shutdown_on_signal;

/// The node id's file in the state dir (see `ozfleet_agent::identity`).
const NODE_ID_FILE: &str = "node-id";
/// SIGTERM to SIGKILL grace for a cancelled task's process group.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
/// How long shutdown waits for cancelled tasks to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

pub async fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let file = args
        .config_file
        .as_deref()
        .map(FileConfig::load)
        .transpose()?;
    let flags = WorkerFlags {
        backend: args.backend.clone(),
        worker_id: None,
        target_dir: args.target_dir.clone(),
        no_cleanup: args.no_cleanup,
        env: args.env.clone(),
        volumes: args.volumes.clone(),
        max_concurrent_tasks: args.max_concurrent_tasks,
        idle_on_complete: args.idle_on_complete.clone(),
    };
    let mut merged = merge(flags, file, &super::process_env)?;
    let node = node_config(&args, &merged)?;
    let tls = client_tls(&args)?;
    let join_token = match super::optional_join_token(&args.join_token)? {
        Some(token) => Some(token.into()),
        // The client certificate alone authenticates this node.
        None if args.tls.tls_cert.is_some() => None,
        None => Some(super::join_token(&args.join_token)?.into()),
    };
    if let Some(cert) = &args.tls.tls_cert {
        bind_node_id_to_certificate(&args.state_dir, cert)?;
    }
    let connector = GrpcConnector::with_tls(&args.gateway, join_token, tls)?;
    apply_overrides(&args, &mut merged)?;
    let context = BackendContext {
        // Docker labels containers with the node id so a restarted agent finds its own.
        node_id: load_or_create_node_id(&args.state_dir)?,
        cancel_grace: CANCEL_GRACE,
        // This very binary leads each Direct task's process group (`ozfleet __task-shim`),
        // so no task process outlives an agent that dies.
        task_shim: std::env::current_exe().ok(),
    };
    let backend = from_settings(merged, context).await?;
    // The same OTEL_* variables as the gateway; node metrics are `ozfleet_agent_*`.
    let identity = ozfleet_telemetry::ServiceIdentity {
        service_name: ozfleet_agent::observe::SERVICE_NAME,
        service_version: env!("CARGO_PKG_VERSION").to_owned(),
        worker_id: String::new(),
        backend: ozfleet_agent::backend::kind_name(backend.kind()).to_owned(),
        scope: ozfleet_agent::observe::SCOPE,
    };
    let telemetry = ozfleet_telemetry::Telemetry::start(&identity, super::process_env).await;
    let observed = NodeTelemetry {
        meter: telemetry.meter(),
        tracer: telemetry.tracer(),
        attached: tokio::sync::watch::Sender::new(false),
    };
    let shutdown = shutdown_on_signal();
    let mut health = JoinSet::new();
    if let Some(address) = args.health_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} (--health-listen)"))?;
        health.spawn(serve_health(
            listener,
            observed.attached.subscribe(),
            shutdown.clone(),
        ));
    }
    let result = ozfleet_agent::run_observed(
        node,
        backend,
        Arc::new(connector),
        observed,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    while health.join_next().await.is_some() {}
    telemetry.shutdown().await;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// gRPC health for probes: "" follows the node's attachment to the gateway, "liveness" is
/// SERVING while the process runs.
async fn serve_health(
    listener: tokio::net::TcpListener,
    mut attached: tokio::sync::watch::Receiver<bool>,
    stop: tokio_util::sync::CancellationToken,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("liveness", tonic_health::ServingStatus::Serving)
        .await;
    let follow = async {
        loop {
            let status = if *attached.borrow_and_update() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            if attached.changed().await.is_err() {
                return;
            }
        }
    };
    // Reflection too, so grpcurl needs no proto files (v1alpha for grpcurl 1.8).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let serve = tonic::transport::Server::builder()
        .add_service(service)
        .add_optional_service(reflection().build_v1().ok())
        .add_optional_service(reflection().build_v1alpha().ok())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop.cancelled(),
        );
    tokio::select! {
        () = follow => {}
        served = serve => {
            if let Err(error) = served {
                tracing::warn!("The health endpoint stopped: {error}");
            }
        }
    }
}

/// `--tls-ca`, `--tls-cert`/`--tls-key`, `--gateway-server-name`.
fn client_tls(args: &AgentArgs) -> anyhow::Result<Option<ClientTls>> {
    let tls = &args.tls;
    let Some(ca) = &tls.tls_ca else {
        if tls.tls_cert.is_some() || tls.gateway_server_name.is_some() {
            bail!(
                "--tls-cert and --gateway-server-name need --tls-ca (the CA that signed the gateway's certificate)"
            );
        }
        return Ok(None);
    };
    let identity = match (&tls.tls_cert, &tls.tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    Ok(Some(ClientTls {
        ca: ca.clone(),
        identity,
        server_name: tls.gateway_server_name.clone(),
    }))
}

/// The gateway lets a node attach only as a node its certificate names: a node without
/// an id yet adopts the certificate's; one whose id the certificate does not name stops
/// here with what to do, instead of being refused on every connection.
fn bind_node_id_to_certificate(state_dir: &Path, cert: &Path) -> anyhow::Result<()> {
    let chain = ozfleet_gateway::tls::read_certificates(cert)
        .map_err(|error| anyhow::anyhow!("--tls-cert: {error}"))?;
    let names = ozfleet_gateway::tls::node_ids_in_certificate(&chain[0])
        .map_err(|error| anyhow::anyhow!("--tls-cert: {error}"))?;
    let Some(first) = names.first() else {
        bail!(
            "--tls-cert {} names no node id (expected a SAN URI ozfleet-node:<node-id>; \
             `ozfleet certs node --node-id ID` creates one)",
            cert.display()
        );
    };
    let id_file = state_dir.join(NODE_ID_FILE);
    if !id_file.exists() && names.len() == 1 {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
        let staging = state_dir.join(format!(".{NODE_ID_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&staging)?;
            writeln!(file, "{first}")?;
            file.sync_all()?;
            std::fs::rename(&staging, &id_file)
        };
        write().with_context(|| format!("cannot write {}", id_file.display()))?;
        tracing::info!(
            node_id = first,
            "Adopted the node id of the client certificate"
        );
    }
    let node_id = load_or_create_node_id(state_dir)?;
    if !names.contains(&node_id) {
        bail!(
            "this node's id is {node_id} ({}) but --tls-cert {} is for {}: the gateway would \
             refuse it; issue a certificate with `ozfleet certs node --node-id {node_id}`",
            id_file.display(),
            cert.display(),
            names.join(", ")
        );
    }
    Ok(())
}

fn node_config(args: &AgentArgs, merged: &MergedConfig) -> anyhow::Result<NodeConfig> {
    let mut labels = BTreeMap::new();
    for label in &args.labels {
        let Some((key, value)) = label.split_once('=') else {
            bail!("invalid --label {label:?}: expected KEY=VALUE");
        };
        if key.trim().is_empty() {
            bail!("invalid --label {label:?}: empty key");
        }
        labels.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    // A Kubernetes node says so (and where its Jobs go), so a pool can select it.
    if let Some(kubernetes) = &merged.kubernetes {
        labels
            .entry("ozfleet.dev/backend".to_owned())
            .or_insert_with(|| "kubernetes".to_owned());
        labels
            .entry("ozfleet.dev/kubernetes-namespace".to_owned())
            .or_insert_with(|| kubernetes.namespace.clone());
    }
    let node_name = match &args.name {
        Some(name) => name.clone(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "node".into()),
    };
    Ok(NodeConfig {
        state_dir: args.state_dir.clone(),
        node_name,
        labels,
        // Like the reference, a non-positive limit means unlimited.
        max_concurrent_tasks: u32::try_from(merged.max_concurrent_tasks.max(0)).unwrap_or(u32::MAX),
        idle_on_complete: merged.idle_on_complete.clone(),
        shutdown_grace: SHUTDOWN_GRACE,
    })
}

/// ozfleet's own flags, which the reference's config schema does not have, override the
/// merged backend settings.
fn apply_overrides(args: &AgentArgs, merged: &mut MergedConfig) -> anyhow::Result<()> {
    if let Some(root) = &args.workspace_root {
        merged.direct.workspace_root = root.clone();
    }
    if let Some(oz_path) = &args.oz_path {
        merged.direct.oz_path = Some(oz_path.clone());
    }
    if let Some(name) = &args.image_pull_policy {
        merged.docker.image_pull_policy = ImagePullPolicy::from_name(name)
            .with_context(|| format!("invalid --image-pull-policy {name:?}"))?;
    }
    if let Some(network) = &args.docker_network {
        merged.docker.network_mode = Some(network.clone());
    }
    Ok(())
}
