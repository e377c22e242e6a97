//! The gRPC endpoint node agents attach to.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ozfleet_proto::v1::node_service_server::NodeService;
use ozfleet_proto::v1::{AttachRequest, AttachResponse, NodeHello, attach_request};
use subtle::ConstantTimeEq;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::GatewayError;
use crate::fleet::Fleet;

/// How long a new stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_NODE_ID_LEN: usize = 128;
/// Bounds on what one hello may list, so a rogue node cannot flood the gateway.
const MAX_LISTED_TASKS: usize = 10_000;
const MAX_LABELS: usize = 64;

/// The shared secret nodes present to join. Its `Debug` never shows it.
#[derive(Clone)]
pub struct JoinToken(String);

impl JoinToken {
    pub fn new(token: impl Into<String>) -> Result<Self, GatewayError> {
        let token = token.into().trim().to_owned();
        if token.is_empty() {
            return Err(GatewayError::InvalidConfig(
                "the join token is empty".into(),
            ));
        }
        Ok(Self(token))
    }

    fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

pub struct NodeApi {
    fleet: Arc<Fleet>,
    join_token: JoinToken,
    /// Ends every attach stream's reader when the gateway stops, so open streams do not
    /// hold the server's shutdown.
    stop: CancellationToken,
}

impl NodeApi {
    pub fn new(fleet: Arc<Fleet>, join_token: JoinToken, stop: CancellationToken) -> Self {
        Self {
            fleet,
            join_token,
            stop,
        }
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), GatewayError> {
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
    let id = &hello.node_id;
    if id.is_empty() {
        return Err(GatewayError::InvalidNode("hello.node_id is empty".into()));
    }
    if id.len() > MAX_NODE_ID_LEN
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(GatewayError::InvalidNode(format!(
            "hello.node_id must be 1-{MAX_NODE_ID_LEN} characters of [A-Za-z0-9._-]"
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

type AttachStream = Pin<Box<dyn Stream<Item = Result<AttachResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodeApi {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<AttachRequest>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        self.authenticate(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| GatewayError::InvalidNode("no hello within 10 s".into()))??;
        let hello = match first.and_then(|message| message.kind) {
            Some(attach_request::Kind::Hello(hello)) => hello,
            _ => {
                return Err(GatewayError::InvalidNode(
                    "the first message of an attach stream must be a hello".into(),
                )
                .into());
            }
        };
        validate_hello(&hello)?;

        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let node_id = hello.node_id.clone();
        let epoch = self.fleet.attach(hello, sender)?;
        let fleet = self.fleet.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    () = stop.cancelled() => break,
                };
                match message {
                    Ok(Some(message)) => dispatch(&fleet, &node_id, epoch, message),
                    Ok(None) => break,
                    Err(status) => {
                        debug!(node_id, epoch, "Attach stream ended: {status}");
                        break;
                    }
                }
            }
            fleet.detach(&node_id, epoch);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            receiver,
        ))))
    }
}

fn dispatch(fleet: &Fleet, node_id: &str, epoch: u64, message: AttachRequest) {
    match message.kind {
        Some(attach_request::Kind::Hello(hello)) if hello.node_id == node_id => {
            // A mid-stream hello is a full resync on the same connection.
            if validate_hello(&hello).is_ok() {
                fleet.resync(node_id, epoch, hello);
            }
        }
        Some(attach_request::Kind::Hello(_)) => {
            warn!(node_id, "Ignoring a hello that names another node id");
        }
        Some(attach_request::Kind::Accepted(accepted)) => {
            fleet.on_accepted(node_id, epoch, accepted)
        }
        Some(attach_request::Kind::Refused(refused)) => fleet.on_refused(node_id, epoch, refused),
        Some(attach_request::Kind::Outcome(outcome)) => fleet.on_outcome(node_id, epoch, outcome),
        None => warn!(node_id, "Ignoring an empty message from node"),
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
