//! One module per subcommand; each turns flags into a component config and runs it.

pub mod agent;
pub mod control_plane;
pub mod dev;
pub mod gateway;

use anyhow::{Context, bail};

use crate::cli::JoinTokenArgs;

/// The join token from `--join-token-file`, or `--join-token` / `OZFLEET_JOIN_TOKEN`.
fn join_token(args: &JoinTokenArgs) -> anyhow::Result<String> {
    let token = match (&args.join_token_file, &args.join_token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read join token file {}", path.display()))?,
        (None, Some(token)) => token.clone(),
        (None, None) => {
            bail!("a join token is required: pass --join-token-file or set OZFLEET_JOIN_TOKEN")
        }
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("the join token is empty");
    }
    Ok(token)
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}
