//! The fleet state machine without sockets: messages go in as calls, Oz's side is read
//! from the outbox, each node's side from its stream receiver, and time is tokio's paused
//! clock driving the real deadline loop.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use ozfleet_proto::oz::{self, FailureReason, ServerMessage, WorkerMessage};
use ozfleet_proto::v1::{
    self, AttachResponse, NodeHello, TaskOutcome, TaskRef, UpstreamSettings, attach_response,
    task_outcome,
};
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::mpsc::Receiver;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::journal;
use super::*;
use crate::outbox::Outbox;

const WORKER_ID: &str = "fleet-test";

fn timings() -> FleetTimings {
    FleetTimings {
        offer_timeout: Duration::from_secs(10),
        node_lost_timeout: Duration::from_secs(60),
        node_keepalive: Duration::from_secs(20),
        reattach_window: Duration::from_secs(60),
    }
}

struct Harness {
    fleet: Arc<Fleet>,
    outbox: Arc<Outbox>,
    events: broadcast::Receiver<FleetEvent>,
    stop: CancellationToken,
    _deadline_loop: JoinSet<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct TestNode {
    id: String,
    epoch: u64,
    inbox: Receiver<crate::fleet::Outgoing>,
}

fn hello(node_id: &str) -> NodeHello {
    NodeHello {
        node_id: node_id.into(),
        node_name: format!("{node_id}-host"),
        backend: v1::BackendKind::Direct.into(),
        max_concurrent_tasks: 0,
        instance_id: format!("{node_id}-instance"),
        version: "test".into(),
        ..Default::default()
    }
}

fn running(task_id: &str, execution_id: &str) -> TaskRef {
    TaskRef {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
    }
}

fn succeeded(task_id: &str, execution_id: &str) -> TaskOutcome {
    TaskOutcome {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
        result: Some(task_outcome::Result::Succeeded(v1::TaskSucceeded {})),
    }
}

fn failed(task_id: &str, execution_id: &str, reason: &str, exit_code: i32) -> TaskOutcome {
    TaskOutcome {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
        result: Some(task_outcome::Result::Failed(v1::TaskFailed {
            failure_reason: reason.into(),
            exit_code,
            message: format!("Failed to execute task: {reason}"),
        })),
    }
}

fn accepted(task_id: &str, execution_id: &str) -> v1::AssignmentAccepted {
    v1::AssignmentAccepted {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
    }
}

fn refused(task_id: &str, execution_id: &str) -> v1::AssignmentRefused {
    v1::AssignmentRefused {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
        reason: "node at maximum concurrency".into(),
    }
}

impl Harness {
    fn new() -> Self {
        Self::with(timings())
    }

    fn with(timings: FleetTimings) -> Self {
        let outbox = Arc::new(Outbox::default());
        let settings = UpstreamSettings {
            worker_id: WORKER_ID.into(),
            server_root_url: "http://oz.test".into(),
            ..Default::default()
        };
        let fleet = Fleet::new(outbox.clone(), settings, timings);
        let events = fleet.subscribe();
        let stop = CancellationToken::new();
        let mut deadline_loop = JoinSet::new();
        deadline_loop.spawn({
            let fleet = fleet.clone();
            let stop = stop.clone();
            async move { fleet.run_deadlines(stop).await }
        });
        Self {
            fleet,
            outbox,
            events,
            stop,
            _deadline_loop: deadline_loop,
        }
    }

    fn attach(&self, hello: NodeHello) -> TestNode {
        let (sender, mut inbox) = tokio::sync::mpsc::channel(crate::fleet::NODE_QUEUE);
        let id = hello.node_id.clone();
        let epoch = self.fleet.attach(&hello, sender).expect("attached");
        match inbox.try_recv().map(|outgoing| *outgoing.response) {
            Ok(AttachResponse {
                kind: Some(attach_response::Kind::Welcome(welcome)),
            }) => {
                assert_eq!(welcome.epoch, epoch);
                assert_eq!(welcome.worker_id, WORKER_ID);
            }
            other => panic!("expected a welcome first, got {other:?}"),
        }
        TestNode { id, epoch, inbox }
    }

    fn assign(&self, task_id: &str, execution_id: &str) {
        let frame = format!(
            r#"{{"type":"task_assignment","data":{{"task_id":"{task_id}","execution_id":"{execution_id}","task":{{"id":"{task_id}","title":"t"}},"env_vars":{{"WARP_API_KEY":"secret"}}}}}}"#
        );
        let Ok(ServerMessage::TaskAssignment {
            assignment,
            raw_data,
        }) = oz::parse_server_message(&frame)
        else {
            panic!("test assignment must parse");
        };
        self.fleet
            .on_assignment(&assignment, raw_data.get().as_bytes());
    }

    /// The messages queued for Oz, each "written" (so outcome receipts are acknowledged).
    fn upstream(&self) -> Vec<WorkerMessage> {
        let mut sent = Vec::new();
        while let Some(queued) = self.outbox.front().now_or_never() {
            self.outbox.mark_sent(&queued);
            self.fleet.relayed(&queued);
            sent.push(queued.message);
        }
        sent
    }

    fn events(&mut self) -> Vec<FleetEvent> {
        let mut seen = Vec::new();
        loop {
            match self.events.try_recv() {
                Ok(event) => seen.push(event),
                Err(TryRecvError::Empty) => return seen,
                Err(error) => panic!("event stream: {error}"),
            }
        }
    }

    /// Waits (on the paused clock) for the first event `matches` accepts.
    async fn wait_for(&mut self, matches: impl Fn(&FleetEvent) -> bool) -> FleetEvent {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(3600), self.events.recv())
                .await
                .expect("the event within an hour of fleet time")
                .expect("event stream open");
            if matches(&event) {
                return event;
            }
        }
    }
}

impl TestNode {
    fn messages(&mut self) -> Vec<attach_response::Kind> {
        let mut seen = Vec::new();
        while let Ok(message) = self.inbox.try_recv() {
            seen.push(message.response.kind.expect("a message"));
        }
        seen
    }

    fn offers(&mut self) -> Vec<String> {
        self.messages()
            .into_iter()
            .filter_map(|message| match message {
                attach_response::Kind::Assignment(assignment) => Some(assignment.task_id),
                _ => None,
            })
            .collect()
    }

    fn is_closed(&mut self) -> bool {
        matches!(
            self.inbox.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        )
    }
}

fn cancellation(task_id: &str, execution_id: &str) -> attach_response::Kind {
    attach_response::Kind::Cancellation(v1::TaskCancellation {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
    })
}

fn ack(task_id: &str, execution_id: &str) -> attach_response::Kind {
    attach_response::Kind::OutcomeAck(v1::OutcomeAck {
        task_id: task_id.into(),
        execution_id: execution_id.into(),
    })
}

fn claimed(task_id: &str) -> WorkerMessage {
    WorkerMessage::claimed(task_id, WORKER_ID)
}

