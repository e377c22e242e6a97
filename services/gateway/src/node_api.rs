//! The gRPC endpoint node agents attach to.

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use ozfleet_proto::node_id::{NODE_ID_RULE, is_valid_node_id};
use ozfleet_proto::v1::node_service_server::NodeService;
use ozfleet_proto::v1::{AttachRequest, AttachResponse, NodeHello, attach_request};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::GatewayError;
use crate::fleet::Fleet;
use crate::tls::CertificateIdentity;

/// How long a new stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on what one hello may list, so a rogue node cannot flood the gateway.
const MAX_LISTED_TASKS: usize = 10_000;
const MAX_LABELS: usize = 64;

/// The shared secret nodes present to join; a secret type, so no `Debug` or log shows it.
/// [`JoinToken::certificate_only`] is no token at all: only with mTLS on the node link,
/// where the client certificate authenticates the node.
#[derive(Clone, Debug)]
pub struct JoinToken(Option<SecretString>);

impl JoinToken {
    pub fn new(token: impl Into<String>) -> Result<Self, GatewayError> {
        let token = token.into().trim().to_owned();
        if token.is_empty() {
            return Err(GatewayError::InvalidConfig(
                "the join token is empty".into(),
            ));
        }
        Ok(Self(Some(SecretString::from(token))))
    }

    /// No join token: nodes are authenticated by their client certificate alone. The
    /// gateway refuses to start with it unless the node link uses TLS.
    pub fn certificate_only() -> Self {
        Self(None)
    }

    pub fn is_certificate_only(&self) -> bool {
        self.0.is_none()
    }

    fn matches(&self, presented: &str) -> bool {
        self.0.as_ref().is_some_and(|token| {
            token
                .expose_secret()
                .as_bytes()
                .ct_eq(presented.as_bytes())
                .into()
        })
    }
}

pub struct NodeApi {
    fleet: Arc<Fleet>,
    join_token: JoinToken,
    /// Owns the reader of every attach stream.
    streams: TaskTracker,
    /// Ends every attach stream's reader when the gateway stops, so open streams do not
    /// hold the server's shutdown.
    stop: CancellationToken,
}

impl NodeApi {
    pub fn new(
        fleet: Arc<Fleet>,
        join_token: JoinToken,
        streams: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        Self {
            fleet,
            join_token,
            streams,
            stop,
        }
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), GatewayError> {
        if self.join_token.is_certificate_only() {
            return Ok(());
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or(GatewayError::Unauthenticated("missing join token"))?;
        if self.join_token.matches(presented) {
            Ok(())
        } else {
            Err(GatewayError::Unauthenticated("invalid join token"))
        }
    }
}

fn validate_hello(hello: &NodeHello) -> Result<(), GatewayError> {
    if !is_valid_node_id(&hello.node_id) {
        return Err(GatewayError::InvalidNode(format!(
            "hello.node_id must be {NODE_ID_RULE}"
        )));
    }
    if hello.running_tasks.len() > MAX_LISTED_TASKS
        || hello.unacknowledged_outcomes.len() > MAX_LISTED_TASKS
    {
        return Err(GatewayError::InvalidNode(format!(
            "hello lists more than {MAX_LISTED_TASKS} running tasks or outcomes"
        )));
    }
    if hello.labels.len() > MAX_LABELS {
        return Err(GatewayError::InvalidNode(format!(
            "hello.labels has more than {MAX_LABELS} entries"
        )));
    }
    for task in &hello.running_tasks {
        if task.task_id.is_empty() {
            return Err(GatewayError::InvalidNode(
                "hello.running_tasks has an entry with an empty task_id".into(),
            ));
        }
    }
    Ok(())
}

/// The hello's node id must be one the client certificate names.
fn check_identity(identity: &CertificateIdentity, node_id: &str) -> Result<(), GatewayError> {
    if identity.allows(node_id) {
        return Ok(());
    }
    Err(GatewayError::Stream(Status::permission_denied(format!(
        "node id mismatch: the hello says node {node_id} but the client certificate is for {} \
         (a node may attach only as the node its certificate names: issue it a certificate \
         with `ozfleet certs node --node-id {node_id}`)",
        identity.describe()
    ))))
}

/// The messages to one node, as the gRPC stream sends them.
pub type AttachStream = Pin<Box<dyn Stream<Item = Result<AttachResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodeApi {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<AttachRequest>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        self.authenticate(&request)?;
        // On a TLS node link the certificate is verified (fleet CA) by the handshake; the
        // node may attach only as a node it names.
        let identity = request
            .peer_certs()
            .map(|chain| {
                CertificateIdentity::from_chain(&chain).map_err(|error| {
                    Status::unauthenticated(format!("client certificate refused: {error}"))
                })
            })
            .transpose()?;
        let peer = request.remote_addr();
        let responses = open_attach_as(
            &self.fleet,
            &self.streams,
            self.stop.clone(),
            request.into_inner(),
            identity.as_ref(),
        )
        .await
        .inspect_err(|error| {
            if let GatewayError::Stream(status) = error
                && status.code() == tonic::Code::PermissionDenied
            {
                warn!(peer = ?peer, "Refused an attach: {}", status.message());
            }
        })?;
        Ok(Response::new(responses))
    }
}

/// Serves one attach stream whatever carries it (gRPC, or an in-process pipe in tests):
/// waits for the hello, attaches the node and hands every later message to the fleet
/// from a reader owned by `streams`. Returns the stream of messages to the node.
pub async fn open_attach<S>(
    fleet: &Arc<Fleet>,
    streams: &TaskTracker,
    stop: CancellationToken,
    inbound: S,
) -> Result<AttachStream, GatewayError>
where
    S: Stream<Item = Result<AttachRequest, Status>> + Unpin + Send + 'static,
{
    open_attach_as(fleet, streams, stop, inbound, None).await
}

