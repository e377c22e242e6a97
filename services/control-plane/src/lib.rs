//! A local Oz-compatible control plane: Oz's run API and its self-hosted worker WebSocket,
//! with runs kept in SQLite. It stands in for Warp's Oz server in demos, air-gapped trials
//! and tests, and only ever runs work on self-hosted workers.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let config = ozfleet_control_plane::ControlPlaneConfig::new("secret", "runs.db");
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! ozfleet_control_plane::run(listener, config, shutdown).await
//! # }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

mod api;
mod auth;
pub mod client;
mod dispatch;
mod error;
mod listing;
pub mod run_api;
mod run_request;
mod store;
mod worker_messages;
mod worker_registry;
mod worker_ws;

use dispatch::Dispatcher;
use store::Store;

pub struct ControlPlaneConfig {
    /// The bearer token that API clients and workers must present.
    pub api_key: String,
    /// The SQLite database holding the runs; created if missing.
    pub database_path: PathBuf,
    /// How long a run a worker rejected waits before it is offered again.
    pub reoffer_delay: Duration,
    /// Images sent with every assignment (Oz derives them from the run's environment).
    pub images: TaskImages,
}

/// The `docker_image` and `sidecar_image` put in assignments; empty = not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskImages {
    pub docker_image: String,
    pub sidecar_image: String,
}

impl ControlPlaneConfig {
    pub const DEFAULT_REOFFER_DELAY: Duration = Duration::from_secs(1);

    pub fn new(api_key: impl Into<String>, database_path: impl Into<PathBuf>) -> Self {
        Self {
            api_key: api_key.into(),
            database_path: database_path.into(),
            reoffer_delay: Self::DEFAULT_REOFFER_DELAY,
            images: TaskImages::default(),
        }
    }
}

impl fmt::Debug for ControlPlaneConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneConfig")
            .field("api_key", &"<redacted>")
            .field("database_path", &self.database_path)
            .field("reoffer_delay", &self.reoffer_delay)
            .field("images", &self.images)
            .finish()
    }
}

/// What request handlers and worker connections share.
pub(crate) struct AppState {
    api_key: String,
    store: Arc<Store>,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
    connection_tasks: TaskTracker,
}

/// Serves the control plane on `listener` until `shutdown` is cancelled, then closes the
/// worker connections (close code 1000) and returns.
pub async fn run(
    listener: TcpListener,
    config: ControlPlaneConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.api_key.is_empty(),
        "the control plane's API key must not be empty"
    );
    let store = Arc::new(Store::open(&config.database_path).with_context(|| {
        format!(
            "cannot open the run database {}",
            config.database_path.display()
        )
    })?);
    let address = listener
        .local_addr()
        .context("cannot read the listener's address")?;
    // Stops the workers' connections and the dispatcher also when serving fails.
    let stop = shutdown.child_token();
    let dispatcher = Arc::new(Dispatcher::new(
        store.clone(),
        config.reoffer_delay,
        config.images,
    ));
    let connection_tasks = TaskTracker::new();
    let state = Arc::new(AppState {
        api_key: config.api_key,
        store,
        dispatcher: dispatcher.clone(),
        shutdown: stop.clone(),
        connection_tasks: connection_tasks.clone(),
    });
    // Owned by this future: if the caller drops it, the loop is aborted too instead of
    // dispatching runs with no server in front of it.
    let mut dispatch_loop = JoinSet::new();
    dispatch_loop.spawn(dispatcher.run(stop.clone()));

    info!("control plane listening on http://{address}");
    // Nagle's algorithm off on every accepted connection: small WebSocket frames
    // (assignments) must not wait for the worker's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {error}");
        }
    });
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    stop.cancel();
    connection_tasks.close();
    connection_tasks.wait().await;
    while let Some(ended) = dispatch_loop.join_next().await {
        ended.context("the dispatch loop panicked")?;
    }
    served.context("serving the control plane failed")?;
    info!("control plane stopped");
    Ok(())
}
