//! Command-line surface. Upstream (gateway) and node-side flags keep the names, env vars
//! and defaults of `oz-agent-worker`, so its flag sets keep working.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ozfleet_proto::oz::{DEFAULT_SERVER_ROOT_URL, DEFAULT_WEB_SOCKET_URL};

use crate::commands;

#[derive(Debug, Parser)]
#[command(
    name = "ozfleet",
    version,
    about = "Run Oz cloud agents on your own fleet: one gateway, many node agents."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as human-readable text (default) or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hold the one connection to Oz and schedule its tasks onto node agents.
    Gateway(GatewayArgs),
    /// Run tasks on this host for a gateway.
    Agent(AgentArgs),
    /// Serve a local Oz-compatible control plane (run API + worker WebSocket).
    ControlPlane(ControlPlaneArgs),
    /// Start a control plane, a gateway and a Direct node agent on loopback and run a demo.
    Dev(DevArgs),
    /// The fleet at a glance: upstream connection, nodes, capacity, tasks.
    Status(AdminArgs),
    /// The nodes attached to the gateway (or away within the grace).
    Nodes(AdminArgs),
    /// Tasks offered to or running on nodes.
    Tasks(TasksArgs),
    /// Stop giving a node new tasks; its running tasks finish. Survives agent restarts.
    Drain(NodeTarget),
    /// Make a drained node eligible for new tasks again.
    Undrain(NodeTarget),
    /// Stop a task on its node; Oz is told an operator cancelled it.
    Cancel(TaskTarget),
    /// Check a gRPC health service (exit 0 when SERVING): for probes and healthchecks.
    Health(commands::health::HealthArgs),
    /// Create the fleet CA, the gateway's and the nodes' certificates (mTLS on the node link).
    Certs(commands::certs::CertsArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// How the CLI reaches the gateway's admin API.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The gateway's admin address, `HOST:PORT` or `http://HOST:PORT`.
    #[arg(long, env = "OZFLEET_ADMIN", default_value = "127.0.0.1:7071")]
    pub admin: String,
    #[command(flatten)]
    pub admin_token: AdminTokenArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only tasks in this state: offered, running or lost.
    #[arg(long)]
    pub state: Option<String>,
    /// Only tasks on this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Follow node and task events as they happen instead of listing.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct NodeTarget {
    /// The node id (see `ozfleet nodes`).
    pub node: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct TaskTarget {
    /// The task id (see `ozfleet tasks`).
    pub task: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// An admin CLI command, once its admin connection flags are split off.
#[derive(Debug)]
pub enum AdminCommand {
    Status,
    Nodes,
    Tasks {
        state: Option<String>,
        node: Option<String>,
        watch: bool,
    },
    Drain {
        node: String,
    },
    Undrain {
        node: String,
    },
    Cancel {
        task: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DevBackend {
    Direct,
    Docker,
    /// Jobs on the cluster of tests/kubernetes/start-k8s.sh (`OZFLEET_K8S_DIR`).
    Kubernetes,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// YAML config file in oz-agent-worker's schema (`worker_id`, `idle_on_complete` apply here).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Oz API key.
    #[arg(long, env = "WARP_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Worker id Oz routes runs by (`config.worker_host`); the `warp` prefix is reserved.
    #[arg(long)]
    pub worker_id: Option<String>,
    #[arg(long, default_value = DEFAULT_WEB_SOCKET_URL, hide = true)]
    pub web_socket_url: String,
    #[arg(long, default_value = DEFAULT_SERVER_ROOT_URL, hide = true)]
    pub server_root_url: String,
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Passed to `oz agent run --idle-on-complete` (e.g. `45m`) when the task sets none.
    #[arg(long)]
    pub idle_on_complete: Option<String>,
    #[arg(long, hide = true)]
    pub session_sharing_server_url: Option<String>,
    /// Address node agents attach to.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub join_token: JoinTokenArgs,
    /// Where the gateway journals which node was given which execution, so a restart
    /// neither loses track of running tasks nor starts them twice (recommended:
    /// /var/lib/ozfleet/gateway). Without it a restart forgets.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Most nodes the gateway keeps (attached, or away within the 60 s grace); more are
    /// refused (RESOURCE_EXHAUSTED), so a flood of node identities cannot exhaust memory.
    #[arg(long, default_value_t = ozfleet_gateway::DEFAULT_MAX_NODES)]
    pub max_nodes: usize,
    /// How long a node has to answer an offer before the task is offered elsewhere (a
    /// node that usually answers quickly gets less: 50× its usual answer time, at least 2 s).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration)]
    pub offer_timeout: Duration,
    /// How long a node may stay away (disconnected, or silent past --node-keepalive)
    /// before the tasks it runs are reported failed to Oz. A node back in time keeps them.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = positive_duration)]
    pub node_lost_timeout: Duration,
    /// HTTP/2 ping interval on node connections (each connection pings after its own
    /// 75–100 % of it without hearing from the node, so a fleet's pings spread out); a
    /// node that leaves a ping unanswered this long is taken as gone (a host that lost
    /// power, a firewall dropping the flow).
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = positive_duration)]
    pub node_keepalive: Duration,
    /// Address of the admin API (grpcurl, `ozfleet status`), health and reflection. Off
    /// loopback it needs an admin token.
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub admin_listen: SocketAddr,
    #[command(flatten)]
    pub admin_token: AdminTokenArgs,
    #[command(flatten)]
    pub node_tls: GatewayTlsArgs,
}

/// mTLS on the node link (all three files, or none); `ozfleet certs` creates them.
#[derive(Debug, Args)]
pub struct GatewayTlsArgs {
    /// The gateway's certificate (PEM) presented to nodes; reloaded when the file changes.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert; reloaded when the file changes.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The fleet CA (PEM): nodes must present a certificate it signed, naming their node id.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve a plain-text node link on a non-loopback --listen address (not recommended).
    #[arg(long)]
    pub insecure_node_link: bool,
}

/// The node's side of mTLS on the node link (with an `https://` --gateway).
#[derive(Debug, Args)]
pub struct AgentTlsArgs {
    /// The CA (PEM) that signed the gateway's certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), naming its node id; read again on every connection.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the gateway's certificate must carry, when --gateway's host is not in it
    /// (e.g. a gateway reached by IP address).
    #[arg(long, value_name = "NAME")]
    pub gateway_server_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct AdminTokenArgs {
    /// File holding the token every admin call must present (`authorization: Bearer`).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token (prefer --admin-token-file).
    #[arg(long, env = "OZFLEET_ADMIN_TOKEN", hide_env_values = true, hide = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct JoinTokenArgs {
    /// File holding the shared secret node agents join with.
    #[arg(long, conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// The shared secret node agents join with (prefer --join-token-file).
    #[arg(long, env = "OZFLEET_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Gateway address (`https://` with the --tls-* flags).
    #[arg(long, env = "OZFLEET_GATEWAY", default_value = "http://127.0.0.1:7070")]
    pub gateway: String,
    #[command(flatten)]
    pub join_token: JoinTokenArgs,
    #[command(flatten)]
    pub tls: AgentTlsArgs,
    /// Where the node keeps its identity.
    #[arg(long, default_value = "/var/lib/ozfleet/agent")]
    pub state_dir: PathBuf,
    /// Display name (defaults to the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Label advertised to the gateway, `KEY=VALUE`; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// YAML config file in oz-agent-worker's schema (`backend.*`, `cleanup`, …).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    #[arg(long, value_parser = ["docker", "direct", "kubernetes", "command", ""])]
    pub backend: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub max_concurrent_tasks: i64,
    /// Task env var `KEY=VALUE`, or `KEY` to copy this process's value; repeatable.
    #[arg(short = 'e', long = "env", value_delimiter = ',')]
    pub env: Vec<String>,
    /// Docker volume `HOST:CONTAINER[:MODE]`; repeatable (Docker backend only).
    #[arg(short = 'v', long = "volumes", value_delimiter = ',')]
    pub volumes: Vec<String>,
    /// Keep workspaces (and containers/Jobs) after tasks end.
    #[arg(long)]
    pub no_cleanup: bool,
    /// Direct backend: run every task in this existing directory.
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
    /// Direct backend: the `oz` executable (default: `oz` on PATH).
    #[arg(long)]
    pub oz_path: Option<PathBuf>,
    /// Direct backend: parent of per-task workspaces (default /var/lib/oz/workspaces).
    #[arg(long)]
    pub workspace_root: Option<PathBuf>,
    /// Docker backend: when to pull task images (default Always, like the reference).
    #[arg(long, value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: Option<String>,
    /// Docker backend: the containers' network mode (e.g. `host`).
    #[arg(long)]
    pub docker_network: Option<String>,
    #[arg(long)]
    pub idle_on_complete: Option<String>,
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Serve gRPC health here: service "" is SERVING while the node is attached to the
    /// gateway (readiness), "liveness" while the process runs.
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct ControlPlaneArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// API key clients and workers must present.
    #[arg(long, env = "WARP_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// SQLite database holding the runs.
    #[arg(long, default_value = "ozfleet-control-plane.db")]
    pub database: PathBuf,
    /// `docker_image` sent with every assignment (the image tasks run in).
    #[arg(long)]
    pub docker_image: Option<String>,
    /// `sidecar_image` sent with every assignment (mounted at /agent; holds entrypoint.sh).
    #[arg(long)]
    pub sidecar_image: Option<String>,
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the control plane's HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8765")]
    pub listen: SocketAddr,
    /// Stop after the demo runs instead of serving until Ctrl-C; exit status tells
    /// whether they ended as expected.
    #[arg(long)]
    pub exit_after_demo: bool,
    /// Where the node agent runs tasks. `docker` needs a Docker Engine and the demo
    /// images (`tests/docker/start-docker.sh` provides both).
    #[arg(long, value_enum, default_value_t = DevBackend::Direct)]
    pub backend: DevBackend,
    /// Docker backend: the task image.
    #[arg(long, default_value = "localhost:5999/busybox:1")]
    pub docker_image: String,
    /// Docker backend: the sidecar mounted at /agent, whose entrypoint.sh is the demo agent.
    #[arg(long, default_value = "localhost:5999/oz-demo-sidecar:1")]
    pub sidecar_image: String,
    /// Where the gateway serves the admin API (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin_listen: SocketAddr,
    #[arg(long, value_enum, default_value_t = LogLevel::Warn)]
    pub log_level: LogLevel,
}

pub fn main() -> ExitCode {
    let program = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        });
    if program.as_deref() == Some(crate::demo_agent::PROGRAM_NAME) {
        return crate::demo_agent::main();
    }
    let arguments: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if arguments
        .get(1)
        .is_some_and(|argument| argument == crate::task_shim::ARGUMENT)
    {
        return crate::task_shim::main(&arguments[2..]);
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Agent(_)) {
        // The join token is parsed; tasks' setup and teardown commands inherit this
        // process's environment, and must not be able to join rogue nodes with it.
        // SAFETY: no other thread exists yet (the runtime starts below).
        unsafe { std::env::remove_var("OZFLEET_JOIN_TOKEN") };
    }
    let log_level = match &cli.command {
        Command::Gateway(args) => args.log_level,
        Command::Agent(args) => args.log_level,
        Command::ControlPlane(args) => args.log_level,
        Command::Dev(args) => args.log_level,
        // The CLI prints results; only problems are logged.
        Command::Status(_)
        | Command::Nodes(_)
        | Command::Tasks(_)
        | Command::Drain(_)
        | Command::Undrain(_)
        | Command::Cancel(_)
        | Command::Health(_)
        | Command::Certs(_) => LogLevel::Error,
    };
    let _log_guard =
        match crate::runtime::init_logging(log_level.as_str(), cli.log_format == LogFormat::Json) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("ozfleet: cannot start the log writer thread: {error}");
                return ExitCode::FAILURE;
            }
        };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ozfleet: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Gateway(args) => commands::gateway::run(args).await,
            Command::Agent(args) => commands::agent::run(args).await,
            Command::ControlPlane(args) => commands::control_plane::run(args).await,
            Command::Dev(args) => commands::dev::run(args).await,
            Command::Status(args) => commands::admin::run(args, AdminCommand::Status).await,
            Command::Nodes(args) => commands::admin::run(args, AdminCommand::Nodes).await,
            Command::Tasks(TasksArgs {
                state,
                node,
                watch,
                admin,
            }) => commands::admin::run(admin, AdminCommand::Tasks { state, node, watch }).await,
            Command::Drain(NodeTarget { node, admin }) => {
                commands::admin::run(admin, AdminCommand::Drain { node }).await
            }
            Command::Undrain(NodeTarget { node, admin }) => {
                commands::admin::run(admin, AdminCommand::Undrain { node }).await
            }
            Command::Cancel(TaskTarget { task, admin }) => {
                commands::admin::run(admin, AdminCommand::Cancel { task }).await
            }
            Command::Health(args) => commands::health::run(args).await,
            Command::Certs(args) => commands::certs::run(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("ozfleet: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A duration such as `90s`, `500ms` or `2m`; zero is refused.
fn positive_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(duration) if duration.is_zero() => Err("must be longer than zero".into()),
        Ok(duration) => Ok(duration),
        Err(error) => Err(format!("{error} (examples: 90s, 500ms, 2m)")),
    }
}
