//! The node session in process: a fake backend the test controls and a fake connector
//! that hands the test the gateway's ends of each attach stream. Paused time, no sockets.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::BoxFuture;
use ozfleet_agent::backend::{TaskBackend, TaskFailure, TaskRun, cancelled};
use ozfleet_agent::node::{Inbound, Outbound};
use ozfleet_agent::reported::ReportedLog;
use ozfleet_agent::{GatewayConnector, NodeConfig};
use ozfleet_proto::oz::FailureReason;
use ozfleet_proto::v1::{
    self, AttachResponse, BackendKind, NodeHello, TaskOutcome, attach_request, attach_response,
    task_outcome,
};
use tempfile::TempDir;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

/// Upper bound for any awaited event; with paused time it only fires when the node is
/// stuck (the runtime then jumps straight to it).
const WAIT: Duration = Duration::from_secs(600);

/// How a fake task ends, on the test's command.
enum Finish {
    Succeed,
    Fail(TaskFailure),
    Panic,
}

/// A backend whose tasks run until the test says how they end; a task ends as cancelled
/// when its cancellation fires, unless it was started stubborn.
#[derive(Default)]
struct FakeBackend {
    commands: Mutex<HashMap<String, oneshot::Sender<Finish>>>,
    stubborn: Mutex<Vec<String>>,
    started: Mutex<Option<mpsc::UnboundedSender<String>>>,
}

impl FakeBackend {
    fn finish(&self, task_id: &str, how: Finish) {
        let sender = self
            .commands
            .lock()
            .unwrap()
            .remove(task_id)
            .expect("task is running in the backend");
        let _ = sender.send(how);
    }

    /// `task_id` ignores its cancellation (it ends only when told).
    fn make_stubborn(&self, task_id: &str) {
        self.stubborn.lock().unwrap().push(task_id.to_owned());
    }
}

impl TaskBackend for FakeBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Direct
    }

    fn execute(
        &self,
        task: TaskRun,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>> {
        let (sender, finish) = oneshot::channel();
        self.commands
            .lock()
            .unwrap()
            .insert(task.task_id.clone(), sender);
        let stubborn = self.stubborn.lock().unwrap().contains(&task.task_id);
        if let Some(started) = &*self.started.lock().unwrap() {
            let _ = started.send(task.task_id.clone());
        }
        Box::pin(async move {
            let cancelled_unless_stubborn = async {
                if stubborn {
                    std::future::pending::<()>().await;
                }
                cancel.cancelled().await;
            };
            tokio::select! {
                how = finish => match how.expect("the test keeps its commands") {
                    Finish::Succeed => Ok(()),
                    Finish::Fail(failure) => Err(failure),
                    Finish::Panic => panic!("fake backend panics on command"),
                },
                () = cancelled_unless_stubborn => Err(cancelled(143)),
            }
        })
    }
}

/// The gateway's ends of one attach stream.
struct Link {
    outbound: Outbound,
    inbound: mpsc::UnboundedSender<Result<AttachResponse, tonic::Status>>,
}

impl Link {
    async fn next(&mut self) -> attach_request::Kind {
        tokio::time::timeout(WAIT, self.outbound.next())
            .await
            .expect("the node sends a message")
            .expect("the stream is open")
            .kind
            .expect("message has a kind")
    }

