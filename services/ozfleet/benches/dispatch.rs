//! End-to-end dispatch benchmark: ozfleet's gateway against an "ideal relay".
//!
//! The benchmark plays Oz on a loopback WebSocket server, starts the system under test as
//! a child process (the release `ozfleet gateway`, or this binary re-executed as the ideal
//! relay: a WebSocket client plus a tonic server that only forwards an assignment to a
//! node stream and returns the claim), attaches N simulated nodes over the real node
//! protocol (each its own HTTP/2 connection; they accept every offer at once and report
//! success right after), offers tasks open-loop at a fixed rate and reports claim latency
//! (assignment sent → `task_claimed` received) and completion latency (→ `task_completed`)
//! p50/p99/p99.9/max, the achieved rate, the child's CPU and RSS (from /proc) idle, with N
//! nodes attached and after load, attach time, a max-rate search (highest rate with claim
//! p99 ≤ 5 ms) and a re-attach of every node after a gateway restart.
//!
//! ```sh
//! cargo bench -p ozfleet --bench dispatch            # the full matrix (see BENCHMARKS.md)
//! cargo bench -p ozfleet --bench dispatch -- --smoke # seconds (CI: `cargo test … -- --smoke`)
//! cargo bench -p ozfleet --bench dispatch -- --help
//! ```
//!
//! Load stays on 127.0.0.1; every loop is bounded in count and time. The benchmark
//! raises its own soft `RLIMIT_NOFILE` to the hard limit (10,000 nodes need ~20,000
//! descriptors here and ~10,000 in the child, which inherits the limit) and listens with a
//! backlog of 4,096.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use ozfleet_proto::oz::{self, ServerMessage, WorkerMessage};
use ozfleet_proto::reconnect::{AfterStable, Backoff, reconnect_loop};
use ozfleet_proto::v1::node_service_client::NodeServiceClient;
use ozfleet_proto::v1::node_service_server::{NodeService, NodeServiceServer};
use ozfleet_proto::v1::{
    self, AttachRequest, AttachResponse, BackendKind, NodeHello, attach_request, attach_response,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const WORKER_ID: &str = "bench-fleet";
const API_KEY: &str = "bench-api-key";
const JOIN_TOKEN: &str = "bench-join-token";
const BACKLOG: u32 = 4096;
/// The max-rate criterion.
const MAX_RATE_P99: Duration = Duration::from_millis(5);
/// Bounds on every wait.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

// ---- options ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Ozfleet,
    Ideal,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Ozfleet => "ozfleet",
            System::Ideal => "ideal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReattachPolicy {
    /// The node agent's: `ozfleet_agent::node` backoff plus its reattach spread.
    Agent,
    /// The agent's before the spread was added (backoff only), for comparison.
    Legacy,
}

#[derive(Debug, Clone)]
struct Options {
    systems: Vec<System>,
    nodes: Vec<usize>,
    rates: Vec<u64>,
    duration: Duration,
    runs: usize,
    max_rate_nodes: Vec<usize>,
    max_rate_step_duration: Duration,
    max_rate_limit: u64,
    reattach_nodes: Vec<usize>,
    reattach_policy: ReattachPolicy,
    gateway_bin: PathBuf,
    log_level: String,
    /// Run the gateway with a `--state-dir` (its write-ahead journal on the dispatch path).
    journal: bool,
    verbose: bool,
}

const HELP: &str = "\
dispatch benchmark: ozfleet gateway vs an ideal relay, on loopback

  --smoke                  a few seconds per system, small N, no targets (CI)
  --systems LIST           ozfleet,ideal (default both)
  --nodes LIST             node counts (default 10,1000,10000)
  --rates LIST             tasks/s per point (default 100,1000,5000)
  --duration SECS          seconds of load per point (default 10)
  --runs K                 repeat everything K times, report medians (default 3)
  --max-rate-nodes LIST    node counts to search the max rate at (default 1000,10000; none: -)
  --max-rate-step SECS     seconds per search step (default 4)
  --reattach-nodes LIST    node counts to restart the system under (default 10000; none: -)
  --reattach-policy P      agent (default) | legacy (backoff without the reattach spread)
  --gateway-bin PATH       the ozfleet binary (default: the one cargo built)
  --log-level LEVEL        the gateway's --log-level (default info; logs go to a file)
  --journal                give the gateway a --state-dir in the work dir (write-ahead journal)
  --verbose                print each point as it finishes";

fn parse_list<T: std::str::FromStr>(value: &str) -> Result<Vec<T>, String> {
    if value == "-" {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|item| {
            item.trim()
                .replace('_', "")
                .parse()
                .map_err(|_| format!("bad list item {item:?}"))
        })
        .collect()
}

