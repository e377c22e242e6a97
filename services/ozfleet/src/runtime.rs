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

/// Logs to stderr at `level` (`json`: one JSON object per line); `RUST_LOG`, when set,
/// takes precedence. Lines are written by a dedicated thread
/// ([`crate::log_writer`]), never by the task that logs (which may hold the fleet lock),
/// so a slow terminal or disk does not stall dispatch. Keep the returned guard for the
/// life of the process: dropping it writes what is still queued.
pub fn init_logging(level: &str, json: bool) -> std::io::Result<crate::log_writer::WriterGuard> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(rust_log.as_deref(), level);
    let (writer, guard) = crate::log_writer::batched(std::io::stderr())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    if json {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    Ok(guard)
}

/// How many connections may wait to be accepted. The default of `TcpListener::bind`
/// (1,024, further capped by `net.core.somaxconn`) overflows when thousands of nodes
/// re-attach at once; an overflowing backlog drops SYNs and costs each node a 1 s+ retry.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener like `TcpListener::bind` (with `SO_REUSEADDR`), with a backlog of
/// [`LISTEN_BACKLOG`].
pub fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the soft limit on open files to the hard limit (as Go programs do at start):
/// every attached node holds a connection, and the usual soft limit of 1,024 would cap a
/// gateway below a thousand nodes. Returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
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
