use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use ozfleet_agent::NodeConfig;
use ozfleet_agent::backend::{Backend, DirectBackend, DirectConfig, DockerBackend, DockerConfig};
use ozfleet_agent::identity::load_or_create_node_id;
use ozfleet_worker_config::{
    BackendName, FileConfig, ImagePullPolicy, MergedConfig, WorkerFlags, merge,
};

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
    let merged = merge(flags, file, &super::process_env)?;
    let node = node_config(&args, &merged)?;
    let backend = backend(&args, merged).await?;
    ozfleet_agent::run(node, backend, shutdown_on_signal()).await?;
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
    let node_name = match &args.name {
        Some(name) => name.clone(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "node".into()),
    };
    Ok(NodeConfig {
        gateway_url: args.gateway.clone(),
        join_token: super::join_token(&args.join_token)?,
        state_dir: args.state_dir.clone(),
        node_name,
        labels,
        // Like the reference, a non-positive limit means unlimited.
        max_concurrent_tasks: u32::try_from(merged.max_concurrent_tasks.max(0)).unwrap_or(u32::MAX),
        idle_on_complete: merged.idle_on_complete.clone(),
        shutdown_grace: SHUTDOWN_GRACE,
    })
}

async fn backend(args: &AgentArgs, merged: MergedConfig) -> anyhow::Result<Backend> {
    match merged.backend {
        BackendName::Direct => {
            if !merged.docker.volumes.is_empty() {
                tracing::warn!("--volumes applies to the Docker backend only; ignoring it");
            }
            let direct = merged.direct;
            let config = DirectConfig {
                workspace_root: args.workspace_root.clone().unwrap_or(direct.workspace_root),
                target_dir: direct.target_dir,
                oz_path: args.oz_path.clone().or(direct.oz_path),
                setup_command: direct.setup_command,
                teardown_command: direct.teardown_command,
                environment: merged.env,
                cleanup: merged.cleanup,
                cancel_grace: CANCEL_GRACE,
            };
            let backend = DirectBackend::new(config).context("Failed to create worker")?;
            Ok(Backend::Direct(backend))
        }
        BackendName::Docker => {
            let docker = merged.docker;
            let image_pull_policy = match &args.image_pull_policy {
                Some(name) => ImagePullPolicy::from_name(name)
                    .with_context(|| format!("invalid --image-pull-policy {name:?}"))?,
                None => docker.image_pull_policy,
            };
            let config = DockerConfig {
                // Containers are labelled with the node id so a restarted agent finds its own.
                node_id: load_or_create_node_id(&args.state_dir)?,
                volumes: docker.volumes,
                environment: merged.env,
                cleanup: merged.cleanup,
                image_pull_policy,
                network_mode: args.docker_network.clone().or(docker.network_mode),
                stop_grace: CANCEL_GRACE,
            };
            let backend = DockerBackend::new(config)
                .await
                .context("Failed to create worker")?;
            Ok(Backend::Docker(backend))
        }
        other => bail!(
            "the {} backend is not available in this ozfleet build yet; use --backend direct or docker",
            other.as_str()
        ),
    }
}
