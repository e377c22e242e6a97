//! `ozfleet dev`: the whole path on loopback in one process (local control plane →
//! gateway → Direct node agent running the demo agent), with three demo runs that show
//! success, failure and cancellation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ozfleet_agent::backend::{
    DirectBackend, DirectConfig, DirectSettings, DockerBackend, DockerConfig, DockerSettings,
    ImagePullPolicy, KubernetesBackend, KubernetesConfig, TaskBackend,
};
use ozfleet_agent::identity::load_or_create_node_id;
use ozfleet_agent::{GrpcConnector, NodeConfig};
use ozfleet_control_plane::client::{ClientError, RunClient};
use ozfleet_control_plane::run_api::{RunItem, RunRequest, RunState};
use ozfleet_control_plane::{ControlPlaneConfig, TaskImages};
use ozfleet_gateway::{
    FleetTimings, GatewayConfig, GatewayListeners, JoinToken, Keepalive, ProxyEnv, UpstreamConfig,
};
use ozfleet_proto::oz::WORKER_WEB_SOCKET_PATH;
use ozfleet_proto::v1::UpstreamSettings;
use ozfleet_telemetry::Telemetry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::{DevArgs, DevBackend};
use crate::runtime::shutdown_on_signal;

const API_KEY: &str = "ozfleet-dev-key";
const WORKER_ID: &str = "ozfleet-dev";
const DEMO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a cancelled run's pod may take to stop: the deletion grace is 5 s, but the
/// 1.20 kubelet can leave a pod deleted while it was starting for up to ~75 s.
const K8S_POD_STOP_TIMEOUT: Duration = Duration::from_secs(120);

struct Stack {
    control_plane: Part,
    gateway: Part,
    agent: Part,
    /// Where the control plane serves (`--listen`, its port resolved when it was 0).
    control_plane_address: SocketAddr,
    /// Where the gateway serves the admin API.
    admin_address: SocketAddr,
}

/// One part of the stack, running as its own task until it is stopped. The task is owned:
/// when `dev` returns early (a part failed to start), dropping the parts aborts them.
struct Part {
    stop: CancellationToken,
    task: JoinSet<anyhow::Result<()>>,
}

impl Part {
    fn spawn<F>(start: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let mut task = JoinSet::new();
        task.spawn(start(stop.clone()));
        Self { stop, task }
    }