/// Assigns, lets `node` accept, and checks the claim.
fn run_on(h: &Harness, node: &mut TestNode, task_id: &str, execution_id: &str) {
    h.assign(task_id, execution_id);
    assert_eq!(node.offers(), vec![task_id.to_string()]);
    h.fleet
        .on_accepted(&node.id, node.epoch, accepted(task_id, execution_id));
    assert_eq!(h.upstream(), vec![claimed(task_id)]);
}

// ---- attach, epochs, identity -------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_reattach_gets_a_new_epoch_and_fences_the_old_connection() {
    let mut h = Harness::new();
    let mut first = h.attach(hello("node-a"));
    run_on(&h, &mut first, "run-1", "exec-1");
    let mut hello_again = hello("node-a");
    hello_again.running_tasks.push(running("run-1", "exec-1"));
    let mut second = h.attach(hello_again);
    assert!(second.epoch > first.epoch);
    assert!(first.is_closed(), "the old stream is dropped");

    // The old connection's late outcome is ignored; the new one's is relayed.
    h.fleet
        .on_outcome("node-a", first.epoch, succeeded("run-1", "exec-1"));
    assert!(h.upstream().is_empty());
    h.fleet
        .on_outcome("node-a", second.epoch, succeeded("run-1", "exec-1"));
    assert_eq!(h.upstream(), vec![WorkerMessage::completed("run-1")]);
    assert_eq!(second.messages(), vec![ack("run-1", "exec-1")]);

    let attached: Vec<_> = h
        .events()
        .into_iter()
        .filter_map(|event| match event {
            FleetEvent::NodeAttached { reattached, .. } => Some(reattached),
            _ => None,
        })
        .collect();
    assert_eq!(attached, vec![false, true]);
}

#[tokio::test(start_paused = true)]
async fn a_second_process_with_the_same_node_id_is_refused_while_the_first_is_attached() {
    let mut h = Harness::new();
    let _first = h.attach(hello("node-a"));
    let mut impostor = hello("node-a");
    impostor.instance_id = "another-process".into();
    let (sender, _inbox) = tokio::sync::mpsc::channel(crate::fleet::NODE_QUEUE);
    let error = h.fleet.attach(&impostor, sender).unwrap_err();
    assert!(matches!(error, GatewayError::DuplicateNode(ref id) if id == "node-a"));
    assert!(h.events().contains(&FleetEvent::NodeRefused {
        node_id: "node-a".into()
    }));
    // Once the first is gone, the other process may take the identity.
    h.fleet.detach("node-a", 1);
    let (sender, _inbox) = tokio::sync::mpsc::channel(crate::fleet::NODE_QUEUE);
    assert!(h.fleet.attach(&impostor, sender).is_ok());
}

