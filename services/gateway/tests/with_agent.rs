//! The gateway's fleet and a real node agent session in one process, joined by an
//! in-process attach stream instead of gRPC: what Oz is told when a backend misbehaves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use ozfleet_agent::backend::{TaskBackend, TaskFailure, TaskRun};
use ozfleet_agent::node::{Inbound, Outbound};
use ozfleet_agent::{GatewayConnector, NodeConfig};
use ozfleet_gateway::fleet::FleetEvent;
use ozfleet_gateway::outbox::Outbox;
use ozfleet_gateway::{Fleet, FleetTimings, node_api};
use ozfleet_proto::oz::{self, ServerMessage, WorkerMessage};
use ozfleet_proto::v1::{BackendKind, UpstreamSettings};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const WORKER_ID: &str = "in-process";
const WAIT: Duration = Duration::from_secs(30);

/// Attaches the node straight to the fleet, as the gRPC endpoint would.
struct InProcess {
    fleet: Arc<Fleet>,
    streams: TaskTracker,
    stop: CancellationToken,
}

impl GatewayConnector for InProcess {
    fn attach(&self, outbound: Outbound) -> BoxFuture<'_, anyhow::Result<Inbound>> {
        Box::pin(async move {
            let inbound = node_api::open_attach(
                &self.fleet,
                &self.streams,
                self.stop.clone(),
                outbound.map(Ok),
            )
            .await?;
            Ok(inbound.boxed())
        })
    }
}

/// Panics on the tasks it is told to, succeeds on the others.
struct PanickyBackend {
    panic_on: Mutex<Vec<String>>,
}

impl TaskBackend for PanickyBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Direct
    }

    fn execute(
        &self,
        task: TaskRun,
        _cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<(), TaskFailure>> {
        let panics = self.panic_on.lock().unwrap().contains(&task.task_id);
        Box::pin(async move {
            if panics {
                panic!("backend bug while running {}", task.task_id);
            }
            Ok(())
        })
    }
}

fn assign(fleet: &Fleet, task_id: &str) {
    let frame = format!(
        r#"{{"type":"task_assignment","data":{{"task_id":"{task_id}","execution_id":"exec-{task_id}","task":{{"id":"{task_id}","title":"t"}}}}}}"#
    );
    let Ok(ServerMessage::TaskAssignment {
        assignment,
        raw_data,
    }) = oz::parse_server_message(&frame)
    else {
        panic!("test assignment must parse");
    };
    fleet.on_assignment(&assignment, raw_data.get().as_bytes());
}

async fn wait_for(
    events: &mut broadcast::Receiver<FleetEvent>,
    matches: impl Fn(&FleetEvent) -> bool,
) -> FleetEvent {
    loop {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("the event in time")
            .expect("event stream open");
        if matches(&event) {
            return event;
        }
    }
}

/// What was queued for Oz, each message taken as written.
fn upstream(outbox: &Outbox, fleet: &Fleet) -> Vec<WorkerMessage> {
    let mut sent = Vec::new();
    while let Some(queued) = outbox.front().now_or_never() {
        outbox.mark_sent(&queued);
        fleet.relayed(&queued);
        sent.push(queued.message);
    }
    sent
}

/// A real node agent session ("node-a", one slot) attached in process to a fleet, its
/// backend panicking on the tasks named in `panic_on`; cancel `stop` to end it.
struct Agent {
    stop: CancellationToken,
    _state: tempfile::TempDir,
}

fn start_agent(
    fleet: &Arc<Fleet>,
    panic_on: &[&str],
    running: &mut JoinSet<anyhow::Result<()>>,
) -> Agent {
    let stop = CancellationToken::new();
    let state = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        state_dir: state.path().to_path_buf(),
        node_name: "node-a".into(),
        labels: BTreeMap::new(),
        // One slot: a second task runs only if the first freed it.
        max_concurrent_tasks: 1,
        idle_on_complete: None,
        shutdown_grace: Duration::from_secs(1),
    };
    let backend = Arc::new(PanickyBackend {
        panic_on: Mutex::new(panic_on.iter().map(|task| task.to_string()).collect()),
    });
    let connector = Arc::new(InProcess {
        fleet: fleet.clone(),
        streams: TaskTracker::new(),
        stop: stop.clone(),
    });
    running.spawn(ozfleet_agent::run(config, backend, connector, stop.clone()));
    Agent {
        stop,
        _state: state,
    }
}

