use std::process::ExitCode;

use anyhow::{Context, bail};
use ozfleet_gateway::{
    AdminToken, FleetTimings, GatewayConfig, GatewayListeners, JoinToken, Keepalive, NodeLink,
    NodeTlsFiles, ProxyEnv, UpstreamConfig,
};
use ozfleet_proto::v1::UpstreamSettings;
use ozfleet_telemetry::Telemetry;
use ozfleet_worker_config::{FileConfig, WorkerFlags, merge};

use crate::cli::{GatewayArgs, GatewayTlsArgs};
use crate::runtime::shutdown_on_signal;

pub async fn run(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let config = config(&args)?;
    match crate::runtime::raise_open_files_limit() {
        Ok(limit) => tracing::debug!("Open files limit: {limit}"),
        Err(error) => tracing::warn!("Cannot raise the open files limit: {error}"),
    }
    let node = crate::runtime::listen(args.listen)
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let admin = crate::runtime::listen(args.admin_listen)
        .with_context(|| format!("cannot listen on {} (--admin-listen)", args.admin_listen))?;
    let listeners = GatewayListeners { node, admin };
    let telemetry = Telemetry::start(
        &super::gateway_identity(&config.upstream.worker_id),
        super::process_env,
    )
    .await;
    let result =
        ozfleet_gateway::run_observed(listeners, config, &telemetry, shutdown_on_signal()).await;
    telemetry.shutdown().await;
    result?;
    Ok(ExitCode::SUCCESS)
}

fn config(args: &GatewayArgs) -> anyhow::Result<GatewayConfig> {
    if args.api_key.trim().is_empty() {
        bail!("--api-key (or WARP_API_KEY) is empty");
    }
    let file = args
        .config_file
        .as_deref()
        .map(FileConfig::load)
        .transpose()?;
    // Node-side flags belong to `ozfleet agent`; the gateway reads only the upstream ones.
    let flags = WorkerFlags {
        worker_id: args.worker_id.clone(),
        idle_on_complete: args.idle_on_complete.clone(),
        ..WorkerFlags::default()
    };
    let merged = merge(flags, file, &super::process_env)?;
    let worker_id = merged.require_worker_id()?.to_owned();
    let admin_token = super::admin_token(&args.admin_token)?
        .map(AdminToken::new)
        .transpose()?;
    // Checked before anything binds: an open admin API must not appear even briefly.
    if admin_token.is_none() && !args.admin_listen.ip().is_loopback() {
        bail!(
            "--admin-listen {} is reachable from other hosts but no admin token is set: \
             set --admin-token-file or OZFLEET_ADMIN_TOKEN, or listen on loopback",
            args.admin_listen
        );
    }
    // Also checked before anything binds: a plain node link off loopback needs consent.
    let node_link = node_link(&args.node_tls)?;
    node_link.check(args.listen)?;
    let join_token = match super::optional_join_token(&args.join_token)? {
        Some(token) => JoinToken::new(token)?,
        // The client certificate alone authenticates nodes.
        None if node_link.tls.is_some() => JoinToken::certificate_only(),
        None => JoinToken::new(super::join_token(&args.join_token)?)?,
    };
    Ok(GatewayConfig {
        upstream: UpstreamConfig {
            web_socket_url: args.web_socket_url.clone(),
            api_key: args.api_key.clone().into(),
            worker_id: worker_id.clone(),
            keepalive: Keepalive::default(),
            proxy: ProxyEnv::from_process(),
        },
        settings: UpstreamSettings {
            server_root_url: args.server_root_url.clone(),
            idle_on_complete: merged.idle_on_complete.unwrap_or_default(),
            session_sharing_server_url: args.session_sharing_server_url.clone().unwrap_or_default(),
            worker_id,
        },
        join_token,
        admin_token,
        timings: FleetTimings {
            offer_timeout: args.offer_timeout,
            node_lost_timeout: args.node_lost_timeout,
            node_keepalive: args.node_keepalive,
            ..FleetTimings::default()
        },
        node_link,
        state_dir: args.state_dir.clone(),
        max_nodes: args.max_nodes,
    })
}

/// `--tls-cert`, `--tls-key`, `--tls-client-ca` (all or none) and `--insecure-node-link`.
fn node_link(args: &GatewayTlsArgs) -> anyhow::Result<NodeLink> {
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => Some(NodeTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: client_ca.clone(),
        }),
        (None, None, None) => None,
        _ => bail!(
            "mTLS on the node link needs all of --tls-cert, --tls-key and --tls-client-ca \
             (`ozfleet certs` creates them)"
        ),
    };
    if tls.is_some() && args.insecure_node_link {
        bail!("--insecure-node-link contradicts --tls-cert/--tls-key/--tls-client-ca");
    }
    Ok(NodeLink {
        tls,
        allow_insecure: args.insecure_node_link,
    })
}
