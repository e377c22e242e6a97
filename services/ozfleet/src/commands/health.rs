//! `ozfleet health`: one gRPC health check, for probes that cannot speak gRPC themselves
//! (Kubernetes 1.20 exec probes, Docker/compose healthchecks) in an image without a shell.
//! Exit 0 when the service is SERVING, 1 otherwise (like grpc_health_probe).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The gRPC address to check, `HOST:PORT` or `http://HOST:PORT` (the gateway's admin
    /// port by default).
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub address: String,
    /// The health service: `""` is the gateway's readiness, `liveness` its liveness.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let url = if args.address.contains("://") {
        args.address.clone()
    } else {
        format!("http://{}", args.address)
    };
    let timeout = Duration::from_secs(args.timeout.max(1));
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("--address {:?} is not a valid address", args.address))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .with_context(|| format!("health check of service {:?} at {url}", args.service))?;
    let status =
        ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
