//! Process plumbing shared by the subcommands: logging and signals.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// Libraries whose debug or trace output carries request and response bodies or headers:
/// bollard logs container specs (task environments), the WebSocket, HTTP and gRPC stacks
/// log frames and handshakes (assignments with `env_vars`, bearer tokens). They stay at
/// info whatever level is asked for.
const CAPPED_LIBRARIES: [&str; 12] = [
    "bollard",
    "tungstenite",
    "tokio_tungstenite",
    "axum",
    "hyper",
    "hyper_util",
    "h2",
    "tonic",
    "tower",
    "rustls",
    "ureq",
    "ureq_proto",
];

/// The log filter: `RUST_LOG` when set, else `level`; the capped libraries never go below
/// info either way.
fn log_filter(rust_log: Option<&str>, level: &str) -> EnvFilter {
    let mut filter = rust_log
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    for library in CAPPED_LIBRARIES {
        filter = filter.add_directive(
            format!("{library}=info")
                .parse()
                .expect("a valid static directive"),
        );
    }
    filter
}

/// Logs to stderr at `level`; `RUST_LOG`, when set, takes precedence.
pub fn init_logging(level: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(rust_log.as_deref(), level);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// A token cancelled on the first SIGINT or SIGTERM. A second signal exits at once, for
/// an operator who does not want to wait for the graceful drain.
#[expect(
    clippy::disallowed_methods,
    reason = "the signal listener lives as long as the process: it must still see a second \
              signal while every owned task drains, and it ends the process itself"
)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_logging_libraries_stay_at_info_even_when_debug_is_asked_for() {
        for rust_log in [None, Some("debug"), Some("trace"), Some("bollard=trace")] {
            let shown = log_filter(rust_log, "debug").to_string();
            for library in CAPPED_LIBRARIES {
                assert!(
                    shown.contains(&format!("{library}=info")),
                    "{rust_log:?}: {shown}"
                );
            }
        }
    }
}
