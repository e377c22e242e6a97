//! The one outbound WebSocket to Oz, wire-compatible with `oz-agent-worker`
//! (spec §1.1–1.4): bearer auth, `worker_id` query parameter, ping every 30 s, 60 s read
//! deadline, 10 s write deadline, jittered exponential reconnect backoff.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ozfleet_proto::oz::{self, ServerMessage};
use ozfleet_proto::reconnect::{AfterStable, Backoff, reconnect_loop};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use url::Url;

use crate::GatewayError;
use crate::fleet::Fleet;
use crate::outbox::Outbox;
use crate::proxy::{self, ProxyEnv};

/// Timings of the upstream connection; the defaults are the reference worker's.
#[derive(Debug, Clone)]
pub struct Keepalive {
    pub ping_interval: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub handshake_timeout: Duration,
    /// A connection that stayed up this long resets the reconnect backoff. Shorter-lived
    /// ones count as failures, so a server that accepts and closes at once is not
    /// hammered in a tight loop (a QUIRK of the reference).
    pub stable_after: Duration,
    /// How long shutdown waits for queued messages to go out before closing.
    pub drain_timeout: Duration,
    /// The wait after Oz refused a handshake with a 4xx, before the next attempt: the
    /// backoff's maximum, since retrying sooner cannot fix a bad key.
    pub refused_retry: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(45),
            stable_after: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            refused_retry: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub web_socket_url: String,
    pub api_key: SecretString,
    pub worker_id: String,
    pub keepalive: Keepalive,
    /// HTTP proxy settings (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`).
    pub proxy: ProxyEnv,
}

/// The configured URL with `worker_id` set (replacing any existing value) and the query
/// re-encoded with sorted keys, as Go's `url.Values.Encode` does.
pub fn connect_url(web_socket_url: &str, worker_id: &str) -> Result<Url, GatewayError> {
    let mut url = Url::parse(web_socket_url).map_err(|error| {
        GatewayError::InvalidConfig(format!(
            "invalid --web-socket-url {web_socket_url:?}: {error}"
        ))
    })?;
    if !matches!(url.scheme(), "ws" | "wss") {
        return Err(GatewayError::InvalidConfig(format!(
            "invalid --web-socket-url {web_socket_url:?}: scheme must be ws or wss"
        )));
    }
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(key, _)| key != "worker_id")
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    pairs.push(("worker_id".into(), worker_id.into()));
    // Stable sort: values of a repeated key keep their order, like Go.
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    url.query_pairs_mut().clear().extend_pairs(pairs);
    Ok(url)
}

/// Keeps the upstream connection up until `shutdown`, relaying the outbox and handing
/// every server message to the fleet.
pub async fn run(
    config: UpstreamConfig,
    outbox: Arc<Outbox>,
    fleet: Arc<Fleet>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let url = connect_url(&config.web_socket_url, &config.worker_id)?;
    // Like the reference: after a connection that was up, dial again at once; failures
    // and short-lived connections back off (1 s doubling to 60 s, jittered).
    reconnect_loop(
        Backoff::upstream(),
        config.keepalive.stable_after,
        AfterStable::Immediately,
        &shutdown,
        || async {
            info!("Connecting to {url}");
            let outcome = tokio::select! {
                outcome = dial(&url, &config) => outcome,
                () = shutdown.cancelled() => return None,
            };
            match outcome {
                Ok(socket) => {
                    info!("Connected to Oz as worker {}", config.worker_id);
                    fleet.set_upstream_connected(true);
                    let connected_at = tokio::time::Instant::now();
                    let end = serve(socket, &config.keepalive, &outbox, &fleet, &shutdown).await;
                    fleet.set_upstream_connected(false);
                    if let ConnectionEnd::Lost(reason) = end {
                        warn!("Connection closed ({reason}), will attempt to reconnect");
                    }
                    Some(connected_at)
                }
                Err(DialError { message, refused }) => {
                    fleet.upstream_dial_failed();
                    if refused {
                        // A 4xx is a configuration problem (API key, worker id): say so,
                        // and retry at the slowest pace instead of hammering Oz.
                        let wait = config.keepalive.refused_retry;
                        error!(
                            "Oz refused the connection ({message}): check the API key (--api-key / WARP_API_KEY) and the worker id; retrying in {wait:?}"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = shutdown.cancelled() => {}
                        }
                    } else {
                        error!("Failed to connect to {url}: {message}");
                    }
                    None
                }
            }
        },
    )
    .await;
    Ok(())
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// rustls needs a process-wide crypto provider before the first TLS handshake; ozfleet
/// builds with ring only.
fn install_crypto_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // An error means another component already installed one, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Messages waiting for Oz beyond which the gateway stops reading new frames from Oz until
/// the outbox drains: an Oz that sends without reading cannot grow the gateway's memory.
pub const MAX_OUTBOX_BEFORE_PAUSE: usize = 10_000;

/// Largest WebSocket message and frame accepted from Oz: far above any real assignment
/// (and above the node link's own limit, so an oversized one is failed upstream with a
/// clear message), low enough that a hostile peer cannot make the gateway buffer more.
pub const MAX_WEBSOCKET_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

fn websocket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_WEBSOCKET_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_WEBSOCKET_MESSAGE_BYTES))
}