// ---- offers ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_accepted_offer_is_claimed_once_and_its_outcome_relayed_once_then_acknowledged() {
    let mut h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    h.assign("run-1", "exec-1");
    assert_eq!(node.offers(), vec!["run-1"]);
    h.fleet
        .on_accepted("node-a", node.epoch, accepted("run-1", "exec-1"));
    // A repeated acceptance does not claim twice.
    h.fleet
        .on_accepted("node-a", node.epoch, accepted("run-1", "exec-1"));
    assert_eq!(h.upstream(), vec![claimed("run-1")]);

    let outcome = failed("run-1", "exec-1", "agent_invocation", 3);
    h.fleet.on_outcome("node-a", node.epoch, outcome.clone());
    // No acknowledgement until the message is written to Oz.
    assert!(node.messages().is_empty());
    assert_eq!(
        h.upstream(),
        vec![WorkerMessage::failed(
            "run-1",
            FailureReason::AgentInvocation,
            "Failed to execute task: agent_invocation".into(),
            3
        )]
    );
    assert_eq!(node.messages(), vec![ack("run-1", "exec-1")]);
    // A repeat (lost acknowledgement) is acknowledged again but not relayed again.
    h.fleet.on_outcome("node-a", node.epoch, outcome);
    assert!(h.upstream().is_empty());
    assert_eq!(node.messages(), vec![ack("run-1", "exec-1")]);

    let finished: Vec<_> = h
        .events()
        .into_iter()
        .filter(|event| matches!(event, FleetEvent::TaskFinished { .. }))
        .collect();
    assert_eq!(
        finished,
        vec![FleetEvent::TaskFinished {
            task_id: "run-1".into(),
            execution_id: "exec-1".into(),
            node_id: "node-a".into(),
            result: TaskResult::Failed {
                reason: "agent_invocation".into(),
                exit_code: 3
            },
            lost: false,
            ran_for: Duration::ZERO,
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_offer_goes_to_the_other_node_and_is_rejected_when_all_refuse() {
    let h = Harness::new();
    let mut a = h.attach(hello("node-a"));
    let mut b = h.attach(hello("node-b"));
    h.assign("run-1", "exec-1");
    let (first, second) = if a.offers() == vec!["run-1"] {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    h.fleet
        .on_refused(&first.id, first.epoch, refused("run-1", "exec-1"));
    assert_eq!(second.offers(), vec!["run-1"]);
    assert!(h.upstream().is_empty());
    h.fleet
        .on_refused(&second.id, second.epoch, refused("run-1", "exec-1"));
    assert_eq!(
        h.upstream(),
        vec![WorkerMessage::rejected_at_capacity("run-1")]
    );
    assert!(h.fleet.snapshot().tasks.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_gets_no_new_offers_and_is_dropped_if_it_stays_silent() {
    let mut h = Harness::new();
    let mut silent = h.attach(hello("node-a"));
    let mut other = h.attach(hello("node-b"));
    h.assign("run-1", "exec");
    let (first, second) = if silent.offers() == vec!["run-1"] {
        (&mut silent, &mut other)
    } else {
        (&mut other, &mut silent)
    };
    let started = Instant::now();
    h.wait_for(|event| matches!(event, FleetEvent::TaskRefused { expired: true, .. }))
        .await;
    assert_eq!(started.elapsed(), timings().offer_timeout);
    assert_eq!(second.offers(), vec!["run-1"], "moved to the other node");
    // The silent node is quiet: even as the least loaded node it gets nothing new.
    h.fleet
        .on_accepted(&second.id, second.epoch, accepted("run-1", "exec"));
    h.assign("run-2", "exec");
    assert!(first.offers().is_empty());
    assert_eq!(second.offers(), vec!["run-2"]);
    // Still silent an offer timeout later: dropped.
    h.wait_for(
        |event| matches!(event, FleetEvent::NodeDetached { node_id, .. } if **node_id == *first.id),
    )
    .await;
    assert!(first.is_closed());
}

#[tokio::test(start_paused = true)]
async fn an_offer_expires_on_time_while_the_deadline_loop_sleeps_for_a_later_deadline() {
    let mut h = Harness::new();
    let gone = h.attach(hello("node-a"));
    h.fleet.detach(&gone.id, gone.epoch);
    // The loop now sleeps until node-a's node-lost deadline, a minute away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut silent = h.attach(hello("node-b"));
    h.assign("run-1", "exec");
    assert_eq!(silent.offers(), vec!["run-1"]);
    let started = Instant::now();
    h.wait_for(|event| matches!(event, FleetEvent::TaskRefused { expired: true, .. }))
        .await;
    assert_eq!(started.elapsed(), timings().offer_timeout);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_node_that_answers_takes_offers_again() {
    let mut h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    h.assign("run-1", "exec-1");
    assert_eq!(node.offers(), vec!["run-1"]);
    h.wait_for(|event| matches!(event, FleetEvent::TaskRejected { .. }))
        .await;
    h.assign("run-2", "exec-2");
    assert!(node.offers().is_empty(), "quiet");
    // Any answer, even a late acceptance of the withdrawn offer, makes it heard again.
    h.fleet
        .on_accepted("node-a", node.epoch, accepted("run-1", "exec-1"));
    assert_eq!(node.messages(), vec![cancellation("run-1", "exec-1")]);
    h.assign("run-3", "exec-3");
    assert_eq!(node.offers(), vec!["run-3"]);
}

#[tokio::test(start_paused = true)]
async fn a_fast_node_gets_a_shorter_offer_timeout() {
    let mut h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    // It answers at once, every time.
    for round in 0..5 {
        run_on(&h, &mut node, &format!("run-{round}"), "exec");
    }
    h.assign("run-slow", "exec");
    let started = Instant::now();
    h.wait_for(|event| matches!(event, FleetEvent::TaskRefused { expired: true, .. }))
        .await;
    assert_eq!(started.elapsed(), MIN_OFFER_TIMEOUT);
    assert!(MIN_OFFER_TIMEOUT < timings().offer_timeout);
}

#[tokio::test(start_paused = true)]
async fn an_assignment_too_large_for_the_node_link_is_failed_upstream_not_offered() {
    let mut h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    let huge_id = "x".repeat(MAX_ID_BYTES + 1);
    h.assign(&huge_id, "exec");
    assert!(node.offers().is_empty());
    let upstream = h.upstream();
    assert!(matches!(upstream.as_slice(),
        [WorkerMessage::TaskFailed(failed)]
            if failed.task_id == huge_id && failed.message.contains("task_id is 257 bytes")));
    let invalid = h
        .events()
        .into_iter()
        .find_map(|event| match event {
            FleetEvent::TaskInvalid { task_id, .. } => Some(task_id),
            _ => None,
        })
        .expect("an event");
    assert!(
        invalid.len() < 100,
        "ids are cut for logs and events: {invalid}"
    );
    // The node link is unharmed: the next task is offered as usual.
    run_on(&h, &mut node, "run-2", "exec-2");
}

#[tokio::test(start_paused = true)]
async fn a_rejected_execution_is_adopted_when_a_node_turns_out_to_run_it() {
    let h = Harness::new();
    // No node yet (as right after a gateway restart): rejected, but not settled.
    h.assign("run-1", "exec-1");
    assert_eq!(
        h.upstream(),
        vec![WorkerMessage::rejected_at_capacity("run-1")]
    );
    let mut returning = hello("node-a");
    returning.running_tasks.push(running("run-1", "exec-1"));
    let mut node = h.attach(returning);
    assert!(node.messages().is_empty(), "adopted, not stopped");
    // Oz offers it again: it is claimed where it runs, not started twice.
    h.assign("run-1", "exec-1");
    assert!(node.offers().is_empty());
    assert_eq!(h.upstream(), vec![claimed("run-1")]);
}

#[tokio::test(start_paused = true)]
async fn an_answer_resets_the_unanswered_count_and_withdraws_the_offer_deadline() {
    let mut h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    for round in 0..6 {
        let task_id = format!("run-{round}");
        run_on(&h, &mut node, &task_id, "exec");
    }
    // Offer deadlines of answered offers were withdrawn: only what remains fires.
    assert!(h.fleet.lock().deadlines.is_empty());
    tokio::time::sleep(timings().offer_timeout * 2).await;
    assert!(
        !h.events()
            .iter()
            .any(|event| matches!(event, FleetEvent::NodeDetached { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_acceptance_of_a_withdrawn_offer_is_cancelled_on_that_node() {
    let mut h = Harness::new();
    let mut slow = h.attach(hello("node-a"));
    h.assign("run-1", "exec-1");
    assert_eq!(slow.offers(), vec!["run-1"]);
    h.wait_for(|event| matches!(event, FleetEvent::TaskRejected { .. }))
        .await;
    h.fleet
        .on_accepted("node-a", slow.epoch, accepted("run-1", "exec-1"));
    assert_eq!(slow.messages(), vec![cancellation("run-1", "exec-1")]);
    assert_eq!(
        h.upstream(),
        vec![WorkerMessage::rejected_at_capacity("run-1")],
        "no claim for a withdrawn offer"
    );
}

// ---- nodes lost -----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_node_lost_mid_task_has_the_task_reported_failed_after_the_grace() {
    let mut h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    run_on(&h, &mut node, "run-1", "exec-1");
    h.fleet.detach("node-a", node.epoch);
    let snapshot = h.fleet.snapshot();
    assert_eq!(snapshot.tasks[0].state, TaskState::Lost);
    assert_eq!(snapshot.nodes[0].state, NodeState::Disconnected);

    let detached_at = Instant::now();
    let finished = h
        .wait_for(|event| matches!(event, FleetEvent::TaskFinished { .. }))
        .await;
    assert_eq!(detached_at.elapsed(), timings().node_lost_timeout);
    assert!(matches!(
        finished,
        FleetEvent::TaskFinished { lost: true, .. }
    ));
    let upstream = h.upstream();
    assert_eq!(upstream.len(), 1);
    assert!(matches!(
        &upstream[0],
        WorkerMessage::TaskFailed(failed)
            if failed.task_id == "run-1" && failed.failure_reason == "unknown"
    ));
    h.wait_for(|event| matches!(event, FleetEvent::NodeForgotten { .. }))
        .await;
    assert!(h.fleet.snapshot().nodes.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_node_back_within_the_grace_keeps_its_task() {
    let mut h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    run_on(&h, &mut node, "run-1", "exec-1");
    h.fleet.detach("node-a", node.epoch);
    tokio::time::sleep(timings().node_lost_timeout / 2).await;
    let mut back = hello("node-a");
    back.running_tasks.push(running("run-1", "exec-1"));
    let mut node = h.attach(back);
    tokio::time::sleep(timings().node_lost_timeout * 2).await;
    assert!(h.upstream().is_empty(), "nothing reported lost");
    assert_eq!(h.fleet.snapshot().tasks[0].state, TaskState::Running);
    h.fleet
        .on_outcome("node-a", node.epoch, succeeded("run-1", "exec-1"));
    assert_eq!(h.upstream(), vec![WorkerMessage::completed("run-1")]);
    assert_eq!(node.messages(), vec![ack("run-1", "exec-1")]);
    assert!(
        !h.events()
            .iter()
            .any(|event| matches!(event, FleetEvent::NodeForgotten { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn a_pending_offer_of_a_disconnected_node_moves_on_at_its_offer_timeout() {
    let mut h = Harness::new();
    let mut a = h.attach(hello("node-a"));
    h.assign("run-1", "exec-1");
    assert_eq!(a.offers(), vec!["run-1"]);
    let offered_at = Instant::now();
    h.fleet.detach("node-a", a.epoch);
    let mut b = h.attach(hello("node-b"));
    assert!(
        b.offers().is_empty(),
        "not moved at once: node-a may have accepted"
    );
    h.wait_for(
        |event| matches!(event, FleetEvent::TaskOffered { node_id, .. } if &**node_id == "node-b"),
    )
    .await;
    assert_eq!(offered_at.elapsed(), timings().offer_timeout);
    assert_eq!(b.offers(), vec!["run-1"]);
}

// ---- cancellations --------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_cancellation_before_the_node_attaches_is_applied_when_it_announces_the_task() {
    let mut h = Harness::new();
    h.fleet.on_cancellation("run-1");
    let mut returning = hello("node-a");
    returning.running_tasks.push(running("run-1", "exec-1"));
    let mut node = h.attach(returning);
    assert_eq!(node.messages(), vec![cancellation("run-1", "exec-1")]);
    assert!(h.events().contains(&FleetEvent::TaskStarted {
        task_id: "run-1".into(),
        execution_id: "exec-1".into(),
        node_id: "node-a".into(),
        adopted: true,
    }));
    // The node's cancelled outcome is relayed: the task was adopted.
    let cancelled = TaskOutcome {
        result: Some(task_outcome::Result::Cancelled(v1::TaskCancelled {})),
        ..succeeded("run-1", "exec-1")
    };
    h.fleet.on_outcome("node-a", node.epoch, cancelled);
    assert_eq!(h.upstream(), vec![WorkerMessage::cancelled("run-1")]);
}

#[tokio::test(start_paused = true)]
async fn an_early_cancellation_is_forgotten_after_its_time() {
    let h = Harness::new();
    h.fleet.on_cancellation("run-1");
    tokio::time::sleep(EARLY_CANCELLATION_TTL + Duration::from_secs(1)).await;
    let mut returning = hello("node-a");
    returning.running_tasks.push(running("run-1", "exec-1"));
    // Past the reattach window too, so use a fleet with a long one.
    drop(h);
    let h = Harness::with(FleetTimings {
        reattach_window: EARLY_CANCELLATION_TTL * 2,
        ..timings()
    });
    h.fleet.on_cancellation("run-1");
    tokio::time::sleep(EARLY_CANCELLATION_TTL + Duration::from_secs(1)).await;
    let mut node = h.attach(returning);
    assert!(
        node.messages().is_empty(),
        "the stale cancellation was dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_cancelled_while_offered_is_dropped_after_a_refusal() {
    let mut h = Harness::new();
    let mut a = h.attach(hello("node-a"));
    let mut b = h.attach(hello("node-b"));
    h.assign("run-1", "exec-1");
    let holder = if a.offers().is_empty() {
        &mut b
    } else {
        &mut a
    };
    h.fleet.on_cancellation("run-1");
    assert_eq!(holder.messages(), vec![cancellation("run-1", "exec-1")]);
    h.fleet
        .on_refused(&holder.id, holder.epoch, refused("run-1", "exec-1"));
    assert!(a.offers().is_empty() && b.offers().is_empty());
    assert!(h.upstream().is_empty());
    assert!(h.events().contains(&FleetEvent::TaskDropped {
        task_id: "run-1".into(),
        execution_id: "exec-1".into(),
    }));
}

// ---- reconciliation of a hello ---------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_hello_announcing_a_pending_offer_as_running_claims_it() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    h.assign("run-1", "exec-1");
    assert_eq!(node.offers(), vec!["run-1"]);
    h.fleet.detach("node-a", node.epoch);
    let mut back = hello("node-a");
    back.running_tasks.push(running("run-1", "exec-1"));
    h.attach(back);
    assert_eq!(h.upstream(), vec![claimed("run-1")]);
}

#[tokio::test(start_paused = true)]
async fn a_hello_missing_a_pending_offer_gets_it_offered_again() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    h.assign("run-1", "exec-1");
    assert_eq!(node.offers(), vec!["run-1"]);
    h.fleet.detach("node-a", node.epoch);
    let mut node = h.attach(hello("node-a"));
    assert_eq!(node.offers(), vec!["run-1"]);
    assert!(h.upstream().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_hello_missing_a_running_task_gets_it_failed_upstream_at_once() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    run_on(&h, &mut node, "run-1", "exec-1");
    h.fleet.detach("node-a", node.epoch);
    h.attach(hello("node-a"));
    let upstream = h.upstream();
    assert!(matches!(
        upstream.as_slice(),
        [WorkerMessage::TaskFailed(failed)]
            if failed.task_id == "run-1"
                && failed.failure_reason == "unknown"
                && failed.message.contains("restarted and no longer runs the task")
    ));
}

#[tokio::test(start_paused = true)]
async fn a_hello_with_an_unacknowledged_outcome_of_a_given_task_relays_it_once() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    run_on(&h, &mut node, "run-1", "exec-1");
    h.fleet.detach("node-a", node.epoch);
    let with_outcome = || NodeHello {
        unacknowledged_outcomes: vec![failed("run-1", "exec-1", "setup_command", 2)],
        ..hello("node-a")
    };
    let mut node = h.attach(with_outcome());
    assert_eq!(h.upstream().len(), 1);
    assert_eq!(node.messages(), vec![ack("run-1", "exec-1")]);
    // The acknowledgement was lost: announced again, acknowledged, not relayed again.
    h.fleet.detach("node-a", node.epoch);
    let mut node = h.attach(with_outcome());
    assert_eq!(node.messages(), vec![ack("run-1", "exec-1")]);
    assert!(h.upstream().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_hello_announcing_a_task_placed_elsewhere_or_settled_is_told_to_stop() {
    let h = Harness::new();
    let mut a = h.attach(hello("node-a"));
    run_on(&h, &mut a, "run-1", "exec-1");
    run_on(&h, &mut a, "run-2", "exec-2");
    h.fleet
        .on_outcome("node-a", a.epoch, succeeded("run-2", "exec-2"));
    h.upstream();
    let mut claims = hello("node-b");
    claims.running_tasks = vec![running("run-1", "exec-1"), running("run-2", "exec-2")];
    let mut b = h.attach(claims);
    let mut told = b.messages();
    told.sort_by_key(|message| format!("{message:?}"));
    assert_eq!(
        told,
        vec![
            cancellation("run-1", "exec-1"),
            cancellation("run-2", "exec-2")
        ]
    );
    assert!(h.upstream().is_empty());
}

#[tokio::test(start_paused = true)]
async fn unknown_running_tasks_are_adopted_only_within_the_reattach_window() {
    let h = Harness::new();
    let mut early = hello("node-a");
    early.running_tasks.push(running("run-1", "exec-1"));
    let mut a = h.attach(early);
    assert!(a.messages().is_empty(), "adopted, not stopped");
    assert_eq!(h.fleet.snapshot().tasks[0].state, TaskState::Running);

    tokio::time::sleep(timings().reattach_window).await;
    let mut late = hello("node-b");
    late.running_tasks.push(running("run-9", "exec-9"));
    let mut b = h.attach(late);
    assert_eq!(b.messages(), vec![cancellation("run-9", "exec-9")]);
    assert_eq!(h.fleet.snapshot().tasks.len(), 1);
}

// ---- trust boundary --------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_node_cannot_settle_a_task_it_was_not_given() {
    let mut h = Harness::new();
    let mut owner = h.attach(hello("node-a"));
    run_on(&h, &mut owner, "run-1", "exec-1");
    let mut rogue = h.attach(hello("node-rogue"));
    h.events();

    // Live: another node's task, a finished task of another node, a never-assigned one.
    h.fleet
        .on_outcome("node-rogue", rogue.epoch, succeeded("run-1", "exec-1"));
    h.fleet.on_outcome(
        "node-rogue",
        rogue.epoch,
        succeeded("never-assigned", "exec-x"),
    );
    // In a hello (full-state report) after reconnecting.
    h.fleet.detach("node-rogue", rogue.epoch);
    let mut forged = hello("node-rogue");
    forged.unacknowledged_outcomes = vec![
        failed("run-1", "exec-1", "unknown", 1),
        succeeded("other-run", "exec-y"),
    ];
    let mut rogue_again = h.attach(forged);
    assert!(h.upstream().is_empty(), "nothing reaches Oz");
    let fenced = h
        .events()
        .into_iter()
        .filter(|event| matches!(event, FleetEvent::OutcomeFenced { .. }))
        .count();
    assert_eq!(fenced, 4);
    // The rogue's outcomes are acknowledged (so it stops repeating them), nothing else.
    assert_eq!(rogue.messages().len(), 2);
    assert_eq!(rogue_again.messages().len(), 2);

    // The real owner still settles its task.
    h.fleet
        .on_outcome("node-a", owner.epoch, succeeded("run-1", "exec-1"));
    assert_eq!(h.upstream(), vec![WorkerMessage::completed("run-1")]);
    // Once settled, the rogue cannot report it again either.
    h.fleet.on_outcome(
        "node-rogue",
        rogue_again.epoch,
        failed("run-1", "exec-1", "unknown", 1),
    );
    assert!(h.upstream().is_empty());
}

// ---- operators, snapshots, robustness ----------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_draining_node_gets_no_new_tasks_keeps_its_drain_across_reconnects_and_can_be_undrained()
{
    let mut h = Harness::new();
    let mut a = h.attach(hello("node-a"));
    let mut b = h.attach(hello("node-b"));
    h.fleet.set_draining("node-a", true).unwrap();
    assert_eq!(h.fleet.snapshot().nodes[0].state, NodeState::Draining);
    for round in 0..4 {
        h.assign(&format!("run-{round}"), "exec");
    }
    assert!(a.offers().is_empty());
    assert_eq!(b.offers().len(), 4);

    // The agent restarts: still drained.
    h.fleet.detach("node-a", a.epoch);
    let snapshot = h.fleet.snapshot();
    assert_eq!(snapshot.nodes[0].state, NodeState::Disconnected);
    assert!(snapshot.nodes[0].draining);
    let mut a = h.attach(hello("node-a"));
    assert_eq!(h.fleet.snapshot().nodes[0].state, NodeState::Draining);
    h.assign("run-x", "exec");
    assert!(a.offers().is_empty());

    h.fleet.set_draining("node-a", false).unwrap();
    h.assign("run-y", "exec");
    assert_eq!(
        a.offers(),
        vec!["run-y"],
        "the idle node is least loaded again"
    );
    assert!(matches!(
        h.fleet.set_draining("no-such-node", true),
        Err(GatewayError::UnknownNode(_))
    ));
    let drains: Vec<bool> = h
        .events()
        .into_iter()
        .filter_map(|event| match event {
            FleetEvent::NodeDraining { draining, .. } => Some(draining),
            _ => None,
        })
        .collect();
    assert_eq!(drains, vec![true, false]);
}

#[tokio::test(start_paused = true)]
async fn when_every_node_is_full_or_draining_the_task_is_rejected() {
    let h = Harness::new();
    let mut small = hello("node-a");
    small.max_concurrent_tasks = 1;
    let mut a = h.attach(small);
    let _b = h.attach(hello("node-b"));
    h.fleet.set_draining("node-b", true).unwrap();
    run_on(&h, &mut a, "run-1", "exec-1");
    h.assign("run-2", "exec-2");
    assert_eq!(
        h.upstream(),
        vec![WorkerMessage::rejected_at_capacity("run-2")]
    );
    // The slot frees: the next task fits again.
    h.fleet
        .on_outcome("node-a", a.epoch, succeeded("run-1", "exec-1"));
    h.upstream();
    run_on(&h, &mut a, "run-3", "exec-3");
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_shows_nodes_and_tasks_without_contents() {
    let h = Harness::new();
    let mut labelled = hello("node-a");
    labelled.labels.insert("pool".into(), "gpu".into());
    labelled.max_concurrent_tasks = 4;
    let mut node = h.attach(labelled);
    run_on(&h, &mut node, "run-1", "exec-1");
    h.assign("run-2", "exec-2");
    h.fleet.set_upstream_connected(true);
    let snapshot = h.fleet.snapshot();
    assert!(snapshot.upstream_connected);
    let shown = &snapshot.nodes[0];
    assert_eq!(&*shown.node_id, "node-a");
    assert_eq!(shown.name, "node-a-host");
    assert_eq!(shown.labels.get("pool").map(String::as_str), Some("gpu"));
    assert_eq!(shown.max_concurrent_tasks, 4);
    assert_eq!(shown.active_tasks, 2);
    assert_eq!(shown.state, NodeState::Ready);
    let states: Vec<_> = snapshot
        .tasks
        .iter()
        .map(|task| (task.task_id.as_str(), task.state))
        .collect();
    assert_eq!(
        states,
        vec![("run-1", TaskState::Running), ("run-2", TaskState::Offered)]
    );
    assert!(!format!("{snapshot:?}").contains("secret"));
}

#[tokio::test(start_paused = true)]
async fn a_panic_during_a_transition_does_not_take_the_fleet_down() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    let fleet = h.fleet.clone();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fleet.apply(|_| panic!("a broken invariant"));
    }));
    assert!(panicked.is_err());
    assert!(h.fleet.state.is_poisoned());
    // The next message is served as usual.
    run_on(&h, &mut node, "run-1", "exec-1");
    assert!(!h.fleet.state.is_poisoned());
}

#[tokio::test(start_paused = true)]
async fn a_repeated_assignment_of_a_running_task_is_claimed_again_not_offered_again() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    run_on(&h, &mut node, "run-1", "exec-1");
    h.assign("run-1", "exec-1");
    assert!(node.offers().is_empty());
    assert_eq!(h.upstream(), vec![claimed("run-1")]);
}

#[tokio::test(start_paused = true)]
async fn upstream_connection_changes_are_events() {
    let mut h = Harness::new();
    h.fleet.set_upstream_connected(true);
    h.fleet.set_upstream_connected(true);
    h.fleet.set_upstream_connected(false);
    assert_eq!(
        h.events(),
        vec![
            FleetEvent::UpstreamConnected,
            FleetEvent::UpstreamDisconnected
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_operator_cancel_stops_the_task_and_oz_gets_one_task_cancelled_failure() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    run_on(&h, &mut node, "run-1", "exec-1");
    let shown = h.fleet.cancel_by_operator("run-1").unwrap();
    assert!(shown.cancel_requested);
    assert_eq!(node.messages(), vec![cancellation("run-1", "exec-1")]);
    let cancelled = TaskOutcome {
        result: Some(task_outcome::Result::Cancelled(v1::TaskCancelled {})),
        ..succeeded("run-1", "exec-1")
    };
    h.fleet.on_outcome("node-a", node.epoch, cancelled.clone());
    h.fleet.on_outcome("node-a", node.epoch, cancelled);
    assert_eq!(
        h.upstream(),
        vec![WorkerMessage::failed(
            "run-1",
            FailureReason::TaskCancelled,
            oz_mapping::OPERATOR_CANCELLED_MESSAGE.into(),
            0
        )]
    );
    assert!(matches!(
        h.fleet.cancel_by_operator("run-1"),
        Err(GatewayError::UnknownTask(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn an_operator_cancel_of_an_offer_that_no_node_takes_is_reported_once() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    h.assign("run-1", "exec-1");
    assert_eq!(node.offers(), vec!["run-1"]);
    h.fleet.cancel_by_operator("run-1").unwrap();
    h.fleet
        .on_refused("node-a", node.epoch, refused("run-1", "exec-1"));
    let upstream = h.upstream();
    assert!(matches!(upstream.as_slice(),
        [WorkerMessage::TaskFailed(failed)] if failed.failure_reason == "task_cancelled"));
    assert!(h.fleet.snapshot().tasks.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_held_tasks_leaves_no_burst_sized_ledger_behind() {
    let h = Harness::new();
    let mut node = h.attach(hello("node-a"));
    const BURST: usize = 5_000;
    let executions: Vec<_> = (0..BURST)
        .map(|i| (format!("run-{i}"), format!("exec-{i}")))
        .collect();
    // In chunks the node's queue holds.
    for chunk in executions.chunks(crate::fleet::NODE_QUEUE / 2) {
        for (task_id, execution_id) in chunk {
            h.assign(task_id, execution_id);
        }
        assert_eq!(node.offers().len(), chunk.len());
    }
    assert!(h.fleet.lock().ledger.tasks.capacity() >= BURST);

    for (task_id, execution_id) in &executions {
        h.fleet
            .on_accepted(&node.id, node.epoch, accepted(task_id, execution_id));
        h.fleet
            .on_outcome(&node.id, node.epoch, succeeded(task_id, execution_id));
    }
    assert_eq!(h.upstream().len(), 2 * BURST, "every claim and completion");
    let state = h.fleet.lock();
    assert!(state.ledger.tasks.is_empty());
    assert!(
        state.ledger.tasks.capacity() < 256,
        "the task map still has room for {} tasks",
        state.ledger.tasks.capacity()
    );
    assert!(
        state.ledger.is_finished("run-0", "exec-0"),
        "what it must remember stays"
    );
}

// ---- property test: any sequence of messages ---------------------------------------------

mod properties {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        Attach {
            node: usize,
            running: Vec<(usize, usize)>,
            outcomes: Vec<(usize, usize)>,
        },
        Detach(usize),
        Assign(usize, usize),
        Accept(usize, usize, usize),
        Refuse(usize, usize, usize),
        Outcome(usize, usize, usize),
        Cancel(usize),
        OperatorCancel(usize),
        Drain(usize, bool),
        Wait(u64),
    }

    const NODES: usize = 3;
    const TASKS: usize = 5;
    const EXECUTIONS: usize = 2;

    fn step() -> impl Strategy<Value = Step> {
        let pair = (0..TASKS, 0..EXECUTIONS);
        prop_oneof![
            (
                0..NODES,
                prop::collection::vec(pair.clone(), 0..3),
                prop::collection::vec(pair.clone(), 0..3)
            )
                .prop_map(|(node, running, outcomes)| Step::Attach {
                    node,
                    running,
                    outcomes
                }),
            (0..NODES).prop_map(Step::Detach),
            pair.clone()
                .prop_map(|(task, execution)| Step::Assign(task, execution)),
            (0..NODES, pair.clone())
                .prop_map(|(node, (task, execution))| Step::Accept(node, task, execution)),
            (0..NODES, pair.clone())
                .prop_map(|(node, (task, execution))| Step::Refuse(node, task, execution)),
            (0..NODES, pair.clone())
                .prop_map(|(node, (task, execution))| Step::Outcome(node, task, execution)),
            (0..TASKS).prop_map(Step::Cancel),
            (0..TASKS).prop_map(Step::OperatorCancel),
            (0..NODES, any::<bool>()).prop_map(|(node, on)| Step::Drain(node, on)),
            (1u64..90).prop_map(Step::Wait),
        ]
    }

    fn ids(task: usize, execution: usize) -> (String, String) {
        (format!("run-{task}"), format!("exec-{execution}"))
    }

    /// Plays `steps` and checks the fleet's promises after each one.
    async fn play(steps: Vec<Step>) -> Result<(), TestCaseError> {
        let h = Harness::new();
        let mut epochs: HashMap<usize, u64> = HashMap::new();
        let mut inboxes = Vec::new();
        // Executions Oz assigned, or a node announced running (adoptable).
        let mut legitimate: HashMap<String, HashSet<String>> = HashMap::new();
        let mut reports: HashMap<String, usize> = HashMap::new();
        for step in steps {
            match step {
                Step::Attach {
                    node,
                    running: tasks,
                    outcomes,
                } => {
                    let mut hello = hello(&format!("node-{node}"));
                    for (task, execution) in tasks {
                        let (task_id, execution_id) = ids(task, execution);
                        legitimate
                            .entry(task_id.clone())
                            .or_default()
                            .insert(execution_id.clone());
                        hello.running_tasks.push(running(&task_id, &execution_id));
                    }
                    hello
                        .running_tasks
                        .sort_by(|a, b| a.task_id.cmp(&b.task_id));
                    hello.running_tasks.dedup_by(|a, b| a.task_id == b.task_id);
                    for (task, execution) in outcomes {
                        let (task_id, execution_id) = ids(task, execution);
                        hello
                            .unacknowledged_outcomes
                            .push(succeeded(&task_id, &execution_id));
                    }
                    let (sender, inbox) = tokio::sync::mpsc::channel(crate::fleet::NODE_QUEUE);
                    if let Ok(epoch) = h.fleet.attach(&hello, sender) {
                        epochs.insert(node, epoch);
                        inboxes.push(inbox);
                    }
                }
                Step::Detach(node) => {
                    if let Some(epoch) = epochs.get(&node) {
                        h.fleet.detach(&format!("node-{node}"), *epoch);
                    }
                }
                Step::Assign(task, execution) => {
                    let (task_id, execution_id) = ids(task, execution);
                    legitimate
                        .entry(task_id.clone())
                        .or_default()
                        .insert(execution_id.clone());
                    h.assign(&task_id, &execution_id);
                }
                Step::Accept(node, task, execution) => {
                    let (task_id, execution_id) = ids(task, execution);
                    let epoch = epochs.get(&node).copied().unwrap_or(0);
                    h.fleet.on_accepted(
                        &format!("node-{node}"),
                        epoch,
                        accepted(&task_id, &execution_id),
                    );
                }
                Step::Refuse(node, task, execution) => {
                    let (task_id, execution_id) = ids(task, execution);
                    let epoch = epochs.get(&node).copied().unwrap_or(0);
                    h.fleet.on_refused(
                        &format!("node-{node}"),
                        epoch,
                        refused(&task_id, &execution_id),
                    );
                }
                Step::Outcome(node, task, execution) => {
                    let (task_id, execution_id) = ids(task, execution);
                    let epoch = epochs.get(&node).copied().unwrap_or(0);
                    h.fleet.on_outcome(
                        &format!("node-{node}"),
                        epoch,
                        failed(&task_id, &execution_id, "agent_invocation", 1),
                    );
                }
                Step::Cancel(task) => h.fleet.on_cancellation(&format!("run-{task}")),
                Step::OperatorCancel(task) => {
                    let _ = h.fleet.cancel_by_operator(&format!("run-{task}"));
                }
                Step::Drain(node, on) => {
                    let _ = h.fleet.set_draining(&format!("node-{node}"), on);
                }
                Step::Wait(seconds) => tokio::time::sleep(Duration::from_secs(seconds)).await,
            }
            for message in h.upstream() {
                let terminal = matches!(
                    message,
                    WorkerMessage::TaskCompleted(_) | WorkerMessage::TaskFailed(_)
                );
                if terminal {
                    let task_id = message.task_id().to_owned();
                    let count = reports.entry(task_id.clone()).or_default();
                    *count += 1;
                    let allowed = legitimate.get(&task_id).map_or(0, HashSet::len);
                    prop_assert!(
                        *count <= allowed,
                        "{task_id}: {count} terminal reports for {allowed} legitimate executions"
                    );
                }
            }
            let state = h.fleet.lock();
            for node in state.registry.values() {
                prop_assert_eq!(
                    state.placement.contains(&node.node_id),
                    node.is_eligible() && node.standing().capacity.is_none(),
                    "the index holds exactly the eligible nodes (capacity is unlimited here)"
                );
                for task_id in &node.tasks {
                    let held = state.ledger.tasks.get(task_id);
                    prop_assert!(
                        held.is_some_and(|task| task.node_id.as_deref() == Some(&*node.node_id)),
                        "node {} lists {task_id}, which the ledger does not place there",
                        node.node_id
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_sequence_keeps_the_fleet_consistent_and_reports_each_execution_at_most_once(
            steps in prop::collection::vec(step(), 1..40)
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(play(steps))?;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_that_does_not_read_its_stream_is_disconnected_not_buffered_for() {
    let mut h = Harness::new();
    // A queue of two: the welcome and one offer fit, the next offer does not.
    let (sender, _unread) = tokio::sync::mpsc::channel(2);
    let epoch = h.fleet.attach(&hello("node-a"), sender).unwrap();
    h.assign("run-1", "exec-1");
    h.assign("run-2", "exec-2");
    let detached = h
        .events()
        .into_iter()
        .find(|event| matches!(event, FleetEvent::NodeDetached { .. }));
    assert_eq!(
        detached,
        Some(FleetEvent::NodeDetached {
            node_id: "node-a".into(),
            epoch
        })
    );
    assert_eq!(h.fleet.snapshot().nodes[0].state, NodeState::Disconnected);
}

// ---- after a gateway restart (journal) ----------------------------------------------------

/// A fleet as a restarted gateway builds it: `recovered` is what the journal left open.
fn restarted(recovered: &[(&str, &str, &str)]) -> Harness {
    let mut h = Harness::new();
    let recovered: journal::Recovered = recovered
        .iter()
        .map(|(task, execution, node)| {
            (
                ((*task).to_owned(), (*execution).to_owned()),
                Arc::from(*node),
            )
        })
        .collect();
    let settings = UpstreamSettings {
        worker_id: WORKER_ID.into(),
        ..Default::default()
    };
    h.fleet = Fleet::with_journal(
        h.outbox.clone(),
        settings,
        timings(),
        journal::Journal::disabled(),
        recovered,
    );
    h.events = h.fleet.subscribe();
    h._deadline_loop.spawn({
        let fleet = h.fleet.clone();
        let stop = h.stop.clone();
        async move { fleet.run_deadlines(stop).await }
    });
    h
}

#[tokio::test(start_paused = true)]
async fn a_re_offer_waits_for_its_node_and_is_claimed_where_it_still_runs() {
    let h = restarted(&[("run-1", "exec-1", "node-a")]);
    // Another node is back first and idle: the re-offer must not start there.
    let mut other = h.attach(hello("node-b"));
    h.assign("run-1", "exec-1");
    assert!(other.offers().is_empty(), "held, not started a second time");
    assert!(h.upstream().is_empty(), "nor rejected");
    let mut back = hello("node-a");
    back.running_tasks.push(running("run-1", "exec-1"));
    let mut node = h.attach(back);
    assert!(node.messages().is_empty());
    assert_eq!(h.upstream(), vec![claimed("run-1")]);
    // And its outcome is relayed as usual.
    h.fleet
        .on_outcome("node-a", node.epoch, succeeded("run-1", "exec-1"));
    assert_eq!(h.upstream(), vec![WorkerMessage::completed("run-1")]);
}

#[tokio::test(start_paused = true)]
async fn a_held_re_offer_goes_elsewhere_if_its_node_does_not_come_back() {
    let mut h = restarted(&[("run-1", "exec-1", "node-a")]);
    let mut other = h.attach(hello("node-b"));
    h.assign("run-1", "exec-1");
    let started = Instant::now();
    h.wait_for(|event| matches!(event, FleetEvent::TaskOffered { .. }))
        .await;
    assert_eq!(started.elapsed(), timings().node_lost_timeout);
    assert_eq!(other.offers(), vec!["run-1"]);
}

#[tokio::test(start_paused = true)]
async fn an_outcome_that_ended_while_the_gateway_was_away_is_relayed_with_its_claim() {
    let h = restarted(&[("run-1", "exec-1", "node-a")]);
    let with_outcome = NodeHello {
        unacknowledged_outcomes: vec![failed("run-1", "exec-1", "agent_invocation", 3)],
        ..hello("node-a")
    };
    let mut node = h.attach(with_outcome);
    let upstream = h.upstream();
    assert_eq!(upstream[0], claimed("run-1"));
    assert!(matches!(&upstream[1], WorkerMessage::TaskFailed(failed)
        if failed.failure_reason == "agent_invocation"));
    assert_eq!(upstream.len(), 2);
    assert_eq!(node.messages(), vec![ack("run-1", "exec-1")]);
}

#[tokio::test(start_paused = true)]
async fn the_journal_decides_who_may_report_after_a_restart() {
    let mut h = restarted(&[("run-1", "exec-1", "node-a")]);
    // Another node claims to run it, or reports it: stopped and fenced.
    let mut claims = hello("node-b");
    claims.running_tasks.push(running("run-1", "exec-1"));
    let mut impostor = h.attach(claims);
    assert_eq!(impostor.messages(), vec![cancellation("run-1", "exec-1")]);
    h.fleet
        .on_outcome("node-b", impostor.epoch, succeeded("run-1", "exec-1"));
    assert!(h.upstream().is_empty());
    assert!(
        h.events()
            .iter()
            .any(|event| matches!(event, FleetEvent::OutcomeFenced { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn new_node_ids_beyond_the_limit_are_refused_known_ones_still_reattach() {
    let h = Harness::new();
    h.fleet.limit_nodes(2);
    let a = h.attach(hello("node-a"));
    let _b = h.attach(hello("node-b"));
    let (sender, _inbox) = tokio::sync::mpsc::channel(NODE_QUEUE);
    let error = h.fleet.attach(&hello("node-c"), sender).unwrap_err();
    assert!(matches!(error, GatewayError::TooManyNodes(2)), "{error}");
    // A known node coming back is not a new identity.
    h.fleet.detach("node-a", a.epoch);
    h.attach(hello("node-a"));
}

#[tokio::test(start_paused = true)]
async fn with_a_journal_a_node_cannot_have_unknown_tasks_adopted_even_right_after_start() {
    let state = tempfile::tempdir().unwrap();
    let (journal, _writer, recovered) = journal::Journal::open(state.path()).unwrap();
    let mut h = Harness::new();
    h.fleet = Fleet::with_journal(
        h.outbox.clone(),
        UpstreamSettings {
            worker_id: WORKER_ID.into(),
            ..Default::default()
        },
        timings(),
        journal,
        recovered,
    );
    let mut claims = hello("node-a");
    claims.running_tasks.push(running("never-given", "exec"));
    let mut node = h.attach(claims);
    assert_eq!(node.messages(), vec![cancellation("never-given", "exec")]);
    assert!(h.fleet.snapshot().tasks.is_empty());
}

// ---- readings (metrics, readiness) ----------------------------------------------------

/// What the metrics and readiness read in one cheap pass must say what a full snapshot
/// says.
fn assert_readings_match_snapshot(fleet: &Fleet) {
    let snapshot = fleet.snapshot();
    let readings = fleet.readings();
    assert_eq!(readings.upstream_connected, snapshot.upstream_connected);
    assert_eq!(
        readings.tasks_active,
        snapshot
            .tasks
            .iter()
            .filter(|task| task.state != TaskState::Offered)
            .count()
    );
    let mut nodes = readings.nodes.clone();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let expected: Vec<NodeReading> = snapshot
        .nodes
        .iter()
        .map(|node| NodeReading {
            node_id: node.node_id.clone(),
            backend: node.backend,
            state: node.state,
            active_tasks: node.active_tasks,
            max_concurrent_tasks: node.max_concurrent_tasks,
        })
        .collect();
    assert_eq!(nodes, expected);
    assert_eq!(
        fleet.is_ready(),
        snapshot.upstream_connected
            && snapshot
                .nodes
                .iter()
                .any(|node| node.state != NodeState::Disconnected)
    );
}

#[tokio::test(start_paused = true)]
async fn readiness_inputs_change_with_the_upstream_and_nodes_never_with_tasks() {
    let h = Harness::new();
    let mut inputs = h.fleet.readiness_inputs();
    let mut changed = || {
        let changed = inputs.has_changed().unwrap();
        inputs.mark_unchanged();
        changed
    };
    h.fleet.set_upstream_connected(true);
    assert!(changed(), "upstream connected");
    let mut a = h.attach(hello("node-a"));
    assert!(changed(), "node attached");
    run_on(&h, &mut a, "run-1", "exec-1");
    h.fleet
        .on_outcome(&a.id, a.epoch, succeeded("run-1", "exec-1"));
    h.assign("run-2", "exec-2");
    assert!(!changed(), "task events leave readiness alone");
    h.fleet.detach(&a.id, a.epoch);
    assert!(changed(), "node detached");
    h.fleet.set_upstream_connected(false);
    assert!(changed(), "upstream lost");
}

#[tokio::test(start_paused = true)]
async fn readings_and_readiness_agree_with_the_snapshot() {
    let h = Harness::new();
    assert_readings_match_snapshot(&h.fleet);
    h.fleet.set_upstream_connected(true);
    assert!(!h.fleet.is_ready(), "no node yet");
    let mut a = h.attach(NodeHello {
        max_concurrent_tasks: 2,
        ..hello("node-a")
    });
    assert!(h.fleet.is_ready());
    run_on(&h, &mut a, "run-1", "exec-1");
    let b = h.attach(hello("node-b"));
    // Offered, not yet accepted: not active.
    h.assign("run-2", "exec-2");
    assert_readings_match_snapshot(&h.fleet);
    h.fleet.set_draining("node-b", true).unwrap();
    assert_readings_match_snapshot(&h.fleet);
    // node-a goes away holding run-1: still active (held for it), node-a disconnected.
    h.fleet.detach(&a.id, a.epoch);
    assert_readings_match_snapshot(&h.fleet);
    h.fleet.detach(&b.id, b.epoch);
    assert!(!h.fleet.is_ready(), "every node is away");
    assert_readings_match_snapshot(&h.fleet);
}
