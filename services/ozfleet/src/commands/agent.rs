use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, bail};
use ozfleet_agent::NodeTelemetry;
use ozfleet_agent::backend::{BackendContext, from_settings};
use ozfleet_agent::identity::load_or_create_node_id;
use ozfleet_agent::{GrpcConnector, NodeConfig};
use ozfleet_worker_config::{FileConfig, ImagePullPolicy, MergedConfig, WorkerFlags, merge};

use crate::cli::AgentArgs;
use crate::runtime::shutdown_on_signal;

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
    let connector = GrpcConnector::new(&args.gateway, super::join_token(&args.join_token)?.into())?;
    apply_overrides(&args, &mut merged)?;
    let context = BackendContext {
        // Docker labels containers with the node id so a restarted agent finds its own.
        node_id: load_or_create_node_id(&args.state_dir)?,
        cancel_grace: CANCEL_GRACE,
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
    };
    let result = ozfleet_agent::run_observed(
        node,
        backend,
        Arc::new(connector),
        observed,
        shutdown_on_signal(),
    )
    .await;
    telemetry.shutdown().await;
    result?;
    Ok(ExitCode::SUCCESS)
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