/// Why a dial failed.
struct DialError {
    message: String,
    /// Oz answered the handshake with a 4xx (bad key, reserved worker id): retrying soon
    /// will not help.
    refused: bool,
}

impl From<String> for DialError {
    fn from(message: String) -> Self {
        Self {
            message,
            refused: false,
        }
    }
}

impl From<&str> for DialError {
    fn from(message: &str) -> Self {
        Self::from(message.to_owned())
    }
}

async fn dial(url: &Url, config: &UpstreamConfig) -> Result<Socket, DialError> {
    install_crypto_provider();
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|error| error.to_string())?;
    let bearer = format!("Bearer {}", config.api_key.expose_secret())
        .parse()
        .map_err(|_| "the API key contains characters not allowed in an HTTP header".to_string())?;
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, bearer);
    let proxy = config.proxy.proxy_for(url)?;
    let handshake = async {
        let result = match proxy {
            // Nagle's algorithm off: a claim must not wait for the next write or Oz's
            // delayed ACK.
            None => {
                tokio_tungstenite::connect_async_with_config(
                    request,
                    Some(websocket_config()),
                    true,
                )
                .await
            }
            Some(proxy) => {
                let host = url.host_str().ok_or("the WebSocket URL has no host")?;
                let port = url.port_or_known_default().unwrap_or(443);
                debug!(
                    "Tunnelling through proxy {}:{}",
                    proxy.host_str().unwrap_or_default(),
                    proxy.port_or_known_default().unwrap_or(80)
                );
                let stream = proxy::connect(&proxy, host, port).await?;
                stream
                    .set_nodelay(true)
                    .map_err(|error| format!("cannot set TCP_NODELAY: {error}"))?;
                tokio_tungstenite::client_async_tls_with_config(
                    request,
                    stream,
                    Some(websocket_config()),
                    None,
                )
                .await
            }
        };
        result
            .map(|(socket, _response)| socket)
            .map_err(|error| match error {
                tungstenite::Error::Http(response) => DialError {
                    message: format!("handshake rejected with HTTP status {}", response.status()),
                    refused: response.status().is_client_error(),
                },
                error => DialError::from(error.to_string()),
            })
    };
    tokio::time::timeout(config.keepalive.handshake_timeout, handshake)
        .await
        .map_err(|_| {
            DialError::from(format!(
                "handshake timed out after {:?}",
                config.keepalive.handshake_timeout
            ))
        })?
}

/// At most this many queued messages go out in one flush.
const MAX_WRITE_BATCH: usize = 64;