    async fn hello(&mut self) -> NodeHello {
        match self.next().await {
            attach_request::Kind::Hello(hello) => hello,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    async fn outcome(&mut self) -> TaskOutcome {
        match self.next().await {
            attach_request::Kind::Outcome(outcome) => outcome,
            other => panic!("expected an outcome, got {other:?}"),
        }
    }

    fn send(&self, kind: attach_response::Kind) {
        self.inbound
            .send(Ok(AttachResponse { kind: Some(kind) }))
            .expect("the node reads the stream");
    }

    fn assign(&self, task_id: &str, execution_id: &str) {
        let oz = serde_json::json!({"task_id": task_id, "task": {"id": task_id}});
        self.send(attach_response::Kind::Assignment(v1::TaskAssignment {
            task_id: task_id.into(),
            execution_id: execution_id.into(),
            oz_assignment_json: serde_json::to_vec(&oz).unwrap(),
            settings: None,
            trace_context: Default::default(),
        }));
    }

    fn cancel(&self, task_id: &str, execution_id: &str) {
        self.send(attach_response::Kind::Cancellation(v1::TaskCancellation {
            task_id: task_id.into(),
            execution_id: execution_id.into(),
        }));
    }

    fn ack(&self, task_id: &str, execution_id: &str) {
        self.send(attach_response::Kind::OutcomeAck(v1::OutcomeAck {
            task_id: task_id.into(),
            execution_id: execution_id.into(),
        }));
    }
}

/// Hands every attach to the test as a [`Link`].
struct FakeConnector {
    links: mpsc::UnboundedSender<Link>,
}

impl GatewayConnector for FakeConnector {
    fn attach(&self, outbound: Outbound) -> BoxFuture<'_, anyhow::Result<Inbound>> {
        let (inbound, stream) = mpsc::unbounded_channel();
        let link = Link { outbound, inbound };
        let attached = self
            .links
            .send(link)
            .map_err(|_| anyhow::anyhow!("test ended"));
        Box::pin(async move {
            attached?;
            Ok(UnboundedReceiverStream::new(stream).boxed())
        })
    }
}

struct Harness {
    backend: Arc<FakeBackend>,
    links: mpsc::UnboundedReceiver<Link>,
    started: mpsc::UnboundedReceiver<String>,
    shutdown: CancellationToken,
    node: JoinSet<anyhow::Result<()>>,
    state: TempDir,
}

impl Harness {
    fn start(max_concurrent_tasks: u32) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), max_concurrent_tasks)
    }

    /// A node agent on an existing state directory (a restart).
    fn start_in(state: TempDir, max_concurrent_tasks: u32) -> Self {
        let backend = Arc::new(FakeBackend::default());
        let (started_sender, started) = mpsc::unbounded_channel();
        *backend.started.lock().unwrap() = Some(started_sender);
        let (links_sender, links) = mpsc::unbounded_channel();
        let config = NodeConfig {
            state_dir: state.path().to_path_buf(),
            node_name: "node-a".into(),
            labels: BTreeMap::from([("pool".to_owned(), "linux".to_owned())]),
            max_concurrent_tasks,
            idle_on_complete: None,
            shutdown_grace: Duration::from_secs(30),
        };
        let shutdown = CancellationToken::new();
        let mut node = JoinSet::new();
        node.spawn(ozfleet_agent::run(
            config,
            backend.clone(),
            Arc::new(FakeConnector {
                links: links_sender,
            }),
            shutdown.clone(),
        ));
        Self {
            backend,
            links,
            started,
            shutdown,
            node,
            state,
        }
    }

    async fn link(&mut self) -> Link {
        tokio::time::timeout(WAIT, self.links.recv())
            .await
            .expect("the node attaches")
            .expect("the node runs")
    }

    async fn started(&mut self) -> String {
        tokio::time::timeout(WAIT, self.started.recv())
            .await
            .expect("the backend starts a task")
            .expect("the backend runs")
    }

    async fn stopped(mut self) -> TempDir {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.node.join_next())
            .await
            .expect("the node stops")
            .expect("the node ran")
            .expect("the node did not panic")
            .expect("the node stopped cleanly");
        self.state
    }
}

async fn accepted(link: &mut Link, task_id: &str, execution_id: &str) {
    assert_eq!(
        link.next().await,
        attach_request::Kind::Accepted(v1::AssignmentAccepted {
            task_id: task_id.into(),
            execution_id: execution_id.into(),
        })
    );
}

