//! The Prometheus exporter's HTTP endpoint: `GET /metrics` in the text format.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder as _, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub async fn bind(address: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves `/metrics` from `registry` until `stop`.
pub async fn serve(listener: TcpListener, registry: prometheus::Registry, stop: CancellationToken) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = Vec::new();
                match TextEncoder::new().encode(&registry.gather(), &mut body) {
                    Ok(()) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            TextEncoder::new().format_type().to_owned(),
                        )],
                        body,
                    )
                        .into_response(),
                    Err(error) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot encode metrics: {error}"),
                    )
                        .into_response(),
                }
            }
        }),
    );
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        warn!("The Prometheus metrics endpoint stopped: {error}");
    }
}