enum ConnectionEnd {
    Shutdown,
    Lost(String),
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: WebSocketStream<S>,
    keepalive: &Keepalive,
    outbox: &Outbox,
    fleet: &Fleet,
    shutdown: &CancellationToken,
) -> ConnectionEnd {
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + keepalive.ping_interval,
        keepalive.ping_interval,
    );
    // Created once and pushed back on each frame (no timer or token registration per
    // frame).
    let mut read_deadline = pin!(tokio::time::sleep(keepalive.read_timeout));
    let mut stopping = pin!(shutdown.cancelled());
    loop {
        tokio::select! {
            // Reading is never abandoned mid-frame: `next` is cancel-safe, so a frame
            // that is half read stays buffered for the next iteration.
            // Back-pressure: while the outbox is this full (Oz is not reading), stop
            // reading assignments that would only add to it.
            frame = socket.next(), if outbox.len() < MAX_OUTBOX_BEFORE_PAUSE => {
                read_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + keepalive.read_timeout);
                match frame {
                    None => return ConnectionEnd::Lost("server closed the stream".into()),
                    Some(Err(error)) => return ConnectionEnd::Lost(error.to_string()),
                    Some(Ok(Message::Text(text))) => handle_frame(fleet, text.as_str()),
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.as_ref().map(|f| f.code);
                        if !matches!(code, Some(CloseCode::Away | CloseCode::Abnormal) | None) {
                            error!("Oz closed the connection: {frame:?}");
                        }
                        return ConnectionEnd::Lost("close frame received".into());
                    }
                    Some(Ok(Message::Binary(_))) => warn!("Ignoring a binary frame from Oz"),
                    Some(Ok(_)) => {} // ping/pong: the deadline reset above is all they do
                }
            }
            () = &mut read_deadline => {
                return ConnectionEnd::Lost(format!("nothing received for {:?}", keepalive.read_timeout));
            }
            // Everything queued goes out in one flush; each message counts as sent only
            // once the flush succeeded.
            batch = outbox.front_batch(MAX_WRITE_BATCH) => {
                match write_batch(&mut socket, &batch, keepalive.write_timeout).await {
                    Ok(()) => {
                        for queued in &batch {
                            debug!(task_id = queued.message.task_id(), "Sent {}", queued.message.message_type());
                            outbox.mark_sent(queued);
                            fleet.relayed(queued);
                        }
                    }
                    Err(error) => return ConnectionEnd::Lost(format!("write failed: {error}")),
                }
            }
            _ = ping.tick() => {
                if let Err(error) = write(&mut socket, Message::Ping(Default::default()), keepalive.write_timeout).await {
                    return ConnectionEnd::Lost(format!("ping failed: {error}"));
                }
            }
            () = &mut stopping => {
                drain_and_close(&mut socket, keepalive, outbox, fleet).await;
                return ConnectionEnd::Shutdown;
            }
        }
    }
}

/// Feeds `batch` to the socket and flushes once, all within `timeout`.
async fn write_batch<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    batch: &[crate::outbox::Queued],
    timeout: Duration,
) -> Result<(), String> {
    let written = async {
        for queued in batch {
            socket
                .feed(Message::text(queued.message.to_frame()))
                .await?;
        }
        socket.flush().await
    };
    match tokio::time::timeout(timeout, written).await {
        Err(_) => Err(format!("write timed out after {timeout:?}")),
        Ok(result) => result.map_err(|error| error.to_string()),
    }
}

async fn write<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    message: Message,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, socket.send(message)).await {
        Err(_) => Err(format!("write timed out after {timeout:?}")),
        Ok(result) => result.map_err(|error| error.to_string()),
    }
}

/// Sends what is still queued (bounded), then a normal-closure close frame.
async fn drain_and_close<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    keepalive: &Keepalive,
    outbox: &Outbox,
    fleet: &Fleet,
) {
    let deadline = tokio::time::Instant::now() + keepalive.drain_timeout;
    while !outbox.is_empty() && tokio::time::Instant::now() < deadline {
        let Ok(queued) = tokio::time::timeout_at(deadline, outbox.front()).await else {
            break;
        };
        if write(
            socket,
            Message::text(queued.message.to_frame()),
            keepalive.write_timeout,
        )
        .await
        .is_err()
        {
            break;
        }
        outbox.mark_sent(&queued);
        fleet.relayed(&queued);
    }
    let close = Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }));
    if let Err(error) = write(socket, close, keepalive.write_timeout).await {
        debug!("Close frame not sent: {error}");
    }
}

