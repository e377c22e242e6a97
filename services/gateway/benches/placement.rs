//! Placement cost and per-node memory of the gateway's fleet state, from 10 to 10,000
//! attached nodes.
//!
//! `cargo bench -p ozfleet-gateway --bench placement` (add `-- --quick` for a short run).
//!
//! For each fleet size it times a full task cycle through the state machine (assignment
//! → offer to the best node → acceptance and claim → outcome → relayed and acknowledged)
//! and a bare pick from the placement index, and it counts the heap bytes the fleet state
//! holds per idle attached node (a counting allocator; HTTP/2 connection buffers are not
//! part of this: the dispatch benchmark measures whole connections). Flat per-task times
//! across sizes show placement does not scan the fleet.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use ozfleet_gateway::fleet::FleetEvent;
use ozfleet_gateway::fleet::placement::{PlacementIndex, Standing};
use ozfleet_gateway::outbox::Outbox;
use ozfleet_gateway::{Fleet, FleetTimings};
use ozfleet_proto::oz::{self, ServerMessage};
use ozfleet_proto::v1::{self, NodeHello, TaskOutcome, UpstreamSettings, task_outcome};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

type NodeInbox = tokio::sync::mpsc::Receiver<ozfleet_gateway::fleet::Outgoing>;

struct Bench {
    fleet: Arc<Fleet>,
    outbox: Arc<Outbox>,
    inboxes: HashMap<String, (u64, NodeInbox)>,
    events: tokio::sync::broadcast::Receiver<FleetEvent>,
}

fn hello(index: usize) -> NodeHello {
    NodeHello {
        node_id: format!("node-{index:05}"),
        node_name: format!("host-{index:05}"),
        backend: v1::BackendKind::Docker.into(),
        max_concurrent_tasks: 0,
        labels: [("zone".to_string(), "a".to_string())].into(),
        version: "bench".into(),
        instance_id: format!("instance-{index:05}"),
        ..Default::default()
    }
}

impl Bench {
    fn new() -> Self {
        let outbox = Arc::new(Outbox::default());
        let settings = UpstreamSettings {
            worker_id: "bench".into(),
            ..Default::default()
        };
        let timings = FleetTimings {
            offer_timeout: Duration::from_secs(3600),
            ..FleetTimings::default()
        };
        let fleet = Fleet::new(outbox.clone(), settings, timings);
        let events = fleet.subscribe();
        Self {
            fleet,
            outbox,
            inboxes: HashMap::new(),
            events,
        }
    }

    fn attach(&mut self, count: usize) {
        for index in self.inboxes.len()..self.inboxes.len() + count {
            let hello = hello(index);
            let (sender, mut inbox) =
                tokio::sync::mpsc::channel(ozfleet_gateway::fleet::NODE_QUEUE);
            let epoch = self.fleet.attach(&hello, sender).expect("attach");
            while inbox.try_recv().is_ok() {}
            self.inboxes.insert(hello.node_id, (epoch, inbox));
        }
        self.skip_events();
    }

    /// Drops the events seen so far, including a lag report of a long attach.
    fn skip_events(&mut self) {
        use tokio::sync::broadcast::error::TryRecvError;
        while !matches!(
            self.events.try_recv(),
            Err(TryRecvError::Empty | TryRecvError::Closed)
        ) {}
    }

    /// One task through the fleet; returns the node that ran it.
    fn cycle(&mut self, assignment: &oz::TaskAssignment, raw: &[u8]) {
        self.fleet.on_assignment(assignment, raw);
        let node_id = loop {
            match self.events.try_recv() {
                Ok(FleetEvent::TaskOffered { node_id, .. }) => break node_id,
                Ok(_) => continue,
                Err(error) => panic!("no offer: {error}"),
            }
        };
        let (epoch, inbox) = self.inboxes.get_mut(&*node_id).expect("known node");
        let epoch = *epoch;
        while inbox.try_recv().is_ok() {}
        let (task_id, execution_id) = (&assignment.task_id, &assignment.execution_id);
        self.fleet.on_accepted(
            &node_id,
            epoch,
            v1::AssignmentAccepted {
                task_id: task_id.clone(),
                execution_id: execution_id.clone(),
            },
        );
        self.fleet.on_outcome(
            &node_id,
            epoch,
            TaskOutcome {
                task_id: task_id.clone(),
                execution_id: execution_id.clone(),
                result: Some(task_outcome::Result::Succeeded(v1::TaskSucceeded {})),
            },
        );
        while let Some(queued) = self.outbox.front().now_or_never() {
            self.outbox.mark_sent(&queued);
            self.fleet.relayed(&queued);
        }
        if let Some((_, inbox)) = self.inboxes.get_mut(&*node_id) {
            while inbox.try_recv().is_ok() {}
        }
        self.skip_events();
    }
}