    async fn stop(mut self, name: &str) {
        self.stop.cancel();
        match self.task.join_next().await {
            Some(Ok(Ok(()))) | None => {}
            Some(Ok(Err(error))) => eprintln!("{name} stopped with an error: {error:#}"),
            Some(Err(error)) => eprintln!("{name} task failed: {error}"),
        }
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_on_signal();
    let workdir = tempfile::Builder::new()
        .prefix("ozfleet-dev-")
        .tempdir()
        .context("cannot create a working directory")?;
    let demo_agent = install_demo_agent(workdir.path())?;
    let stack = start(&args, workdir.path(), &demo_agent).await?;
    let base_url = format!("http://{}", stack.control_plane_address);
    let api = Api::new(&base_url);

    println!("ozfleet dev stack is up:");
    println!("  control plane  {base_url}  (API key: {API_KEY})");
    println!(
        "  gateway        worker id {WORKER_ID:?}, one outbound WebSocket to the control plane"
    );
    match args.backend {
        DevBackend::Direct => println!(
            "  node agent     Direct backend, oz_path = {}",
            demo_agent.display()
        ),
        DevBackend::Docker => println!(
            "  node agent     Docker backend, image {}, sidecar {} at /agent",
            args.docker_image, args.sidecar_image
        ),
        DevBackend::Kubernetes => println!(
            "  node agent     Kubernetes backend, Jobs in namespace {:?}, image {}, sidecar {K8S_DEV_SIDECAR} at /agent",
            k8s_dev_dir().1,
            args.docker_image
        ),
    }
    println!(
        "  admin API      {}  (ozfleet nodes --admin {0})",
        stack.admin_address
    );
    println!("  working dir    {}", workdir.path().display());
    println!();

    let demos = tokio::select! {
        result = run_demos(&api, args.backend) => result,
        () = shutdown.cancelled() => Ok(false),
    };

    if demos.is_ok() && !args.exit_after_demo && !shutdown.is_cancelled() {
        print_examples(&base_url, stack.admin_address);
        shutdown.cancelled().await;
    }
    println!("Shutting down…");
    stack.agent.stop("node agent").await;
    stack.gateway.stop("gateway").await;
    stack.control_plane.stop("control plane").await;
    // Reported only now: the working dir goes when this returns, after the stack stopped.
    Ok(if demos? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The demo agent is this very binary under another name: link it into the working dir.
fn install_demo_agent(workdir: &Path) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the ozfleet executable")?;
    let path = workdir.join(crate::demo_agent::PROGRAM_NAME);
    std::os::unix::fs::symlink(&exe, &path)
        .with_context(|| format!("cannot link {} to {}", path.display(), exe.display()))?;
    Ok(path)
}

async fn start(args: &DevArgs, workdir: &Path, demo_agent: &Path) -> anyhow::Result<Stack> {
    let http_listener = crate::runtime::listen(args.listen).with_context(|| {
        format!(
            "cannot listen on {} (pass --listen to pick another address)",
            args.listen
        )
    })?;
    let control_plane_address = http_listener.local_addr()?;
    let node_listener = crate::runtime::listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let gateway_address = node_listener.local_addr()?;
    let admin_listener = crate::runtime::listen(args.admin_listen).with_context(|| {
        format!(
            "cannot listen on {} (pass --admin-listen to pick another address)",
            args.admin_listen
        )
    })?;
    let admin_address = admin_listener.local_addr()?;
    // A fresh secret per dev session; nodes of other sessions cannot join this one.
    let join_token = uuid::Uuid::new_v4().simple().to_string();

    let images = match args.backend {
        DevBackend::Direct => TaskImages::default(),
        DevBackend::Docker | DevBackend::Kubernetes => TaskImages {
            docker_image: args.docker_image.clone(),
            sidecar_image: args.sidecar_image.clone(),
        },
    };
    let control_plane_config = ControlPlaneConfig {
        api_key: API_KEY.into(),
        database_path: workdir.join("control-plane.db"),
        reoffer_delay: Duration::from_secs(1),
        images,
    };
    let control_plane =
        Part::spawn(|stop| ozfleet_control_plane::run(http_listener, control_plane_config, stop));

    let gateway_config = GatewayConfig {
        upstream: UpstreamConfig {
            web_socket_url: format!("ws://{control_plane_address}{WORKER_WEB_SOCKET_PATH}"),
            api_key: API_KEY.into(),
            worker_id: WORKER_ID.into(),
            keepalive: Keepalive::default(),
            // Everything is on loopback, which is never proxied.
            proxy: ProxyEnv::default(),
        },
        settings: UpstreamSettings {
            server_root_url: format!("http://{control_plane_address}"),
            idle_on_complete: String::new(),
            session_sharing_server_url: String::new(),
            worker_id: WORKER_ID.into(),
        },
        join_token: JoinToken::new(join_token.clone())?,
        admin_token: None,
        timings: FleetTimings::default(),
        // Loopback: plain, as before.
        node_link: Default::default(),
        state_dir: Some(workdir.join("gateway-state")),
        max_nodes: ozfleet_gateway::DEFAULT_MAX_NODES,
    };
    let listeners = GatewayListeners {
        node: node_listener,
        admin: admin_listener,
    };
    let gateway = Part::spawn(|stop| async move {
        // The same OTEL_* environment as `ozfleet gateway` (metrics on localhost:9464 with
        // OTEL_METRICS_EXPORTER=prometheus, for instance).
        let identity = super::gateway_identity(&gateway_config.upstream.worker_id);
        let telemetry = Telemetry::start(&identity, super::process_env).await;
        let result =
            ozfleet_gateway::run_observed(listeners, gateway_config, &telemetry, stop).await;
        telemetry.shutdown().await;
        result.map_err(anyhow::Error::from)
    });

    let state_dir = workdir.join("agent-state");
    let backend: Arc<dyn TaskBackend> = match args.backend {
        DevBackend::Direct => Arc::new(DirectBackend::new(DirectConfig {
            settings: DirectSettings {
                workspace_root: workdir.join("workspaces"),
                oz_path: Some(demo_agent.to_owned()),
                ..DirectSettings::default()
            },
            environment: Vec::new(),
            cleanup: true,
            cancel_grace: Duration::from_secs(5),
            task_shim: std::env::current_exe().ok(),
        })?),
        DevBackend::Docker => Arc::new(
            DockerBackend::new(DockerConfig {
                node_id: load_or_create_node_id(&state_dir)?,
                settings: DockerSettings {
                    volumes: Vec::new(),
                    // The demo images are built locally; there is no registry to pull from.
                    image_pull_policy: ImagePullPolicy::IfNotPresent,
                    // The demo agent in the container fetches its run from the control
                    // plane on the host's loopback.
                    network_mode: Some("host".into()),
                },
                environment: Vec::new(),
                cleanup: true,
                stop_grace: Duration::from_secs(5),
            })
            .await
            .context("the Docker backend needs a Docker Engine and the demo images: run tests/docker/start-docker.sh")?,
        ),
        DevBackend::Kubernetes => Arc::new(k8s_dev_backend(&state_dir).await?),
    };
    let connector = GrpcConnector::new(&format!("http://{gateway_address}"), join_token.into())?;
    let node_config = NodeConfig {
        state_dir,
        node_name: "dev-node".into(),
        labels: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
        max_concurrent_tasks: 4,
        idle_on_complete: None,
        shutdown_grace: Duration::from_secs(10),
    };
    let agent =
        Part::spawn(|stop| ozfleet_agent::run(node_config, backend, Arc::new(connector), stop));
    Ok(Stack {
        control_plane,
        gateway,
        agent,
        control_plane_address,
        admin_address,
    })
}

/// Runs the three demos; true when each ended as expected.
async fn run_demos(api: &Api, backend: DevBackend) -> anyhow::Result<bool> {
    let mut all_ok = true;

    println!("Demo 1/3: a run that succeeds");
    let run = api.create("Say hello from ozfleet").await?;
    let item = follow(api, &run, None).await?;
    all_ok &= expect_state(&item, RunState::Succeeded);

    println!("\nDemo 2/3: a run whose prompt asks the agent to fail with exit code 3");
    let run = api.create("Exit 3 to show a failure").await?;
    let item = follow(api, &run, None).await?;
    all_ok &= expect_state(&item, RunState::Failed);
    println!(
        "  failure_reason = {:?}, exit_code = {}, message = {:?}",
        item.failure_reason.as_deref().unwrap_or_default(),
        item.exit_code
            .map_or("none".into(), |code| code.to_string()),
        item.status_message
            .as_ref()
            .map(|status| status.message.as_str())
            .unwrap_or_default()
    );

    println!("\nDemo 3/3: a long run, cancelled once it is in progress");
    let run = api.create("Sleep 300 seconds, then finish").await?;
    let item = follow(api, &run, Some(RunState::InProgress)).await?;
    if item.state == RunState::InProgress {
        println!("  POST /api/v1/agent/runs/{run}/cancel");
        api.cancel(&run).await?;
        let item = follow(api, &run, None).await?;
        all_ok &= expect_state(&item, RunState::Cancelled);
        let left = processes_left(&run, backend).await;
        if left.is_empty() {
            println!("  no process of run {run} is left");
        } else {
            println!("  processes of run {run} still alive: {left:?}");
            all_ok = false;
        }
    } else {
        all_ok = false;
    }
    println!();
    println!(
        "{}",
        if all_ok {
            "All demo runs ended as expected."
        } else {
            "Some demo runs did not end as expected (see above)."
        }
    );
    Ok(all_ok)
}

/// The processes of a cancelled run still alive. On Kubernetes the cluster stops the pod
/// after the Job's deletion (foreground, with the grace period), so they get that long.
async fn processes_left(run_id: &str, backend: DevBackend) -> Vec<u32> {
    let patience = match backend {
        DevBackend::Direct | DevBackend::Docker => Duration::ZERO,
        DevBackend::Kubernetes => K8S_POD_STOP_TIMEOUT,
    };
    let started = Instant::now();
    loop {
        let left = processes_of_run(run_id);
        if left.is_empty() {
            if !patience.is_zero() {
                println!(
                    "  the cluster stopped the Job's pod +{:.2}s after the cancellation",
                    started.elapsed().as_secs_f64()
                );
            }
            return left;
        }
        if started.elapsed() >= patience {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn expect_state(item: &RunItem, expected: RunState) -> bool {
    let ok = item.state == expected;
    if !ok {
        println!("  expected {expected}, got {}", item.state);
    }
    ok
}

/// Polls the run, printing each state change, until it is terminal or reaches `until`.
async fn follow(api: &Api, run_id: &str, until: Option<RunState>) -> anyhow::Result<RunItem> {
    let started = Instant::now();
    let mut seen = None;
    loop {
        let item = api.get(run_id).await?;
        let state = item.state;
        if seen != Some(state) {
            println!(
                "  {run_id}  {:<10} +{:.2}s",
                state.as_str(),
                started.elapsed().as_secs_f64()
            );
            seen = Some(state);
        }
        if state.is_terminal() || until == Some(state) {
            return Ok(item);
        }
        if started.elapsed() > DEMO_TIMEOUT {
            println!("  gave up waiting after {DEMO_TIMEOUT:?}");
            return Ok(item);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Processes whose environment names this run (`TASK_ID=<run>`): the agent and anything
/// it started.
pub fn processes_of_run(run_id: &str) -> Vec<u32> {
    let marker = format!("TASK_ID={run_id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|byte| *byte == 0)
                    .any(|var| var == marker.as_bytes())
            })
        })
        .collect()
}

fn print_examples(base_url: &str, admin_address: SocketAddr) {
    let auth = format!("-H 'Authorization: Bearer {API_KEY}'");
    println!("The stack keeps serving; press Ctrl-C to stop. Try:");
    println!();
    println!(
        "  # submit a run (prompts containing \"fail\", \"exit N\" or \"sleep N\" steer the demo agent)"
    );
    println!(
        "  curl -s {auth} -H 'Content-Type: application/json' \\\n    -d '{{\"prompt\":\"Say hello\",\"config\":{{\"worker_host\":\"{WORKER_ID}\"}}}}' \\\n    {base_url}/api/v1/agent/runs"
    );
    println!("  # list the latest runs, or only failed ones");
    println!("  curl -s {auth} '{base_url}/api/v1/agent/runs?limit=5'");
    println!("  curl -s {auth} '{base_url}/api/v1/agent/runs?state=FAILED'");
    println!("  # one run, and cancelling it");
    println!("  curl -s {auth} {base_url}/api/v1/agent/runs/RUN_ID");
    println!("  curl -s -X POST {auth} {base_url}/api/v1/agent/runs/RUN_ID/cancel");
    println!("  # the fleet as operators see it: the CLI, or grpcurl on the admin API");
    println!("  ozfleet nodes --admin {admin_address}");
    println!("  grpcurl -plaintext {admin_address} ozfleet.v1.AdminService/ListTasks");
    println!();
}

/// The run API client, driven from the runtime's blocking pool because it blocks.
#[derive(Clone)]
struct Api(RunClient);

impl Api {
    fn new(base_url: &str) -> Self {
        Self(RunClient::new(base_url, API_KEY.into()))
    }

    async fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&RunClient) -> Result<T, ClientError> + Send + 'static,
    ) -> anyhow::Result<T> {
        let client = self.0.clone();
        Ok(tokio::task::spawn_blocking(move || call(&client)).await??)
    }

    async fn create(&self, prompt: &str) -> anyhow::Result<String> {
        let request = RunRequest::new(prompt, WORKER_ID).with_title(prompt);
        let created = self.call(move |client| client.submit(&request)).await?;
        println!(
            "  POST /api/v1/agent/runs {{\"prompt\": {prompt:?}}} → run {}",
            created.run_id
        );
        Ok(created.run_id)
    }

    async fn get(&self, run_id: &str) -> anyhow::Result<RunItem> {
        let run_id = run_id.to_owned();
        self.call(move |client| client.get(&run_id)).await
    }

    async fn cancel(&self, run_id: &str) -> anyhow::Result<()> {
        let run_id = run_id.to_owned();
        self.call(move |client| client.cancel(&run_id)).await?;
        Ok(())
    }
}

/// The sidecar image the Kubernetes demo uses at /agent (the demo sidecar plus GNU tar,
/// which the sidecar copy init container needs), built by tests/kubernetes/start-k8s.sh.
const K8S_DEV_SIDECAR: &str = "localhost:5999/oz-k8s-sidecar:1";

/// The agent kubeconfig and namespace prepared by tests/kubernetes/start-k8s.sh.
fn k8s_dev_dir() -> (PathBuf, String) {
    let dir = PathBuf::from(
        std::env::var("OZFLEET_K8S_DIR").unwrap_or_else(|_| "/tmp/ozfleet-k8s".to_owned()),
    );
    let namespace = std::fs::read_to_string(dir.join("namespace"))
        .map(|namespace| namespace.trim().to_owned())
        .unwrap_or_else(|_| "default".to_owned());
    (dir, namespace)
}

/// Tasks as Jobs on the local test cluster, with the RBAC-limited agent kubeconfig. The
/// pods use the host network so the demo agent reaches the control plane on loopback.
async fn k8s_dev_backend(state_dir: &Path) -> anyhow::Result<KubernetesBackend> {
    let (dir, namespace) = k8s_dev_dir();
    let merged = ozfleet_worker_config::merge(
        ozfleet_worker_config::WorkerFlags {
            backend: Some("kubernetes".into()),
            ..Default::default()
        },
        None,
        &|_| None,
    )?;
    let mut settings = merged
        .kubernetes
        .context("kubernetes settings are present for the kubernetes backend")?;
    settings.kubeconfig = Some(dir.join("agent-kubeconfig"));
    settings.namespace = namespace;
    settings.image_pull_policy = ImagePullPolicy::IfNotPresent;
    settings.preflight_image = "localhost:5999/busybox:1".into();
    settings.sidecar_image = Some(K8S_DEV_SIDECAR.into());
    settings.pod_template = Some(serde_json::json!({"hostNetwork": true}));
    KubernetesBackend::new(KubernetesConfig {
        node_id: load_or_create_node_id(state_dir)?,
        worker_id: WORKER_ID.into(),
        settings,
        environment: Vec::new(),
        cleanup: true,
        cancel_grace: Duration::from_secs(5),
    })
    .await
    .context("the Kubernetes backend needs the local cluster: run tests/docker/start-docker.sh && tests/kubernetes/start-k8s.sh")
}
