//! The operators' side of the gateway: `ozfleet.v1.AdminService` (what the fleet holds,
//! drain, cancel, a live event stream) with optional bearer-token auth, and the gRPC
//! health statuses probes read. Everything here reads the fleet's snapshots and events;
//! nothing shows task contents or secrets.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::Stream;
use ozfleet_proto::v1::admin_service_server::AdminService;
use ozfleet_proto::v1::{self as pb};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::warn;

use crate::GatewayError;
use crate::fleet::{
    Fleet, FleetEvent, NodeSnapshot, NodeState, TaskResult, TaskSnapshot, TaskState,
};

/// The health service probes use for readiness: `SERVING` only while the upstream is
/// connected and at least one node is attached.
pub const READINESS_SERVICE: &str = "";
/// `SERVING` while the process runs.
pub const LIVENESS_SERVICE: &str = "liveness";

/// The token operators present to the admin API; a secret type, never shown.
#[derive(Clone, Debug)]
pub struct AdminToken(SecretString);

impl AdminToken {
    pub fn new(token: impl Into<String>) -> Result<Self, GatewayError> {
        let token = token.into().trim().to_owned();
        if token.is_empty() {
            return Err(GatewayError::InvalidConfig(
                "the admin token is empty".into(),
            ));
        }
        Ok(Self(SecretString::from(token)))
    }

    fn matches(&self, presented: &str) -> bool {
        self.0
            .expose_secret()
            .as_bytes()
            .ct_eq(presented.as_bytes())
            .into()
    }
}

/// Checks `authorization: Bearer <token>` on every admin call when a token is set.
#[derive(Clone)]
pub struct AdminAuth(Option<AdminToken>);

impl AdminAuth {
    pub fn new(token: Option<AdminToken>) -> Self {
        Self(token)
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            None => Err(Status::unauthenticated(
                "missing admin token: send `authorization: Bearer <token>` (the CLI reads --admin-token-file or OZFLEET_ADMIN_TOKEN)",
            )),
            Some(presented) if token.matches(presented) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid admin token")),
        }
    }
}

pub struct AdminApi {
    fleet: Arc<Fleet>,
    worker_id: String,
    /// Ends open event streams when the gateway stops.
    stop: CancellationToken,
}

impl AdminApi {
    pub fn new(fleet: Arc<Fleet>, worker_id: String, stop: CancellationToken) -> Self {
        Self {
            fleet,
            worker_id,
            stop,
        }
    }
}

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(at)
}

fn node_state(state: NodeState) -> pb::NodeState {
    match state {
        NodeState::Ready => pb::NodeState::Ready,
        NodeState::Draining => pb::NodeState::Draining,
        NodeState::Disconnected => pb::NodeState::Disconnected,
    }
}

fn task_state(state: TaskState) -> pb::TaskState {
    match state {
        TaskState::Offered => pb::TaskState::Offered,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Lost => pb::TaskState::Lost,
    }
}

fn node_message(node: NodeSnapshot) -> pb::Node {
    pb::Node {
        node_id: node.node_id.to_string(),
        name: node.name,
        backend: node.backend.into(),
        labels: node.labels.into_iter().collect(),
        version: node.version,
        max_concurrent_tasks: node.max_concurrent_tasks,
        active_tasks: node.active_tasks,
        state: node_state(node.state).into(),
        draining: node.draining,
        epoch: node.epoch,
        connected_since: Some(timestamp(node.connected_since)),
    }
}