fn assignment(index: usize) -> (oz::TaskAssignment, Vec<u8>) {
    let frame = format!(
        r#"{{"type":"task_assignment","data":{{"task_id":"run-{index}","execution_id":"exec-{index}","task":{{"id":"run-{index}","title":"bench"}}}}}}"#
    );
    match oz::parse_server_message(&frame) {
        Ok(ServerMessage::TaskAssignment {
            assignment,
            raw_data,
        }) => (*assignment, raw_data.get().as_bytes().to_vec()),
        _ => panic!("bench assignment must parse"),
    }
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let cycles = if quick { 2_000 } else { 20_000 };
    let picks = if quick { 20_000 } else { 200_000 };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();

    println!(
        "{:>7}  {:>14}  {:>14}  {:>16}",
        "nodes", "task cycle", "index pick", "state per node"
    );
    for nodes in [10, 100, 1_000, 10_000] {
        let mut bench = Bench::new();
        let empty = LIVE_BYTES.load(Ordering::Relaxed);
        bench.attach(nodes);
        let attached = LIVE_BYTES.load(Ordering::Relaxed);
        // The bench's own inbox map and receivers are part of the count; subtract them by
        // measuring the same map without a fleet.
        let harness_only = {
            let start = LIVE_BYTES.load(Ordering::Relaxed);
            let mut map: HashMap<String, (u64, NodeInbox)> = HashMap::new();
            for index in 0..nodes {
                let (_sender, inbox) =
                    tokio::sync::mpsc::channel(ozfleet_gateway::fleet::NODE_QUEUE);
                map.insert(hello(index).node_id, (0, inbox));
            }
            let held = LIVE_BYTES.load(Ordering::Relaxed) - start;
            drop(map);
            held
        };
        let per_node = (attached - empty - harness_only) as f64 / nodes as f64;

        let tasks: Vec<_> = (0..cycles).map(assignment).collect();
        let started = Instant::now();
        for (assignment, raw) in &tasks {
            bench.cycle(assignment, raw);
        }
        let per_cycle = started.elapsed() / cycles as u32;

        let mut index = PlacementIndex::default();
        let ids: Vec<Arc<str>> = (0..nodes)
            .map(|i| Arc::from(format!("node-{i:05}").as_str()))
            .collect();
        for (seq, id) in ids.iter().enumerate() {
            let standing = Standing {
                load: (seq % 7) as u32,
                capacity: Some(16),
                last_placed: seq as u64,
            };
            index.update(id, seq as u64, standing);
        }
        let seq_of: HashMap<Arc<str>, u64> = ids
            .iter()
            .enumerate()
            .map(|(seq, id)| (id.clone(), seq as u64))
            .collect();
        let started = Instant::now();
        for round in 0..picks {
            let picked = index.pick(|_| true).expect("a node");
            // Move the picked node, as an offer does.
            let standing = Standing {
                load: 1 + (round % 5) as u32,
                capacity: Some(16),
                last_placed: (nodes + round) as u64,
            };
            index.update(&picked, seq_of[&picked], black_box(standing));
        }
        let per_pick = started.elapsed() / picks as u32;

        println!(
            "{nodes:>7}  {:>11.2} µs  {:>11.3} µs  {:>11.0} bytes",
            per_cycle.as_secs_f64() * 1e6,
            per_pick.as_secs_f64() * 1e6,
            per_node
        );
        drop(bench);
    }
}