impl Options {
    fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut options = Options {
            systems: vec![System::Ozfleet, System::Ideal],
            nodes: vec![10, 1000, 10_000],
            rates: vec![100, 1000, 5000],
            duration: Duration::from_secs(10),
            runs: 3,
            max_rate_nodes: vec![1000, 10_000],
            max_rate_step_duration: Duration::from_secs(4),
            max_rate_limit: 40_000,
            reattach_nodes: vec![10_000],
            reattach_policy: ReattachPolicy::Agent,
            gateway_bin: PathBuf::from(env!("CARGO_BIN_EXE_ozfleet")),
            log_level: "info".into(),
            journal: false,
            verbose: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("{arg} needs a value"))
            };
            match arg.as_str() {
                // cargo bench passes --bench to harness=false targets.
                "--bench" => {}
                "--help" | "-h" => return Ok(None),
                "--smoke" => {
                    options.nodes = vec![10, 200];
                    options.rates = vec![200];
                    options.duration = Duration::from_secs(2);
                    options.runs = 1;
                    options.max_rate_nodes = vec![200];
                    options.max_rate_step_duration = Duration::from_secs(1);
                    options.max_rate_limit = 1000;
                    options.reattach_nodes = vec![200];
                }
                "--systems" => {
                    options.systems = value()?
                        .split(',')
                        .map(|name| match name {
                            "ozfleet" => Ok(System::Ozfleet),
                            "ideal" => Ok(System::Ideal),
                            other => Err(format!("unknown system {other:?}")),
                        })
                        .collect::<Result<_, _>>()?
                }
                "--nodes" => options.nodes = parse_list(&value()?)?,
                "--rates" => options.rates = parse_list(&value()?)?,
                "--duration" => {
                    options.duration = Duration::from_secs_f64(
                        value()?.parse().map_err(|_| "bad --duration".to_string())?,
                    )
                }
                "--runs" => options.runs = value()?.parse().map_err(|_| "bad --runs")?,
                "--max-rate-nodes" => options.max_rate_nodes = parse_list(&value()?)?,
                "--max-rate-step" => {
                    options.max_rate_step_duration = Duration::from_secs_f64(
                        value()?
                            .parse()
                            .map_err(|_| "bad --max-rate-step".to_string())?,
                    )
                }
                "--reattach-nodes" => options.reattach_nodes = parse_list(&value()?)?,
                "--reattach-policy" => {
                    options.reattach_policy = match value()?.as_str() {
                        "agent" => ReattachPolicy::Agent,
                        "legacy" => ReattachPolicy::Legacy,
                        other => return Err(format!("unknown reattach policy {other:?}")),
                    }
                }
                "--gateway-bin" => options.gateway_bin = value()?.into(),
                "--log-level" => options.log_level = value()?,
                "--journal" => options.journal = true,
                "--verbose" => options.verbose = true,
                other => return Err(format!("unknown argument {other:?}\n\n{HELP}")),
            }
        }
        options.runs = options.runs.clamp(1, 20);
        Ok(Some(options))
    }
}

