//! Process plumbing shared by the subcommands: logging and signals.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `level`; `RUST_LOG`, when set, takes precedence.
pub fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// A token cancelled on the first SIGINT or SIGTERM. A second signal exits at once, for
/// an operator who does not want to wait for the graceful drain.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            warn!("Cannot install signal handlers; stop the process with SIGKILL");
            return;
        };
        tokio::select! {
            _ = interrupt.recv() => info!("Received SIGINT; shutting down"),
            _ = terminate.recv() => info!("Received SIGTERM; shutting down"),
        }
        trigger.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        warn!("Second signal received; exiting immediately");
        std::process::exit(130);
    });
    token
}