/// [`open_attach`] for a connection whose client certificate names `identity`: the
/// hello's node id must be one it names, so a node cannot attach as (and claim the
/// tasks of) another node.
pub async fn open_attach_as<S>(
    fleet: &Arc<Fleet>,
    streams: &TaskTracker,
    stop: CancellationToken,
    mut inbound: S,
    identity: Option<&CertificateIdentity>,
) -> Result<AttachStream, GatewayError>
where
    S: Stream<Item = Result<AttachRequest, Status>> + Unpin + Send + 'static,
{
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
        .await
        .map_err(|_| GatewayError::InvalidNode("no hello within 10 s".into()))?
        .transpose()?;
    let hello = match first.and_then(|message| message.kind) {
        Some(attach_request::Kind::Hello(hello)) => hello,
        _ => {
            return Err(GatewayError::InvalidNode(
                "the first message of an attach stream must be a hello".into(),
            ));
        }
    };
    validate_hello(&hello)?;
    if let Some(identity) = identity {
        check_identity(identity, &hello.node_id)?;
    }

    let (sender, receiver) = tokio::sync::mpsc::channel(crate::fleet::NODE_QUEUE);
    let epoch = fleet.attach(&hello, sender)?;
    // Detaches however the reader ends, a panic included, so a node never looks attached
    // on a connection nobody reads.
    let connection = Connection {
        fleet: fleet.clone(),
        node_id: hello.node_id,
        epoch,
    };
    streams.spawn(async move {
        // Registered with the token once, not per message: every node's reader shares it.
        let mut stopped = pin!(stop.cancelled_owned());
        loop {
            let message = tokio::select! {
                message = inbound.next() => message,
                () = &mut stopped => break,
            };
            match message {
                Some(Ok(message)) => connection.dispatch(message),
                None => break,
                Some(Err(status)) => {
                    debug!(
                        node_id = connection.node_id,
                        epoch, "Attach stream ended: {status}"
                    );
                    break;
                }
            }
        }
    });
    // Write-ahead: a message leaves once the journal entries made before it are on disk.
    let durability = fleet.journal_durability();
    Ok(Box::pin(ReceiverStream::new(receiver).then(
        move |outgoing: crate::fleet::Outgoing| {
            let durability = durability.clone();
            async move {
                if let Some(durability) = durability {
                    durability.wait_for(outgoing.journal_mark).await;
                }
                Ok(*outgoing.response)
            }
        },
    )))
}

/// One node's attach stream, as the fleet knows it.
struct Connection {
    fleet: Arc<Fleet>,
    node_id: String,
    epoch: u64,
}

impl Connection {
    fn dispatch(&self, message: AttachRequest) {
        let (fleet, node_id, epoch) = (&self.fleet, self.node_id.as_str(), self.epoch);
        match message.kind {
            // The hello is the first message only; a node states its full state again by
            // reconnecting.
            Some(attach_request::Kind::Hello(_)) => {
                warn!(
                    node_id,
                    "Ignoring a hello in the middle of an attach stream"
                )
            }
            Some(attach_request::Kind::Accepted(accepted)) => {
                fleet.on_accepted(node_id, epoch, accepted)
            }
            Some(attach_request::Kind::Refused(refused)) => {
                fleet.on_refused(node_id, epoch, refused)
            }
            Some(attach_request::Kind::Outcome(outcome)) => {
                fleet.on_outcome(node_id, epoch, outcome)
            }
            None => warn!(node_id, "Ignoring an empty message from node"),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.fleet.detach(&self.node_id, self.epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_token_compares_exactly_and_hides_itself() {
        let token = JoinToken::new(" s3cret\n").unwrap();
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3cret2"));
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(JoinToken::new("  ").is_err());
        let none = JoinToken::certificate_only();
        assert!(none.is_certificate_only());
        assert!(!none.matches(""));
    }

    #[test]
    fn a_certificate_binds_the_node_id() {
        let key = rcgen::KeyPair::generate().unwrap();
        let certified = |params: rcgen::CertificateParams| params.self_signed(&key).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            rcgen::SanType::URI("ozfleet-node:node-a".try_into().unwrap()),
            rcgen::SanType::DnsName("node-b.nodes.ozfleet".try_into().unwrap()),
            rcgen::SanType::DnsName("gateway.example".try_into().unwrap()),
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-c");
        let identity = CertificateIdentity::from_chain(&[certified(params).der().clone()]).unwrap();
        assert_eq!(identity.node_ids(), ["node-a", "node-b"]);
        assert!(check_identity(&identity, "node-a").is_ok());
        assert!(check_identity(&identity, "node-b").is_ok());
        // The CN counts only in a certificate without node SANs.
        let status = tonic::Status::from(check_identity(&identity, "node-c").unwrap_err());
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("node-c"), "{}", status.message());
        assert!(
            status.message().contains("node-a, node-b"),
            "{}",
            status.message()
        );

        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-c");
        let identity = CertificateIdentity::from_chain(&[certified(params).der().clone()]).unwrap();
        assert_eq!(identity.node_ids(), ["node-c"]);
        assert!(CertificateIdentity::from_chain(&[]).is_err());
    }

    #[test]
    fn hello_must_name_a_sane_node() {
        let mut hello = NodeHello {
            node_id: "node-1.a_b".into(),
            ..Default::default()
        };
        assert!(validate_hello(&hello).is_ok());
        for bad in ["", "has space", "slash/", &"x".repeat(129)] {
            hello.node_id = bad.into();
            let error = validate_hello(&hello).unwrap_err().to_string();
            assert!(error.contains("hello.node_id"), "{bad}: {error}");
        }
    }
}