async fn refused(link: &mut Link, task_id: &str) -> String {
    match link.next().await {
        attach_request::Kind::Refused(refused) if refused.task_id == task_id => refused.reason,
        other => panic!("expected a refusal of {task_id}, got {other:?}"),
    }
}

fn failed(outcome: &TaskOutcome) -> &v1::TaskFailed {
    match &outcome.result {
        Some(task_outcome::Result::Failed(failed)) => failed,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn refs(hello: &NodeHello) -> Vec<(String, String)> {
    let mut refs: Vec<_> = hello
        .running_tasks
        .iter()
        .map(|task| (task.task_id.clone(), task.execution_id.clone()))
        .collect();
    refs.sort();
    refs
}

#[tokio::test(start_paused = true)]
async fn hello_announces_identity_capacity_labels_and_backend() {
    let mut harness = Harness::start(3);
    let mut link = harness.link().await;
    let hello = link.hello().await;
    assert_eq!(hello.node_name, "node-a");
    assert_eq!(hello.max_concurrent_tasks, 3);
    assert_eq!(hello.backend, BackendKind::Direct as i32);
    assert_eq!(hello.labels.get("pool").map(String::as_str), Some("linux"));
    assert!(!hello.node_id.is_empty());
    assert!(!hello.instance_id.is_empty());
    assert!(hello.running_tasks.is_empty());
    assert!(hello.unacknowledged_outcomes.is_empty());
    harness.stopped().await;
}

#[tokio::test(start_paused = true)]
async fn outcome_is_kept_until_acknowledged_then_forgotten_and_recorded() {
    let mut harness = Harness::start(0);
    let mut link = harness.link().await;
    link.hello().await;
    link.assign("run-1", "exec-1");
    accepted(&mut link, "run-1", "exec-1").await;
    link.assign("run-2", "exec-2");
    accepted(&mut link, "run-2", "exec-2").await;
    for _ in 0..2 {
        harness.started().await;
    }
    harness.backend.finish("run-1", Finish::Succeed);
    let outcome = link.outcome().await;
    assert_eq!(
        outcome.result,
        Some(task_outcome::Result::Succeeded(v1::TaskSucceeded {}))
    );

    // The gateway goes away before acknowledging: the next hello restates the outcome
    // and the task still running.
    drop(link);
    let mut link = harness.link().await;
    let hello = link.hello().await;
    assert_eq!(hello.unacknowledged_outcomes, vec![outcome]);
    assert_eq!(refs(&hello), [("run-2".to_owned(), "exec-2".to_owned())]);

    link.ack("run-1", "exec-1");
    harness.backend.finish("run-2", Finish::Succeed);
    assert_eq!(link.outcome().await.task_id, "run-2");
    drop(link);
    let mut link = harness.link().await;
    let hello = link.hello().await;
    assert_eq!(
        hello
            .unacknowledged_outcomes
            .iter()
            .map(|outcome| outcome.task_id.as_str())
            .collect::<Vec<_>>(),
        ["run-2"],
        "the acknowledged outcome is forgotten"
    );
    assert!(hello.running_tasks.is_empty());
    link.ack("run-2", "exec-2");

    let state = harness.stopped().await;
    let (reported, _writer) = ReportedLog::open(state.path()).await.unwrap();
    assert!(reported.contains("run-1", "exec-1"));
    assert!(reported.contains("run-2", "exec-2"));
}

#[tokio::test(start_paused = true)]
async fn an_agent_killed_before_the_acknowledgement_re_sends_the_outcome_after_restart() {
    let mut harness = Harness::start(0);
    let mut link = harness.link().await;
    link.hello().await;
    link.assign("run-1", "exec-1");
    accepted(&mut link, "run-1", "exec-1").await;
    harness.started().await;
    harness.backend.finish(
        "run-1",
        Finish::Fail(TaskFailure::new(FailureReason::AgentInvocation, "boom").with_exit_code(3)),
    );
    let outcome = link.outcome().await;

    // kill -9: the process is gone before any acknowledgement, nothing shuts down.
    harness.node.abort_all();
    while harness.node.join_next().await.is_some() {}
    let state = harness.state;

    let mut restarted = Harness::start_in(state, 0);
    let mut link = restarted.link().await;
    let hello = link.hello().await;
    assert_eq!(hello.unacknowledged_outcomes, vec![outcome], "kept on disk");
    link.ack("run-1", "exec-1");
    // Acknowledged: the outcome is forgotten on disk too, so a third start has none.
    wait_for_no_pending(restarted.state.path()).await;
    let state = restarted.stopped().await;
    let mut third = Harness::start_in(state, 0);
    let mut link = third.link().await;
    assert!(link.hello().await.unacknowledged_outcomes.is_empty());
}

/// Waits until the node removed every pending outcome file.
async fn wait_for_no_pending(state: &std::path::Path) {
    let store = ozfleet_agent::outcomes::OutcomeStore::new(state);
    tokio::time::timeout(WAIT, async {
        while !store.load().unwrap().is_empty() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the acknowledged outcome is removed");
}

#[tokio::test(start_paused = true)]
async fn refuses_beyond_capacity_and_other_executions_but_repeats_acceptance() {
    let mut harness = Harness::start(1);
    let mut link = harness.link().await;
    link.hello().await;
    link.assign("run-1", "exec-1");
    accepted(&mut link, "run-1", "exec-1").await;
    harness.started().await;

    link.assign("run-1", "exec-1");
    accepted(&mut link, "run-1", "exec-1").await;
    link.assign("run-1", "exec-9");
    assert_eq!(
        refused(&mut link, "run-1").await,
        "task is already running here as execution exec-1"
    );
    link.assign("run-2", "exec-2");
    assert_eq!(
        refused(&mut link, "run-2").await,
        "node at maximum concurrency"
    );

    harness.backend.finish("run-1", Finish::Succeed);
    assert_eq!(link.outcome().await.task_id, "run-1");
    link.assign("run-2", "exec-2");
    accepted(&mut link, "run-2", "exec-2").await;
    harness.stopped().await;
}

#[tokio::test(start_paused = true)]
async fn gateway_cancellation_reports_cancelled_and_a_stale_one_is_ignored() {
    let mut harness = Harness::start(0);
    let mut link = harness.link().await;
    link.hello().await;
    link.assign("run-1", "exec-2");
    accepted(&mut link, "run-1", "exec-2").await;
    link.assign("run-2", "exec-1");
    accepted(&mut link, "run-2", "exec-1").await;
    for _ in 0..2 {
        harness.started().await;
    }

    // A cancellation of an earlier execution must not stop this one.
    link.cancel("run-1", "exec-1");
    link.cancel("run-2", "exec-1");
    let outcome = link.outcome().await;
    assert_eq!(outcome.task_id, "run-2");
    assert_eq!(
        outcome.result,
        Some(task_outcome::Result::Cancelled(v1::TaskCancelled {}))
    );
    harness.backend.finish("run-1", Finish::Succeed);
    let outcome = link.outcome().await;
    assert_eq!(outcome.task_id, "run-1");
    assert_eq!(
        outcome.result,
        Some(task_outcome::Result::Succeeded(v1::TaskSucceeded {}))
    );
    harness.stopped().await;
}

#[tokio::test(start_paused = true)]
async fn backend_failures_are_reported_with_reason_and_exit_code() {
    let mut harness = Harness::start(0);
    let mut link = harness.link().await;
    link.hello().await;
    link.assign("run-1", "exec-1");
    accepted(&mut link, "run-1", "exec-1").await;
    harness.started().await;
    let failure = TaskFailure::new(
        FailureReason::AgentInvocation,
        "oz agent exited with error: exit status 3",
    )
    .with_exit_code(3);
    harness.backend.finish("run-1", Finish::Fail(failure));
    let outcome = link.outcome().await;
    let failed = failed(&outcome);
    assert_eq!(failed.failure_reason, "agent_invocation");
    assert_eq!(failed.exit_code, 3);
    harness.stopped().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_backend_fails_the_task_once_and_frees_its_slot() {
    let mut harness = Harness::start(1);
    let mut link = harness.link().await;
    link.hello().await;
    link.assign("run-1", "exec-1");
    accepted(&mut link, "run-1", "exec-1").await;
    harness.started().await;
    harness.backend.finish("run-1", Finish::Panic);
    let outcome = link.outcome().await;
    assert_eq!(outcome.task_id, "run-1");
    let failed = failed(&outcome);
    assert_eq!(failed.failure_reason, "unknown");
    assert_eq!(failed.exit_code, 0);

    // The slot is free: capacity 1 takes the next task, and the panicked one is not
    // reported again.
    link.assign("run-2", "exec-2");
    accepted(&mut link, "run-2", "exec-2").await;
    harness.started().await;
    drop(link);
    let mut link = harness.link().await;
    let hello = link.hello().await;
    assert_eq!(refs(&hello), [("run-2".to_owned(), "exec-2".to_owned())]);
    assert_eq!(hello.unacknowledged_outcomes.len(), 1);
    harness.stopped().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_with_graceful_shutdown_outcomes_and_refuses_new_tasks() {
    let mut harness = Harness::start(0);
    let mut link = harness.link().await;
    link.hello().await;
    harness.backend.make_stubborn("run-2");
    link.assign("run-1", "exec-1");
    accepted(&mut link, "run-1", "exec-1").await;
    link.assign("run-2", "exec-2");
    accepted(&mut link, "run-2", "exec-2").await;
    for _ in 0..2 {
        harness.started().await;
    }

    harness.shutdown.cancel();
    let outcome = link.outcome().await;
    assert_eq!(outcome.task_id, "run-1");
    let failed = failed(&outcome);
    assert_eq!(failed.failure_reason, "graceful_shutdown");
    assert_eq!(failed.exit_code, 143);

    // Draining: new work is refused while the stubborn task is still ending.
    link.assign("run-3", "exec-3");
    assert_eq!(refused(&mut link, "run-3").await, "node is shutting down");
    harness.backend.finish("run-2", Finish::Succeed);
    assert_eq!(link.outcome().await.task_id, "run-2");
    link.ack("run-1", "exec-1");
    link.ack("run-2", "exec-2");
    let state = harness.stopped().await;
    let (reported, _writer) = ReportedLog::open(state.path()).await.unwrap();
    assert!(reported.contains("run-1", "exec-1"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_dial_is_retried() {
    struct RefuseFirst {
        refused: Mutex<bool>,
        inner: FakeConnector,
    }
    impl GatewayConnector for RefuseFirst {
        fn attach(&self, outbound: Outbound) -> BoxFuture<'_, anyhow::Result<Inbound>> {
            if !std::mem::replace(&mut *self.refused.lock().unwrap(), true) {
                return Box::pin(async { Err(anyhow::anyhow!("connection refused")) });
            }
            self.inner.attach(outbound)
        }
    }
    let state = tempfile::tempdir().unwrap();
    let (links_sender, mut links) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let config = NodeConfig {
        state_dir: state.path().to_path_buf(),
        node_name: "node-a".into(),
        labels: BTreeMap::new(),
        max_concurrent_tasks: 0,
        idle_on_complete: None,
        shutdown_grace: Duration::from_secs(1),
    };
    let mut node = JoinSet::new();
    node.spawn(ozfleet_agent::run(
        config,
        Arc::new(FakeBackend::default()),
        Arc::new(RefuseFirst {
            refused: Mutex::new(false),
            inner: FakeConnector {
                links: links_sender,
            },
        }),
        shutdown.clone(),
    ));
    let mut link = tokio::time::timeout(WAIT, links.recv())
        .await
        .unwrap()
        .unwrap();
    link.hello().await;
    shutdown.cancel();
    node.join_next().await.unwrap().unwrap().unwrap();
}