fn task_message(task: TaskSnapshot) -> pb::Task {
    pb::Task {
        task_id: task.task_id,
        execution_id: task.execution_id,
        node_id: task.node_id.to_string(),
        state: task_state(task.state).into(),
        started_at: Some(timestamp(task.since)),
        cancel_requested: task.cancel_requested,
    }
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.trim().is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// The fleet totals `GetFleet` reports.
pub fn fleet_summary(worker_id: &str, fleet: &Fleet) -> pb::GetFleetResponse {
    let snapshot = fleet.snapshot();
    let mut summary = pb::GetFleetResponse {
        worker_id: worker_id.to_owned(),
        upstream_connected: snapshot.upstream_connected,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    };
    for node in &snapshot.nodes {
        match node.state {
            NodeState::Ready => {
                summary.nodes_connected += 1;
                if node.max_concurrent_tasks == 0 {
                    summary.capacity_unlimited = true;
                }
                summary.capacity_total += node.max_concurrent_tasks;
            }
            NodeState::Draining => {
                summary.nodes_connected += 1;
                summary.nodes_draining += 1;
            }
            NodeState::Disconnected => summary.nodes_disconnected += 1,
        }
    }
    for task in &snapshot.tasks {
        match task.state {
            TaskState::Offered => summary.tasks_offered += 1,
            TaskState::Running | TaskState::Lost => summary.tasks_active += 1,
        }
    }
    summary
}

/// An event as `WatchEvents` sends it: a kind, the ids it concerns and a detail.
pub fn event_message(event: &FleetEvent, at: SystemTime) -> pb::WatchEventsResponse {
    let mut message = pb::WatchEventsResponse {
        at: Some(timestamp(at)),
        ..Default::default()
    };
    let mut set = |kind: &str, node_id: &str, task_id: &str, execution_id: &str| {
        message.kind = kind.to_owned();
        message.node_id = node_id.to_owned();
        message.task_id = task_id.to_owned();
        message.execution_id = execution_id.to_owned();
    };
    let mut detail = String::new();
    let mut epoch = 0;
    match event {
        FleetEvent::UpstreamConnected => set("upstream_connected", "", "", ""),
        FleetEvent::UpstreamDisconnected => set("upstream_disconnected", "", "", ""),
        FleetEvent::UpstreamDialFailed => set("upstream_dial_failed", "", "", ""),
        FleetEvent::NodeAttached {
            node_id,
            epoch: attached_epoch,
            reattached,
        } => {
            set("node_attached", node_id, "", "");
            epoch = *attached_epoch;
            if *reattached {
                detail = "reattached".into();
            }
        }
        FleetEvent::NodeDetached {
            node_id,
            epoch: detached_epoch,
        } => {
            set("node_detached", node_id, "", "");
            epoch = *detached_epoch;
        }
        FleetEvent::NodeDraining { node_id, draining } => {
            set(
                if *draining {
                    "node_draining"
                } else {
                    "node_undrained"
                },
                node_id,
                "",
                "",
            );
        }
        FleetEvent::NodeForgotten { node_id } => set("node_forgotten", node_id, "", ""),
        FleetEvent::NodeRefused { node_id } => {
            set("node_refused", node_id, "", "");
            detail = "another agent process holds this node id".into();
        }
        FleetEvent::TaskOffered {
            task_id,
            execution_id,
            node_id,
        } => set("task_offered", node_id, task_id, execution_id),
        FleetEvent::TaskRefused {
            task_id,
            node_id,
            expired,
        } => {
            set("task_refused", node_id, task_id, "");
            if *expired {
                detail = "offer expired".into();
            }
        }
        FleetEvent::TaskRejected {
            task_id,
            execution_id,
            ..
        } => {
            set("task_rejected", "", task_id, execution_id);
            detail = "no node can take the task".into();
        }
        FleetEvent::TaskClaimed {
            task_id,
            execution_id,
            node_id,
            ..
        } => set("task_claimed", node_id, task_id, execution_id),
        FleetEvent::TaskStarted {
            task_id,
            execution_id,
            node_id,
            adopted,
        } => {
            set("task_started", node_id, task_id, execution_id);
            if *adopted {
                detail = "adopted".into();
            }
        }
        FleetEvent::TaskCancelRequested {
            task_id,
            by_operator,
        } => {
            set("task_cancel_requested", "", task_id, "");
            detail = if *by_operator {
                "by an operator"
            } else {
                "by Oz"
            }
            .into();
        }
        FleetEvent::TaskFinished {
            task_id,
            execution_id,
            node_id,
            result,
            lost,
            ..
        } => {
            set("task_finished", node_id, task_id, execution_id);
            detail = match result {
                TaskResult::Succeeded => "succeeded".into(),
                TaskResult::Cancelled => "cancelled".into(),
                TaskResult::Failed { reason, exit_code } => {
                    format!("failed: {reason} (exit code {exit_code})")
                }
            };
            if *lost {
                detail.push_str("; node lost");
            }
        }
        FleetEvent::TaskInvalid { task_id, problem } => {
            set("task_invalid", "", task_id, "");
            detail = problem.clone();
        }
        FleetEvent::TaskDropped {
            task_id,
            execution_id,
        } => set("task_dropped", "", task_id, execution_id),
        FleetEvent::OutcomeFenced { task_id, node_id } => {
            set("outcome_fenced", node_id, task_id, "");
            detail = "the node was not given this execution".into();
        }
        FleetEvent::OutcomeRelayed {
            task_id,
            execution_id,
        } => set("outcome_relayed", "", task_id, execution_id),
    }
    message.detail = detail;
    message.epoch = epoch;
    message
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_fleet(
        &self,
        _request: Request<pb::GetFleetRequest>,
    ) -> Result<Response<pb::GetFleetResponse>, Status> {
        Ok(Response::new(fleet_summary(&self.worker_id, &self.fleet)))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .fleet
            .snapshot()
            .nodes
            .into_iter()
            .map(node_message)
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::GetNodeResponse>, Status> {
        let node_id = required("node_id", &request.get_ref().node_id)?;
        let node = self
            .fleet
            .node(node_id)
            .ok_or_else(|| GatewayError::UnknownNode(node_id.to_owned()))?;
        Ok(Response::new(pb::GetNodeResponse {
            node: Some(node_message(node)),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let filter = request.into_inner();
        let state = pb::TaskState::try_from(filter.state).map_err(|_| {
            Status::invalid_argument(format!("unknown task state {}", filter.state))
        })?;
        let tasks = self
            .fleet
            .snapshot()
            .tasks
            .into_iter()
            .filter(|task| state == pb::TaskState::Unspecified || task_state(task.state) == state)
            .filter(|task| filter.node_id.is_empty() || *task.node_id == *filter.node_id)
            .map(task_message)
            .collect();
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let task_id = required("task_id", &request.get_ref().task_id)?;
        let task = self
            .fleet
            .task(task_id)
            .ok_or_else(|| GatewayError::UnknownTask(task_id.to_owned()))?;
        Ok(Response::new(pb::GetTaskResponse {
            task: Some(task_message(task)),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let task_id = required("task_id", &request.get_ref().task_id)?;
        let task = self.fleet.cancel_by_operator(task_id)?;
        Ok(Response::new(pb::CancelTaskResponse {
            task: Some(task_message(task)),
        }))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let node = self.set_draining(&request.get_ref().node_id, true)?;
        Ok(Response::new(pb::DrainNodeResponse { node: Some(node) }))
    }

    async fn undrain_node(
        &self,
        request: Request<pb::UndrainNodeRequest>,
    ) -> Result<Response<pb::UndrainNodeResponse>, Status> {
        let node = self.set_draining(&request.get_ref().node_id, false)?;
        Ok(Response::new(pb::UndrainNodeResponse { node: Some(node) }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let events = self.fleet.subscribe();
        let stop = self.stop.clone();
        let stream = futures::stream::unfold(events, move |mut events| {
            let stop = stop.clone();
            async move {
                let received = tokio::select! {
                    received = events.recv() => received,
                    () = stop.cancelled() => return None,
                };
                let message = match received {
                    Ok(event) => event_message(&event, SystemTime::now()),
                    Err(RecvError::Lagged(missed)) => {
                        warn!(missed, "An event watcher fell behind and missed events");
                        pb::WatchEventsResponse {
                            at: Some(timestamp(SystemTime::now())),
                            kind: "events_missed".into(),
                            detail: format!(
                                "{missed} events were missed; re-read ListNodes and ListTasks"
                            ),
                            ..Default::default()
                        }
                    }
                    Err(RecvError::Closed) => return None,
                };
                Some((Ok(message), events))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl AdminApi {
    fn set_draining(&self, node_id: &str, draining: bool) -> Result<pb::Node, Status> {
        let node_id = required("node_id", node_id)?;
        self.fleet.set_draining(node_id, draining)?;
        let node = self
            .fleet
            .node(node_id)
            .ok_or_else(|| GatewayError::UnknownNode(node_id.to_owned()))?;
        Ok(node_message(node))
    }
}

/// Keeps the readiness status in step with the fleet: `SERVING` while the upstream is
/// connected and a node is attached. Runs until `stop`.
pub async fn track_readiness(fleet: Arc<Fleet>, health: HealthReporter, stop: CancellationToken) {
    health
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    let mut inputs = fleet.readiness_inputs();
    let mut shown = None;
    loop {
        let ready = fleet.is_ready();
        if shown != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(READINESS_SERVICE, status).await;
            shown = Some(ready);
        }
        tokio::select! {
            changed = inputs.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}
