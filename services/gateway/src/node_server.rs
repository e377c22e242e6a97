//! Serves the node listener's HTTP/2 connections, one owned task per connection.
//!
//! tonic's own server applies one keepalive interval to every connection. A fleet attaches
//! at once (a gateway restart re-attaches every node within seconds), so one interval
//! means every node is pinged in the same second, again and again: at 10,000 nodes a burst
//! of thousands of pings every interval, in which claims wait. Here each connection gets
//! its own interval, drawn between 3/4 of the configured one and the configured one, so
//! the pings of a fleet that attached together spread out after the first round and stay
//! spread. A silent node is still found within twice the configured interval.

use std::pin::pin;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tower::ServiceExt as _;
use tracing::{debug, warn};

/// How long accepting pauses when the process is out of descriptors or memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

fn out_of_resources(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// HTTP/2 settings of node connections.
#[derive(Debug, Clone, Copy)]
pub struct NodeConnectionSettings {
    /// Ping a node after this long without hearing from it (each connection draws its own
    /// interval in `[3/4 × keepalive, keepalive]`); a ping unanswered for this long ends
    /// the connection.
    pub keepalive: Duration,
    pub max_concurrent_streams: u32,
    pub stream_window: u32,
    pub connection_window: u32,
}

impl NodeConnectionSettings {
    /// This connection's keepalive interval.
    fn draw_keepalive_interval(&self) -> Duration {
        use rand::Rng as _;
        let shortest = self.keepalive.mul_f64(0.75);
        if shortest >= self.keepalive {
            return self.keepalive;
        }
        rand::rng().random_range(shortest..=self.keepalive)
    }

    fn http2(&self) -> hyper::server::conn::http2::Builder<TokioExecutor> {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(self.draw_keepalive_interval())
            .keep_alive_timeout(self.keepalive)
            .max_concurrent_streams(self.max_concurrent_streams)
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window);
        builder
    }
}

/// Serves `routes` on every connection `incoming` yields until `stop` is cancelled; then
/// stops accepting (dropping `incoming` closes the listener), asks every connection to
/// finish (HTTP/2 GOAWAY: streams in progress complete) and waits for them.
pub async fn serve<I, IO>(
    incoming: I,
    routes: Routes,
    settings: NodeConnectionSettings,
    stop: CancellationToken,
) where
    I: Stream<Item = std::io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    let router = routes.prepare().into_axum_router();
    let connections = TaskTracker::new();
    {
        let mut incoming = pin!(incoming);
        loop {
            let io = tokio::select! {
                _ = stop.cancelled() => break,
                next = incoming.next() => match next {
                    Some(Ok(io)) => io,
                    Some(Err(error)) => {
                        if out_of_resources(&error) {
                            // Retrying at once would spin until a descriptor frees up.
                            warn!(
                                "Cannot accept a node connection: {error}; retrying in \
                                 {ACCEPT_RETRY:?} (raise the open files limit, or lower \
                                 the fleet's size)"
                            );
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                _ = tokio::time::sleep(ACCEPT_RETRY) => {}
                            }
                        } else {
                            debug!("Cannot accept a node connection: {error}");
                        }
                        continue;
                    }
                    None => break,
                },
            };
            // What tonic's `Request::remote_addr` and `peer_certs` read.
            let connect_info = io.connect_info();
            let service =
                router
                    .clone()
                    .map_request(move |mut request: http::Request<Incoming>| {
                        request.extensions_mut().insert(connect_info.clone());
                        request
                    });
            let connection = settings
                .http2()
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
            let stop = stop.clone();
            connections.spawn(async move {
                let mut connection = pin!(connection);
                let ended = tokio::select! {
                    ended = connection.as_mut() => ended,
                    _ = stop.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = ended {
                    debug!("Node connection ended: {error}");
                }
            });
        }
    }
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_draws_a_keepalive_between_three_quarters_and_the_whole_interval() {
        let settings = NodeConnectionSettings {
            keepalive: Duration::from_secs(20),
            max_concurrent_streams: 4,
            stream_window: 65_536,
            connection_window: 131_072,
        };
        let drawn: Vec<Duration> = (0..1_000)
            .map(|_| settings.draw_keepalive_interval())
            .collect();
        assert!(drawn.iter().all(|interval| {
            (Duration::from_secs(15)..=Duration::from_secs(20)).contains(interval)
        }));
        // Spread, not one value: a fleet's pings must not line up.
        let below_17_5 = drawn
            .iter()
            .filter(|interval| **interval < Duration::from_millis(17_500))
            .count();
        assert!(
            (300..=700).contains(&below_17_5),
            "{below_17_5} of 1,000 below 17.5 s"
        );
    }
}