// ---- entry --------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--role-ideal-relay") {
        return ideal_relay_main(&args[1..]);
    }
    let options = match Options::parse(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let limit = raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!("# dispatch benchmark");
    println!(
        "machine: {} cores, {}, {} MB RAM; RLIMIT_NOFILE raised to {limit}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        mem_total_mb()
    );
    match runtime.block_on(bench(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("benchmark failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-files limit to the hard limit (children inherit it).
fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn mem_total_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("MemTotal:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// A listener on 127.0.0.1 with a backlog sized for thousands of connections.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// ---- /proc --------------------------------------------------------------------------

/// User + system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after_name) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields after the name start at field 3 (state); utime is 14, stime 15.
    let ticks: u64 = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / per_second
}

/// Resident set size of `pid`, in KB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}

// ---- results ------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Latencies {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Latencies {
    /// From nanoseconds; the result is in milliseconds.
    fn of(mut samples: Vec<u64>) -> Self {
        if samples.is_empty() {
            return Self {
                p50: f64::NAN,
                p99: f64::NAN,
                p999: f64::NAN,
                max: f64::NAN,
            };
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index] as f64 / 1e6
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: samples[samples.len() - 1] as f64 / 1e6,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Point {
    rate: u64,
    offered: u64,
    claimed: u64,
    completed: u64,
    rejected: u64,
    achieved: f64,
    claim: Latencies,
    completion: Latencies,
    cpu_percent: f64,
}

#[derive(Debug, Clone, Default)]
struct Reattach {
    seconds: f64,
    reattached: usize,
    refused_while_down: u64,
    refused_after_up: u64,
    other_errors: u64,
}

#[derive(Debug, Clone, Default)]
struct Session {
    system: Option<System>,
    nodes: usize,
    attach_seconds: f64,
    attach_errors: u64,
    rss_idle_kb: u64,
    rss_attached_kb: u64,
    rss_after_kb: u64,
    points: Vec<Point>,
    max_rate: Option<u64>,
    reattach: Option<Reattach>,
}

impl Session {
    fn per_node_kb(&self) -> f64 {
        if self.nodes == 0 {
            return 0.0;
        }
        (self.rss_attached_kb as f64 - self.rss_idle_kb as f64) / self.nodes as f64
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

// ---- the benchmark ------------------------------------------------------------------

async fn bench(options: Options) -> Result<(), String> {
    let workdir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let token_file = workdir.path().join("join-token");
    std::fs::write(&token_file, JOIN_TOKEN).map_err(|e| e.to_string())?;
    let mut sessions: Vec<Session> = Vec::new();
    let started = Instant::now();
    for run in 0..options.runs {
        for &nodes in &options.nodes {
            for &system in &options.systems {
                println!(
                    "run {}/{}: {} with {nodes} nodes ({:.0} s elapsed)",
                    run + 1,
                    options.runs,
                    system.name(),
                    started.elapsed().as_secs_f64()
                );
                let session = run_session(&options, system, nodes, workdir.path(), &token_file)
                    .await
                    .map_err(|error| format!("{} with {nodes} nodes: {error}", system.name()))?;
                if options.verbose {
                    println!("{session:#?}");
                }
                sessions.push(session);
            }
        }
    }
    report(&options, &sessions);
    println!(
        "\ntotal time {:.0} s; gateway logs were in {} (deleted)",
        started.elapsed().as_secs_f64(),
        workdir.path().display()
    );
    Ok(())
}

/// The system under test, a child process.
struct Child {
    process: tokio::process::Child,
    pid: u32,
}

impl Child {
    async fn start(
        options: &Options,
        system: System,
        node_port: u16,
        oz_url: &str,
        workdir: &Path,
        token_file: &Path,
        generation: usize,
    ) -> Result<Self, String> {
        let log =
            std::fs::File::create(workdir.join(format!("{}-{generation}.log", system.name())))
                .map_err(|e| e.to_string())?;
        let mut command = match system {
            System::Ozfleet => {
                let mut command = tokio::process::Command::new(&options.gateway_bin);
                command
                    .arg("gateway")
                    .args(["--api-key", API_KEY, "--worker-id", WORKER_ID])
                    .args(["--listen", &format!("127.0.0.1:{node_port}")])
                    .args(["--admin-listen", "127.0.0.1:0"])
                    .arg("--join-token-file")
                    .arg(token_file)
                    .args(["--web-socket-url", oz_url])
                    .args(["--server-root-url", "http://127.0.0.1:9"])
                    .args(["--log-level", &options.log_level])
                    .env_remove("RUST_LOG");
                if options.journal {
                    // The same dir across a restart: the journal is read back.
                    command
                        .arg("--state-dir")
                        .arg(workdir.join("gateway-state"));
                }
                command
            }
            System::Ideal => {
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let mut command = tokio::process::Command::new(exe);
                command
                    .arg("--role-ideal-relay")
                    .arg(oz_url)
                    .arg(format!("127.0.0.1:{node_port}"));
                command
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let process = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", system.name()))?;
        let pid = process.id().ok_or("the child exited at once")?;
        Ok(Self { process, pid })
    }

    async fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.kill().await;
        }
    }
}

async fn run_session(
    options: &Options,
    system: System,
    nodes: usize,
    workdir: &Path,
    token_file: &Path,
) -> Result<Session, String> {
    let mut oz = FakeOz::start().await?;
    let node_port = free_port().map_err(|e| e.to_string())?;
    let child = Child::start(options, system, node_port, &oz.url, workdir, token_file, 0).await?;
    let mut upstream = oz.next_connection(START_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut session = Session {
        system: Some(system),
        nodes,
        rss_idle_kb: rss_kb(child.pid),
        ..Session::default()
    };

    let fleet = SimFleet::new(
        format!("http://127.0.0.1:{node_port}"),
        options.reattach_policy,
    );
    let attach_started = Instant::now();
    let mut fleet = fleet;
    fleet.spawn(nodes);
    if !fleet.wait_welcomes(nodes as u64, ATTACH_TIMEOUT).await {
        return Err(format!(
            "only {} of {nodes} nodes attached within {ATTACH_TIMEOUT:?}",
            fleet.stats.attached.load(Ordering::Relaxed)
        ));
    }
    session.attach_seconds = attach_started.elapsed().as_secs_f64();
    session.attach_errors = fleet.stats.refused.load(Ordering::Relaxed)
        + fleet.stats.other_errors.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    session.rss_attached_kb = rss_kb(child.pid);

    for &rate in &options.rates {
        let point = upstream.load(rate, options.duration, child.pid).await?;
        if options.verbose {
            println!("  {point:?}");
        }
        session.points.push(point);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if options.max_rate_nodes.contains(&nodes) {
        session.max_rate = Some(max_rate_search(options, &mut upstream, child.pid).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    session.rss_after_kb = rss_kb(child.pid);

    let mut child = child;
    if options.reattach_nodes.contains(&nodes) {
        let before = fleet.stats.welcomes.load(Ordering::Relaxed);
        let refused_before = fleet.stats.refused.load(Ordering::Relaxed);
        let errors_before = fleet.stats.other_errors.load(Ordering::Relaxed);
        child.stop().await;
        drop(upstream);
        let restarted = Instant::now();
        child = Child::start(options, system, node_port, &oz.url, workdir, token_file, 1).await?;
        let _upstream = oz.next_connection(START_TIMEOUT).await?;
        let refused_while_down = fleet.stats.refused.load(Ordering::Relaxed) - refused_before;
        let done = fleet
            .wait_welcomes(before + nodes as u64, ATTACH_TIMEOUT)
            .await;
        let seconds = restarted.elapsed().as_secs_f64();
        let reattached = (fleet.stats.welcomes.load(Ordering::Relaxed) - before) as usize;
        if !done {
            println!("  re-attach incomplete: {reattached} of {nodes}");
        }
        let refused = fleet.stats.refused.load(Ordering::Relaxed) - refused_before;
        session.reattach = Some(Reattach {
            seconds,
            reattached: reattached.min(nodes),
            refused_while_down,
            refused_after_up: refused - refused_while_down,
            other_errors: fleet.stats.other_errors.load(Ordering::Relaxed) - errors_before,
        });
    }
    fleet.stop().await;
    child.stop().await;
    oz.stop().await;
    Ok(session)
}

async fn max_rate_search(
    options: &Options,
    upstream: &mut Upstream,
    pid: u32,
) -> Result<u64, String> {
    let passes = |point: &Point| {
        point.claim.p99 <= MAX_RATE_P99.as_secs_f64() * 1e3
            && point.claimed == point.offered
            && point.rejected == 0
            && point.achieved >= 0.95 * point.rate as f64
    };
    // Double from 1,000 until a rate fails, then bisect three times: at most ~9 steps.
    let mut best = 0;
    let mut rate = 1000.min(options.max_rate_limit);
    let mut failed = None;
    while rate <= options.max_rate_limit {
        let point = upstream
            .load(rate, options.max_rate_step_duration, pid)
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if options.verbose {
            println!("  search {rate}/s: p99 {:.2} ms", point.claim.p99);
        }
        if passes(&point) {
            best = rate;
            rate *= 2;
        } else {
            failed = Some(rate);
            break;
        }
    }
    if let Some(mut high) = failed {
        let mut low = best;
        for _ in 0..3 {
            let middle = (low + high) / 2;
            if middle <= low || middle >= high {
                break;
            }
            let point = upstream
                .load(middle, options.max_rate_step_duration, pid)
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if options.verbose {
                println!("  search {middle}/s: p99 {:.2} ms", point.claim.p99);
            }
            if passes(&point) {
                low = middle;
            } else {
                high = middle;
            }
        }
        best = low;
    }
    Ok(best)
}

// ---- fake Oz ------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

struct FakeOz {
    url: String,
    connections: mpsc::UnboundedReceiver<Ws>,
    tasks: JoinSet<()>,
}

impl FakeOz {
    async fn start() -> Result<Self, String> {
        let listener = listen("127.0.0.1:0".parse().expect("an address"))
            .map_err(|e| format!("cannot listen for the fake Oz: {e}"))?;
        let address = listener.local_addr().map_err(|e| e.to_string())?;
        let (sender, connections) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let handshakes = TaskTracker::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let sender = sender.clone();
                handshakes.spawn(async move {
                    if let Ok(socket) = tokio_tungstenite::accept_async(tcp).await {
                        let _ = sender.send(socket);
                    }
                });
            }
        });
        Ok(Self {
            url: format!("ws://{address}{}", oz::WORKER_WEB_SOCKET_PATH),
            connections,
            tasks,
        })
    }

    async fn next_connection(&mut self, timeout: Duration) -> Result<Upstream, String> {
        let socket = tokio::time::timeout(timeout, self.connections.recv())
            .await
            .map_err(|_| "the system under test did not connect to the fake Oz in time")?
            .ok_or("the fake Oz stopped")?;
        Ok(Upstream::new(socket))
    }

    async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

#[derive(Debug, Clone, Copy)]
enum Reply {
    Claimed,
    Completed,
    Rejected,
    Failed,
}

/// One connection from the system under test, seen from Oz: a writer (the sink) and a
/// reader task that timestamps every reply and answers pings.
struct Upstream {
    sink: Option<SplitSink<Ws, Message>>,
    replies: mpsc::UnboundedReceiver<(u64, Reply, Instant)>,
    next_task: u64,
    /// Owns the reader task; dropping the connection aborts it.
    _reader: JoinSet<()>,
}

impl Upstream {
    fn new(socket: Ws) -> Self {
        let (sink, stream) = socket.split();
        let (sender, replies) = mpsc::unbounded_channel();
        let mut reader = JoinSet::new();
        reader.spawn(read_replies(stream, sender));
        Self {
            sink: Some(sink),
            replies,
            next_task: 0,
            _reader: reader,
        }
    }

    /// Offers `rate` tasks a second for `duration`, open loop, and measures the replies.
    async fn load(&mut self, rate: u64, duration: Duration, pid: u32) -> Result<Point, String> {
        let total = ((rate as f64 * duration.as_secs_f64()).round() as u64).max(1);
        let first = self.next_task;
        self.next_task += total;
        // Replies to earlier points that arrived late are dropped.
        while self.replies.try_recv().is_ok() {}
        let sent_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        let origin = Instant::now();
        let cpu_before = cpu_seconds(pid);
        let mut sink = self.sink.take().ok_or("the upstream writer was lost")?;
        let mut writer = JoinSet::new();
        writer.spawn({
            let sent_at = sent_at.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut sent = 0u64;
                let end = origin + duration + Duration::from_secs(5);
                while sent < total && Instant::now() < end {
                    tick.tick().await;
                    let due =
                        ((origin.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
                    while sent < due {
                        let task = first + sent;
                        sent_at[sent as usize]
                            .store(origin.elapsed().as_nanos() as u64, Ordering::Release);
                        if sink
                            .feed(Message::text(assignment_frame(task)))
                            .await
                            .is_err()
                        {
                            return (sink, sent);
                        }
                        sent += 1;
                    }
                    if sink.flush().await.is_err() {
                        return (sink, sent);
                    }
                }
                (sink, sent)
            }
        });

        let mut claims = Vec::with_capacity(total as usize);
        let mut completions = Vec::with_capacity(total as usize);
        let mut rejected = 0;
        let mut last_claim = origin;
        let deadline = origin + duration + DRAIN_TIMEOUT;
        let mut offered = None;
        while (completions.len() as u64) < total {
            let reply = tokio::select! {
                reply = self.replies.recv() => reply,
                done = writer.join_next(), if offered.is_none() => {
                    let (sink, sent) = done.ok_or("no writer")?.map_err(|e| e.to_string())?;
                    self.sink = Some(sink);
                    offered = Some(sent);
                    continue;
                }
                () = tokio::time::sleep_until(deadline.into()) => break,
            };
            let Some((task, kind, at)) = reply else {
                return Err("the upstream connection closed".into());
            };
            if task < first || task >= first + total {
                continue;
            }
            let sent = sent_at[(task - first) as usize].load(Ordering::Acquire);
            let latency = (at.duration_since(origin).as_nanos() as u64).saturating_sub(sent);
            match kind {
                Reply::Claimed => {
                    claims.push(latency);
                    last_claim = at;
                }
                Reply::Completed | Reply::Failed => completions.push(latency),
                Reply::Rejected => rejected += 1,
            }
        }
        if offered.is_none() {
            let (sink, sent) = writer
                .join_next()
                .await
                .ok_or("no writer")?
                .map_err(|e| e.to_string())?;
            self.sink = Some(sink);
            offered = Some(sent);
        }
        let elapsed = last_claim.duration_since(origin).as_secs_f64().max(1e-3);
        let cpu = cpu_seconds(pid) - cpu_before;
        Ok(Point {
            rate,
            offered: offered.unwrap_or(0),
            claimed: claims.len() as u64,
            completed: completions.len() as u64,
            rejected,
            achieved: claims.len() as f64 / elapsed,
            claim: Latencies::of(claims),
            completion: Latencies::of(completions),
            cpu_percent: 100.0 * cpu / origin.elapsed().as_secs_f64(),
        })
    }
}

fn assignment_frame(task: u64) -> String {
    format!(
        r#"{{"type":"task_assignment","data":{{"task_id":"b{task}","execution_id":"e{task}","task":{{"id":"b{task}","title":"benchmark task {task}","agent_config_snapshot":{{"model_id":"m-1"}}}},"env_vars":{{"WARP_API_KEY":"bench-secret-{task}"}},"docker_image":"busybox:1"}}}}"#
    )
}

async fn read_replies(
    mut stream: SplitStream<Ws>,
    replies: mpsc::UnboundedSender<(u64, Reply, Instant)>,
) {
    while let Some(Ok(frame)) = stream.next().await {
        let Message::Text(text) = frame else {
            continue;
        };
        let at = Instant::now();
        let Ok(message) = oz::parse_worker_message(text.as_str()) else {
            continue;
        };
        let kind = match &message {
            WorkerMessage::TaskClaimed(_) => Reply::Claimed,
            WorkerMessage::TaskCompleted(_) => Reply::Completed,
            WorkerMessage::TaskRejected(_) => Reply::Rejected,
            WorkerMessage::TaskFailed(_) => Reply::Failed,
        };
        let Some(task) = message
            .task_id()
            .strip_prefix('b')
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        if replies.send((task, kind, at)).is_err() {
            return;
        }
    }
}

// ---- simulated nodes ----------------------------------------------------------------

#[derive(Default)]
struct NodeStats {
    attached: AtomicUsize,
    welcomes: AtomicU64,
    refused: AtomicU64,
    other_errors: AtomicU64,
}

struct SimFleet {
    url: String,
    policy: ReattachPolicy,
    stats: Arc<NodeStats>,
    stop: CancellationToken,
    nodes: JoinSet<()>,
}

impl SimFleet {
    fn new(url: String, policy: ReattachPolicy) -> Self {
        Self {
            url,
            policy,
            stats: Arc::default(),
            stop: CancellationToken::new(),
            nodes: JoinSet::new(),
        }
    }

    fn spawn(&mut self, count: usize) {
        for index in 0..count {
            self.nodes.spawn(sim_node(
                format!("bench-node-{index:05}"),
                self.url.clone(),
                self.policy,
                self.stats.clone(),
                self.stop.clone(),
            ));
        }
    }

    async fn wait_welcomes(&self, count: u64, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.stats.welcomes.load(Ordering::Relaxed) >= count {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(10), async {
            while self.nodes.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            self.nodes.abort_all();
        }
    }
}

/// A node that accepts every offer at once and reports success right after; it
/// reconnects like the node agent (`ozfleet_agent::node`).
async fn sim_node(
    node_id: String,
    url: String,
    policy: ReattachPolicy,
    stats: Arc<NodeStats>,
    stop: CancellationToken,
) {
    let endpoint = match tonic::transport::Endpoint::from_shared(url) {
        Ok(endpoint) => endpoint
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true),
        Err(_) => return,
    };
    let hello = NodeHello {
        node_id: node_id.clone(),
        node_name: node_id.clone(),
        backend: BackendKind::Direct as i32,
        max_concurrent_tasks: 0,
        labels: Default::default(),
        version: "bench".into(),
        running_tasks: Vec::new(),
        unacknowledged_outcomes: Vec::new(),
        instance_id: format!("instance-{node_id}"),
    };
    reconnect_loop(
        Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
        ozfleet_agent::node::STABLE_CONNECTION,
        AfterStable::AfterInitialDelay,
        &stop,
        || async {
            let connected_at = tokio::select! {
                at = node_session(&endpoint, &hello, &stats) => at,
                () = stop.cancelled() => None,
            };
            let stable = connected_at.is_some_and(|at: tokio::time::Instant| {
                at.elapsed() >= ozfleet_agent::node::STABLE_CONNECTION
            });
            if stable && policy == ReattachPolicy::Agent && !stop.is_cancelled() {
                tokio::select! {
                    () = tokio::time::sleep(ozfleet_agent::node::reattach_spread()) => {}
                    () = stop.cancelled() => {}
                }
            }
            connected_at
        },
    )
    .await;
}

async fn node_session(
    endpoint: &tonic::transport::Endpoint,
    hello: &NodeHello,
    stats: &NodeStats,
) -> Option<tokio::time::Instant> {
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(error) => {
            let text = format!("{error:?}");
            if text.contains("ConnectionRefused") || text.contains("Connection refused") {
                stats.refused.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.other_errors.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
    };
    let (sender, receiver) = mpsc::unbounded_channel();
    let _ = sender.send(AttachRequest {
        kind: Some(attach_request::Kind::Hello(hello.clone())),
    });
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(receiver));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {JOIN_TOKEN}").parse().expect("ASCII"),
    );
    let mut responses = match NodeServiceClient::new(channel).attach(request).await {
        Ok(response) => response.into_inner(),
        Err(_) => {
            stats.other_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let mut connected_at = None;
    while let Ok(Some(response)) = responses.message().await {
        match response.kind {
            Some(attach_response::Kind::Welcome(_)) => {
                connected_at = Some(tokio::time::Instant::now());
                stats.attached.fetch_add(1, Ordering::Relaxed);
                stats.welcomes.fetch_add(1, Ordering::Relaxed);
            }
            Some(attach_response::Kind::Assignment(assignment)) => {
                let _ = sender.send(AttachRequest {
                    kind: Some(attach_request::Kind::Accepted(v1::AssignmentAccepted {
                        task_id: assignment.task_id.clone(),
                        execution_id: assignment.execution_id.clone(),
                    })),
                });
                let _ = sender.send(AttachRequest {
                    kind: Some(attach_request::Kind::Outcome(v1::TaskOutcome {
                        task_id: assignment.task_id,
                        execution_id: assignment.execution_id,
                        result: Some(v1::task_outcome::Result::Succeeded(v1::TaskSucceeded {})),
                    })),
                });
            }
            Some(attach_response::Kind::Cancellation(cancellation)) => {
                let _ = sender.send(AttachRequest {
                    kind: Some(attach_request::Kind::Outcome(v1::TaskOutcome {
                        task_id: cancellation.task_id,
                        execution_id: cancellation.execution_id,
                        result: Some(v1::task_outcome::Result::Cancelled(v1::TaskCancelled {})),
                    })),
                });
            }
            Some(attach_response::Kind::OutcomeAck(_)) | None => {}
        }
    }
    if connected_at.is_some() {
        stats.attached.fetch_sub(1, Ordering::Relaxed);
    }
    connected_at
}

// ---- report -------------------------------------------------------------------------

fn report(options: &Options, sessions: &[Session]) {
    let of = |system: System, nodes: usize| -> Vec<&Session> {
        sessions
            .iter()
            .filter(|s| s.system == Some(system) && s.nodes == nodes)
            .collect()
    };
    let point_median = |list: &[&Session], index: usize, f: &dyn Fn(&Point) -> f64| {
        median(
            list.iter()
                .filter_map(|s| s.points.get(index))
                .map(f)
                .collect(),
        )
    };
    println!(
        "\n## Claim and completion latency (ms, median of {} run(s))\n",
        options.runs
    );
    println!(
        "| nodes | rate/s | system | claim p50 | p99 | p99.9 | max | completion p50 | p99 | p99.9 | max | achieved/s | lost | CPU % | p50 ratio | p99 ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &nodes in &options.nodes {
        for (index, &rate) in options.rates.iter().enumerate() {
            let ideal = of(System::Ideal, nodes);
            let ideal_p50 = point_median(&ideal, index, &|p| p.claim.p50);
            let ideal_p99 = point_median(&ideal, index, &|p| p.claim.p99);
            for &system in &options.systems {
                let list = of(system, nodes);
                if list.is_empty() {
                    continue;
                }
                let m = |f: &dyn Fn(&Point) -> f64| point_median(&list, index, f);
                let (p50, p99) = (m(&|p| p.claim.p50), m(&|p| p.claim.p99));
                let ratio = |a: f64, b: f64| {
                    if system == System::Ideal || b.is_nan() {
                        "".to_string()
                    } else {
                        format!("{:.2}×", a / b)
                    }
                };
                println!(
                    "| {nodes} | {rate} | {} | {p50:.2} | {p99:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} |",
                    system.name(),
                    m(&|p| p.claim.p999),
                    m(&|p| p.claim.max),
                    m(&|p| p.completion.p50),
                    m(&|p| p.completion.p99),
                    m(&|p| p.completion.p999),
                    m(&|p| p.completion.max),
                    m(&|p| p.achieved),
                    m(&|p| (p.offered - p.claimed.min(p.completed).min(p.offered)) as f64),
                    m(&|p| p.cpu_percent),
                    ratio(p50, ideal_p50),
                    ratio(p99, ideal_p99),
                );
            }
        }
    }

    println!(
        "\n## Attach, memory and max rate (median of {} run(s))\n",
        options.runs
    );
    println!(
        "| nodes | system | attach s | attach errors | RSS idle MB | RSS attached MB | KB/node | RSS after load MB | after/attached | max rate/s (p99 ≤ 5 ms) | max-rate ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &nodes in &options.nodes {
        let ideal_max = median(
            of(System::Ideal, nodes)
                .iter()
                .filter_map(|s| s.max_rate.map(|r| r as f64))
                .collect(),
        );
        for &system in &options.systems {
            let list = of(system, nodes);
            if list.is_empty() {
                continue;
            }
            let m = |f: &dyn Fn(&Session) -> f64| median(list.iter().map(|s| f(s)).collect());
            let max_rate = median(
                list.iter()
                    .filter_map(|s| s.max_rate.map(|r| r as f64))
                    .collect(),
            );
            println!(
                "| {nodes} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} |",
                system.name(),
                m(&|s| s.attach_seconds),
                m(&|s| s.attach_errors as f64),
                m(&|s| s.rss_idle_kb as f64 / 1024.0),
                m(&|s| s.rss_attached_kb as f64 / 1024.0),
                m(&|s| s.per_node_kb()),
                m(&|s| s.rss_after_kb as f64 / 1024.0),
                m(&|s| s.rss_after_kb as f64 / s.rss_attached_kb.max(1) as f64),
                if max_rate.is_nan() {
                    "–".to_string()
                } else {
                    format!("{max_rate:.0}")
                },
                if max_rate.is_nan() || ideal_max.is_nan() || system == System::Ideal {
                    String::new()
                } else {
                    format!("{:.2}×", max_rate / ideal_max)
                },
            );
        }
    }

    let restarts: Vec<&Session> = sessions.iter().filter(|s| s.reattach.is_some()).collect();
    if !restarts.is_empty() {
        println!(
            "\n## Re-attach after a restart of the system under test ({:?} reconnect policy)\n",
            options.reattach_policy
        );
        println!(
            "| nodes | system | run | re-attached | seconds | refused while down | refused after up | other errors |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let mut runs: HashMap<(usize, &str), usize> = HashMap::new();
        for session in restarts {
            let Some(reattach) = &session.reattach else {
                continue;
            };
            let system = session.system.map_or("?", System::name);
            let run = runs.entry((session.nodes, system)).or_default();
            *run += 1;
            println!(
                "| {} | {system} | {run} | {} | {:.2} | {} | {} | {} |",
                session.nodes,
                reattach.reattached,
                reattach.seconds,
                reattach.refused_while_down,
                reattach.refused_after_up,
                reattach.other_errors
            );
        }
    }
}

// ---- the ideal relay ----------------------------------------------------------------

/// `--role-ideal-relay OZ_URL LISTEN`: a WebSocket client and a tonic server that forward
/// each assignment to the next node (round robin) and each acceptance/outcome back to Oz.
/// No registry, no ledger, no placement policy, no logs: the floor ozfleet is measured
/// against. It does use TCP_NODELAY and batched upstream writes, as any relay should.
fn ideal_relay_main(args: &[String]) -> ExitCode {
    let (Some(oz_url), Some(listen_at)) = (args.first(), args.get(1)) else {
        eprintln!("usage: --role-ideal-relay OZ_URL LISTEN");
        return ExitCode::FAILURE;
    };
    let Ok(listen_at) = listen_at.parse::<SocketAddr>() else {
        eprintln!("bad listen address");
        return ExitCode::FAILURE;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(ideal_relay(oz_url.clone(), listen_at)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ideal relay: {error}");
            ExitCode::FAILURE
        }
    }
}

type NodeSender = mpsc::UnboundedSender<Result<AttachResponse, tonic::Status>>;

#[derive(Default)]
struct Nodes {
    slots: Vec<Option<NodeSender>>,
    next: usize,
}

#[derive(Clone)]
struct IdealRelay {
    nodes: Arc<Mutex<Nodes>>,
    upstream: mpsc::UnboundedSender<String>,
    readers: TaskTracker,
    epoch: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl NodeService for IdealRelay {
    type AttachStream = UnboundedReceiverStream<Result<AttachResponse, tonic::Status>>;

    async fn attach(
        &self,
        request: tonic::Request<tonic::Streaming<AttachRequest>>,
    ) -> Result<tonic::Response<Self::AttachStream>, tonic::Status> {
        let authorized = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            == Some(&format!("Bearer {JOIN_TOKEN}"));
        if !authorized {
            return Err(tonic::Status::unauthenticated("bad join token"));
        }
        let mut inbound = request.into_inner();
        let Ok(Some(AttachRequest {
            kind: Some(attach_request::Kind::Hello(_)),
        })) = inbound.message().await
        else {
            return Err(tonic::Status::invalid_argument("hello first"));
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = sender.send(Ok(AttachResponse {
            kind: Some(attach_response::Kind::Welcome(v1::Welcome {
                epoch,
                worker_id: WORKER_ID.into(),
                version: "ideal".into(),
            })),
        }));
        let slot = {
            let mut nodes = self.nodes.lock().expect("nodes lock");
            nodes.slots.push(Some(sender.clone()));
            nodes.slots.len() - 1
        };
        let relay = self.clone();
        self.readers.spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                match message.kind {
                    Some(attach_request::Kind::Accepted(accepted)) => {
                        let _ = relay
                            .upstream
                            .send(WorkerMessage::claimed(&accepted.task_id, WORKER_ID).to_frame());
                    }
                    Some(attach_request::Kind::Refused(refused)) => {
                        let _ = relay
                            .upstream
                            .send(WorkerMessage::rejected_at_capacity(&refused.task_id).to_frame());
                    }
                    Some(attach_request::Kind::Outcome(outcome)) => {
                        let _ = relay
                            .upstream
                            .send(WorkerMessage::completed(&outcome.task_id).to_frame());
                        let _ = sender.send(Ok(AttachResponse {
                            kind: Some(attach_response::Kind::OutcomeAck(v1::OutcomeAck {
                                task_id: outcome.task_id,
                                execution_id: outcome.execution_id,
                            })),
                        }));
                    }
                    _ => {}
                }
            }
            relay.nodes.lock().expect("nodes lock").slots[slot] = None;
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(receiver)))
    }
}

async fn ideal_relay(oz_url: String, listen_at: SocketAddr) -> Result<(), String> {
    let listener = listen(listen_at).map_err(|e| format!("listen: {e}"))?;
    let (upstream, mut outgoing) = mpsc::unbounded_channel::<String>();
    let relay = IdealRelay {
        nodes: Arc::default(),
        upstream,
        readers: TaskTracker::new(),
        epoch: Arc::default(),
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    let mut tasks = JoinSet::new();
    let server = tonic::transport::Server::builder()
        .add_service(NodeServiceServer::new(relay.clone()))
        .serve_with_incoming(incoming);
    tasks.spawn(async move { server.await.map_err(|e| e.to_string()) });

    let address = oz_url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or("the Oz URL must be ws://host:port/...")?
        .to_owned();
    let tcp = TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connect to Oz: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (socket, _) =
        tokio_tungstenite::client_async(format!("{oz_url}?worker_id={WORKER_ID}"), tcp)
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
    let (mut sink, mut stream) = socket.split();
    tasks.spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if sink.feed(Message::text(frame)).await.is_err() {
                return Err("write to Oz failed".into());
            }
            while let Ok(frame) = outgoing.try_recv() {
                if sink.feed(Message::text(frame)).await.is_err() {
                    return Err("write to Oz failed".into());
                }
            }
            if sink.flush().await.is_err() {
                return Err("write to Oz failed".into());
            }
        }
        Ok(())
    });
    while let Some(Ok(frame)) = stream.next().await {
        let Message::Text(text) = frame else {
            continue;
        };
        let Ok(ServerMessage::TaskAssignment {
            assignment,
            raw_data,
        }) = oz::parse_server_message(text.as_str())
        else {
            continue;
        };
        let message = AttachResponse {
            kind: Some(attach_response::Kind::Assignment(v1::TaskAssignment {
                task_id: assignment.task_id.clone(),
                execution_id: assignment.execution_id.clone(),
                oz_assignment_json: raw_data.get().as_bytes().to_vec(),
                settings: None,
                trace_context: Default::default(),
            })),
        };
        let mut nodes = relay.nodes.lock().expect("nodes lock");
        let count = nodes.slots.len();
        let mut placed = false;
        for _ in 0..count {
            let index = nodes.next % count;
            nodes.next = nodes.next.wrapping_add(1);
            if let Some(node) = &nodes.slots[index]
                && node.send(Ok(message.clone())).is_ok()
            {
                placed = true;
                break;
            }
        }
        drop(nodes);
        if !placed {
            let _ = relay
                .upstream
                .send(WorkerMessage::rejected_at_capacity(&assignment.task_id).to_frame());
        }
    }
    Ok(())
}