#[tokio::test]
async fn a_panicking_backend_yields_one_unknown_failure_upstream_and_frees_the_slot() {
    let outbox = Arc::new(Outbox::default());
    let settings = UpstreamSettings {
        worker_id: WORKER_ID.into(),
        ..Default::default()
    };
    let fleet = Fleet::new(outbox.clone(), settings, FleetTimings::default());
    let mut events = fleet.subscribe();
    let mut running = JoinSet::new();
    let agent = start_agent(&fleet, &["run-1"], &mut running);
    wait_for(&mut events, |event| {
        matches!(event, FleetEvent::NodeAttached { .. })
    })
    .await;

    assign(&fleet, "run-1");
    wait_for(
        &mut events,
        |event| matches!(event, FleetEvent::TaskFinished { task_id, .. } if task_id == "run-1"),
    )
    .await;
    let sent = upstream(&outbox, &fleet);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0], WorkerMessage::claimed("run-1", WORKER_ID));
    let WorkerMessage::TaskFailed(failed) = &sent[1] else {
        panic!("expected task_failed, got {:?}", sent[1]);
    };
    assert_eq!(failed.failure_reason, "unknown");
    assert!(
        !failed.message.contains("backend bug"),
        "no panic text upstream"
    );

    // The node acknowledges and reports nothing more for run-1, and its one slot is free.
    assign(&fleet, "run-2");
    wait_for(
        &mut events,
        |event| matches!(event, FleetEvent::TaskFinished { task_id, .. } if task_id == "run-2"),
    )
    .await;
    assert_eq!(
        upstream(&outbox, &fleet),
        vec![
            WorkerMessage::claimed("run-2", WORKER_ID),
            WorkerMessage::completed("run-2")
        ]
    );
    wait_for(
        &mut events,
        |event| matches!(event, FleetEvent::OutcomeRelayed { task_id, .. } if task_id == "run-2"),
    )
    .await;
    assert_eq!(fleet.snapshot().nodes[0].active_tasks, 0);

    agent.stop.cancel();
    running.join_next().await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn with_a_journal_nothing_leaves_the_gateway_before_its_entry_is_on_disk() {
    // The journal's writer is not running yet: nothing reaches the disk.
    let journal_dir = tempfile::tempdir().unwrap();
    let (journal, writer, recovered) =
        ozfleet_gateway::fleet::journal::Journal::open(journal_dir.path()).unwrap();
    let outbox = Arc::new(Outbox::default());
    outbox.write_ahead_of(journal.durability());
    let settings = UpstreamSettings {
        worker_id: WORKER_ID.into(),
        ..Default::default()
    };
    let fleet = Fleet::with_journal(
        outbox.clone(),
        settings,
        FleetTimings::default(),
        journal,
        recovered,
    );
    let mut events = fleet.subscribe();
    let mut running = JoinSet::new();
    let agent = start_agent(&fleet, &[], &mut running);
    // The welcome needs no journal entry: the node attaches.
    wait_for(&mut events, |event| {
        matches!(event, FleetEvent::NodeAttached { .. })
    })
    .await;

    assign(&fleet, "run-1");
    wait_for(
        &mut events,
        |event| matches!(event, FleetEvent::TaskOffered { task_id, .. } if task_id == "run-1"),
    )
    .await;
    // Offered in the fleet, but held: the node does not get it (no answer comes back) and
    // Oz hears nothing while the entry that gives run-1 to node-a is not on disk.
    let answered = tokio::time::timeout(Duration::from_millis(500), async {
        wait_for(&mut events, |event| {
            matches!(
                event,
                FleetEvent::TaskClaimed { .. } | FleetEvent::TaskRefused { .. }
            )
        })
        .await
    })
    .await;
    assert!(
        answered.is_err(),
        "the node answered an offer held for the journal: {answered:?}"
    );
    assert!(upstream(&outbox, &fleet).is_empty());

    // The writer runs: the offer leaves, the node runs the task, Oz hears claim and outcome.
    running.spawn_blocking(move || writer.run().map_err(anyhow::Error::from));
    wait_for(
        &mut events,
        |event| matches!(event, FleetEvent::TaskFinished { task_id, .. } if task_id == "run-1"),
    )
    .await;
    let sent = tokio::time::timeout(WAIT, async {
        let mut sent = Vec::new();
        while sent.len() < 2 {
            let queued = outbox.front().await;
            outbox.mark_sent(&queued);
            fleet.relayed(&queued);
            sent.push(queued.message);
        }
        sent
    })
    .await
    .expect("claim and outcome sent once on disk");
    assert_eq!(
        sent,
        vec![
            WorkerMessage::claimed("run-1", WORKER_ID),
            WorkerMessage::completed("run-1")
        ]
    );

    // Shut down: the agent stops, the journal closes, its writer ends.
    agent.stop.cancel();
    fleet.close_journal();
    while let Some(joined) = running.join_next().await {
        joined.unwrap().unwrap();
    }
}
