//! The worker WebSocket (`GET /api/v1/selfhosted/worker/ws?worker_id=<id>`).
//!
//! One task per connection reads frames, writes queued frames and pings; keepalive timings
//! mirror the reference worker's (spec `oz-agent-worker.md` §1.2).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Query, State};
use axum::response::Response;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout};
use tracing::{info, warn};

use crate::AppState;
use crate::error::ApiError;
use crate::worker_messages::Origin;

const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A connection that sends nothing, not even a pong, for this long is dead.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
pub struct WorkerQuery {
    worker_id: Option<String>,
}

pub async fn accept(
    State(state): State<Arc<AppState>>,
    query: Result<Query<WorkerQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let worker_id = query
        .worker_id
        .filter(|worker_id| !worker_id.trim().is_empty())
        .ok_or_else(|| {
            ApiError::BadRequest(
                "query parameter `worker_id` is required and must not be empty".into(),
            )
        })?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::BadRequest(format!(
            "this endpoint only accepts WebSocket upgrades: {}",
            rejection.body_text()
        ))
    })?;
    let connection_tasks = state.connection_tasks.clone();
    Ok(upgrade.on_upgrade(move |socket| {
        connection_tasks.track_future(serve_worker(socket, worker_id, state))
    }))
}

async fn serve_worker(socket: WebSocket, worker_id: String, state: Arc<AppState>) {
    let (outbox, frames) = mpsc::unbounded_channel();
    let connection = state.dispatcher.worker_connected(&worker_id, outbox);
    info!("worker {worker_id} connected (connection {connection})");
    let origin = Origin {
        connection,
        worker_id: &worker_id,
    };
    let end = drive(socket, frames, &state, origin).await;
    state.dispatcher.worker_disconnected(connection, &worker_id);
    info!("worker {worker_id} disconnected (connection {connection}): {end}");
}

/// Why a connection ended.
enum ConnectionEnd {
    Shutdown,
    ClosedByWorker,
    Silent,
    ReadFailed(axum::Error),
    WriteFailed(String),
}

impl fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shutdown => f.write_str("the control plane is shutting down"),
            Self::ClosedByWorker => f.write_str("the worker closed the connection"),
            Self::Silent => write!(f, "nothing received for {READ_TIMEOUT:?}"),
            Self::ReadFailed(error) => write!(f, "read failed: {error}"),
            Self::WriteFailed(reason) => write!(f, "write failed: {reason}"),
        }
    }
}

async fn drive(
    socket: WebSocket,
    mut frames: mpsc::UnboundedReceiver<String>,
    state: &AppState,
    origin: Origin<'_>,
) -> ConnectionEnd {
    let (mut sink, mut stream) = socket.split();
    let mut pings = interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut silent_after = Instant::now() + READ_TIMEOUT;
    loop {
        let written = tokio::select! {
            () = state.shutdown.cancelled() => {
                return close_normally(&mut sink).await;
            }
            Some(frame) = frames.recv() => write(&mut sink, Message::Text(frame.into())).await,
            _ = pings.tick() => write(&mut sink, Message::Ping(Default::default())).await,
            () = sleep_until(silent_after) => return ConnectionEnd::Silent,
            incoming = stream.next() => {
                silent_after = Instant::now() + READ_TIMEOUT;
                match read(incoming, state, origin) {
                    Some(end) => return end,
                    None => Ok(()),
                }
            }
        };
        if let Err(end) = written {
            return end;
        }
    }
}

/// Handles one incoming item; `Some` ends the connection.
fn read(
    incoming: Option<Result<Message, axum::Error>>,
    state: &AppState,
    origin: Origin<'_>,
) -> Option<ConnectionEnd> {
    match incoming {
        None | Some(Ok(Message::Close(_))) => Some(ConnectionEnd::ClosedByWorker),
        Some(Err(error)) => Some(ConnectionEnd::ReadFailed(error)),
        Some(Ok(Message::Text(text))) => {
            state.dispatcher.handle_worker_frame(origin, text.as_str());
            None
        }
        Some(Ok(Message::Binary(_))) => {
            warn!(
                "ignoring a binary frame from worker {} (connection {}): the protocol uses text frames",
                origin.worker_id, origin.connection
            );
            None
        }
        // The WebSocket layer answers pings itself; any frame already proved liveness.
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
    }
}

type WorkerSink = SplitSink<WebSocket, Message>;

async fn write(sink: &mut WorkerSink, message: Message) -> Result<(), ConnectionEnd> {
    match timeout(WRITE_TIMEOUT, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(ConnectionEnd::WriteFailed(error.to_string())),
        Err(_) => Err(ConnectionEnd::WriteFailed(format!(
            "the worker did not accept a frame within {WRITE_TIMEOUT:?}"
        ))),
    }
}

async fn close_normally(sink: &mut WorkerSink) -> ConnectionEnd {
    let close = Message::Close(Some(CloseFrame {
        code: close_code::NORMAL,
        reason: "control plane shutting down".into(),
    }));
    match write(sink, close).await {
        Ok(()) => ConnectionEnd::Shutdown,
        Err(end) => end,
    }
}
