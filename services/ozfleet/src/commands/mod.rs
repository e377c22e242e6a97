//! One module per subcommand; each turns flags into a component config and runs it.

pub mod admin;
pub mod agent;
pub mod certs;
pub mod control_plane;
pub mod dev;
pub mod gateway;
pub mod health;

use anyhow::{Context, bail};

use crate::cli::{AdminTokenArgs, JoinTokenArgs};

/// The join token from `--join-token-file`, or `--join-token` / `OZFLEET_JOIN_TOKEN`.
fn join_token(args: &JoinTokenArgs) -> anyhow::Result<String> {
    secret_from(
        "join token",
        args.join_token_file.as_deref(),
        args.join_token.as_deref(),
    )?
    .ok_or_else(|| {
        anyhow::anyhow!(
            "a join token is required: pass --join-token-file or set OZFLEET_JOIN_TOKEN"
        )
    })
}

/// The join token, if any: optional where mTLS authenticates the nodes.
fn optional_join_token(args: &JoinTokenArgs) -> anyhow::Result<Option<String>> {
    secret_from(
        "join token",
        args.join_token_file.as_deref(),
        args.join_token.as_deref(),
    )
}

/// The admin token from `--admin-token-file` or `OZFLEET_ADMIN_TOKEN`, if any.
fn admin_token(args: &AdminTokenArgs) -> anyhow::Result<Option<String>> {
    secret_from(
        "admin token",
        args.admin_token_file.as_deref(),
        args.admin_token.as_deref(),
    )
}

/// A secret from its file (preferred) or its value; an empty one is an error.
fn secret_from(
    what: &str,
    file: Option<&std::path::Path>,
    value: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let token = match (file, value) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {what} file {}", path.display()))?,
        (None, Some(token)) => token.to_owned(),
        (None, None) => return Ok(None),
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("the {what} is empty");
    }
    Ok(Some(token))
}

/// Who the gateway is to metrics and traces: the reference's service name and scope, so
/// its dashboards and alert rules work unchanged.
fn gateway_identity(worker_id: &str) -> ozfleet_telemetry::ServiceIdentity {
    ozfleet_telemetry::ServiceIdentity {
        service_name: ozfleet_gateway::metrics::SERVICE_NAME,
        service_version: env!("CARGO_PKG_VERSION").to_owned(),
        worker_id: worker_id.to_owned(),
        backend: ozfleet_gateway::metrics::BACKEND.to_owned(),
        scope: ozfleet_gateway::metrics::SCOPE,
    }
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}
