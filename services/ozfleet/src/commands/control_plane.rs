use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use ozfleet_control_plane::{ControlPlaneConfig, TaskImages};

use crate::cli::ControlPlaneArgs;
use crate::runtime::shutdown_on_signal;

pub async fn run(args: ControlPlaneArgs) -> anyhow::Result<ExitCode> {
    if args.api_key.trim().is_empty() {
        bail!("--api-key (or WARP_API_KEY) is empty");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        "Control plane listening on http://{}",
        listener.local_addr()?
    );
    let config = ControlPlaneConfig {
        api_key: args.api_key,
        database_path: args.database,
        reoffer_delay: Duration::from_secs(1),
        images: TaskImages {
            docker_image: args.docker_image.unwrap_or_default(),
            sidecar_image: args.sidecar_image.unwrap_or_default(),
        },
    };
    ozfleet_control_plane::run(listener, config, shutdown_on_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