fn handle_frame(fleet: &Fleet, text: &str) {
    match oz::parse_server_message(text) {
        Ok(ServerMessage::TaskAssignment {
            assignment,
            raw_data,
        }) => fleet.on_assignment(&assignment, raw_data.get().as_bytes()),
        Ok(ServerMessage::TaskCancellation(cancellation)) => {
            fleet.on_cancellation(&cancellation.task_id)
        }
        // Logged without the frame: it may carry credentials in env_vars.
        Err(error) => warn!("Ignoring a message from Oz: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_id_is_set_and_other_parameters_kept_sorted() {
        let url = connect_url("wss://oz.example/ws?zeta=1&worker_id=old&alpha=a+b", "w 1").unwrap();
        assert_eq!(
            url.as_str(),
            "wss://oz.example/ws?alpha=a+b&worker_id=w+1&zeta=1"
        );
        let url = connect_url(oz::DEFAULT_WEB_SOCKET_URL, "edge-1").unwrap();
        assert_eq!(
            url.as_str(),
            "wss://oz.warp.dev/api/v1/selfhosted/worker/ws?worker_id=edge-1"
        );
    }

    #[tokio::test]
    async fn wss_dials_through_tls_and_reports_a_failed_handshake() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // A peer that is not a TLS server: it answers the ClientHello with plain HTTP and
        // returns the first byte it read, checked below so the test fails without TLS.
        let mut peer = tokio::task::JoinSet::new();
        peer.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await?;
            let mut hello = [0u8; 5];
            stream.read_exact(&mut hello).await?;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            std::io::Result::Ok(hello[0])
        });
        let config = UpstreamConfig {
            web_socket_url: format!("wss://{address}/ws"),
            api_key: SecretString::from("k"),
            worker_id: "w".into(),
            keepalive: Keepalive::default(),
            proxy: ProxyEnv::default(),
        };
        let url = connect_url(&config.web_socket_url, "w").unwrap();
        let Err(error) = dial(&url, &config).await else {
            panic!("the handshake with a non-TLS peer must fail");
        };
        assert!(!error.message.is_empty());
        assert!(!error.refused);
        let first_byte = peer.join_next().await.unwrap().unwrap().unwrap();
        assert_eq!(
            first_byte, 0x16,
            "the client opened with a TLS handshake record"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn frames_push_the_read_deadline_back_and_silence_ends_the_connection() {
        use tokio_tungstenite::tungstenite::protocol::Role;
        // In memory, not TCP: on paused time the clock jumps whenever the runtime waits,
        // and a loopback frame the kernel has not delivered yet would let it jump past the
        // deadline.
        let (gateway_end, oz_end) = tokio::io::duplex(64 * 1024);
        let socket = WebSocketStream::from_raw_socket(gateway_end, Role::Client, None).await;
        let mut oz = WebSocketStream::from_raw_socket(oz_end, Role::Server, None).await;
        let mut peer = tokio::task::JoinSet::new();
        peer.spawn(async move {
            // Three frames 40 s apart, each within the 60 s read timeout; then silence
            // (nothing read, so no pong to the gateway's pings either).
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(40)).await;
                oz.send(Message::Pong(Default::default())).await.unwrap();
            }
            std::future::pending::<()>().await
        });
        let keepalive = Keepalive::default();
        let outbox = Arc::new(Outbox::default());
        let fleet = Fleet::new(
            outbox.clone(),
            ozfleet_proto::v1::UpstreamSettings::default(),
            crate::fleet::FleetTimings::default(),
        );
        let started = tokio::time::Instant::now();
        let end = serve(
            socket,
            &keepalive,
            &outbox,
            &fleet,
            &CancellationToken::new(),
        )
        .await;
        let ConnectionEnd::Lost(reason) = end else {
            panic!("the connection must be lost, not shut down");
        };
        assert_eq!(reason, "nothing received for 60s");
        let lasted = started.elapsed();
        assert!(
            lasted >= Duration::from_secs(180) && lasted < Duration::from_secs(181),
            "the last frame (120 s) plus the read timeout (60 s), not {lasted:?}"
        );
    }

    #[test]
    fn bad_urls_are_rejected_naming_the_flag() {
        let error = connect_url("not a url", "w").unwrap_err().to_string();
        assert!(error.contains("--web-socket-url"), "{error}");
        let error = connect_url("https://oz.example/ws", "w")
            .unwrap_err()
            .to_string();
        assert!(error.contains("scheme must be ws or wss"), "{error}");
    }
}
