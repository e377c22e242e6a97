//! Harness for end-to-end tests: real `ozfleet` processes on loopback, driven through the
//! control plane's HTTP API.

// Each end-to-end test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ozfleet_control_plane::client::{ClientError, RunClient};
use ozfleet_control_plane::run_api::{ListRuns, RunRequest};
use serde_json::{Value, json};

pub mod otlp;
pub mod proxy;

pub const API_KEY: &str = "e2e-api-key";
pub const JOIN_TOKEN: &str = "e2e-join-token";
pub const WORKER_ID: &str = "e2e-worker";

pub fn ozfleet() -> &'static str {
    env!("CARGO_BIN_EXE_ozfleet")
}

/// The demo agent: `ozfleet` linked under the name `oz-demo-agent` inside `dir`.
pub fn demo_agent(dir: &Path) -> PathBuf {
    let path = dir.join("oz-demo-agent");
    if !path.exists() {
        std::os::unix::fs::symlink(ozfleet(), &path).expect("link the demo agent");
    }
    path
}

/// A free loopback port. The small window between releasing it and the child binding it
/// is acceptable on a test machine.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// Runs `ozfleet dev --exit-after-demo` on a free port with `extra` arguments, asserts
/// that it exited successfully and returns what it printed.
pub fn run_dev_demos(extra: &[&str]) -> String {
    run_dev_demos_logging(extra, "warn").0
}

/// [`run_dev_demos`] with `RUST_LOG` set to `rust_log`; returns what it printed and its log.
pub fn run_dev_demos_logging(extra: &[&str], rust_log: &str) -> (String, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let output = Command::new(ozfleet())
        .args(["dev", "--exit-after-demo", "--listen", &listen])
        .args(extra)
        .env("RUST_LOG", rust_log)
        .output()
        .expect("run ozfleet dev");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (stdout, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Runs `ozfleet dev --backend <backend>` through its demos at trace level and asserts they
/// all ended as expected (the failing demo with its exit code) and that the log holds no
/// credential; `banner` is how dev names the backend.
pub fn assert_dev_demos_pass(backend: &str, banner: &str) {
    let (stdout, log) = run_dev_demos_logging(&["--backend", backend], "trace");
    assert_no_credentials(&log, "ozfleet-dev-key");
    assert!(stdout.contains(banner), "{stdout}");
    assert!(
        stdout.contains("All demo runs ended as expected."),
        "{stdout}"
    );
    assert!(
        stdout.contains("failure_reason = \"container_exit\", exit_code = 3"),
        "{stdout}"
    );
}

/// Asserts that a log holds no credential of a demo run: no task `env_vars` (the run
/// tokens sent as `WARP_API_KEY`), no bearer header, no API key.
pub fn assert_no_credentials(log: &str, api_key: &str) {
    for (line_number, line) in log.lines().enumerate() {
        let leaked = line.contains("WARP_API_KEY=")
            || line.contains("\"WARP_API_KEY\"")
            || line.contains("Bearer ")
            || line.contains(api_key);
        assert!(
            !leaked,
            "credential in log line {}: {line}",
            line_number + 1
        );
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// grpcurl, as installed by tests/install-tools.sh (`OZFLEET_GRPCURL` overrides).
pub fn grpcurl() -> PathBuf {
    let path = std::env::var_os("OZFLEET_GRPCURL")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|home| Path::new(&home).join(".cache/ozfleet-tools/bin/grpcurl"))
        })
        .expect("HOME or OZFLEET_GRPCURL is set");
    assert!(
        path.exists(),
        "grpcurl not found at {}: run tests/install-tools.sh",
        path.display()
    );
    path
}

/// The task ids an agent's log says it accepted.
pub fn accepted_task_ids(log: &str) -> std::collections::HashSet<String> {
    log.lines()
        .filter(|line| line.contains("Task accepted"))
        .filter_map(|line| {
            let start = line.find("task_id=")? + "task_id=".len();
            let rest = line[start..].trim_start_matches('"');
            let end = rest.find(|c: char| c == '"' || c.is_whitespace())?;
            Some(rest[..end].to_owned())
        })
        .collect()
}

/// A gateway process for a stack, journaling into `<dir>/gateway-state`.
fn spawn_gateway(
    name: &str,
    dir: &Path,
    http_port: u16,
    gateway_port: u16,
    admin_port: u16,
    extra: &[String],
    env: &[(String, String)],
) -> Proc {
    let state_dir = dir.join("gateway-state");
    let mut args = vec![
        "gateway".to_owned(),
        "--worker-id".to_owned(),
        WORKER_ID.to_owned(),
        "--web-socket-url".to_owned(),
        format!("ws://127.0.0.1:{http_port}/api/v1/selfhosted/worker/ws"),
        "--server-root-url".to_owned(),
        format!("http://127.0.0.1:{http_port}"),
        "--listen".to_owned(),
        format!("127.0.0.1:{gateway_port}"),
        "--admin-listen".to_owned(),
        format!("127.0.0.1:{admin_port}"),
        "--state-dir".to_owned(),
        state_dir.to_str().unwrap().to_owned(),
    ];
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut envs = vec![
        ("WARP_API_KEY", API_KEY),
        ("OZFLEET_JOIN_TOKEN", JOIN_TOKEN),
    ];
    envs.extend(
        env.iter()
            .map(|(key, value)| (key.as_str(), value.as_str())),
    );
    Proc::spawn(name, dir, &args, &envs)
}

/// Kills and reaps a child process (a third-party server a test started) when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child process whose stderr (logs) goes to a file; killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    log_path: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let log_path = dir.join(format!("{name}.log"));
        let log = File::create(&log_path).expect("log file");
        let mut command = Command::new(ozfleet());
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("WARP_API_KEY")
            .env_remove("OZFLEET_JOIN_TOKEN")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {name}: {error}"));
        Self {
            name: name.into(),
            child,
            log_path,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_until(
            timeout,
            &format!("{needle:?} in the log of {}", self.name),
            || self.log().contains(needle),
        );
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, like a crash or `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// The run API of a control plane, through the typed client. Runs come back as JSON
/// values because the end-to-end tests (Direct and Docker) index them by field name.
pub struct Api {
    client: RunClient,
}

impl Api {
    pub fn new(port: u16) -> Self {
        Self {
            client: RunClient::new(format!("http://127.0.0.1:{port}"), API_KEY.into()),
        }
    }

    pub fn is_up(&self) -> bool {
        let probe = ListRuns {
            limit: Some(1),
            ..ListRuns::default()
        };
        self.client.list(&probe).is_ok()
    }

    pub fn create(&self, prompt: &str) -> String {
        self.create_with_config(prompt, json!({}))
    }

    /// Creates a run for the test worker with `config` merged into its config.
    pub fn create_with_config(&self, prompt: &str, config: Value) -> String {
        let Value::Object(mut config) = config else {
            panic!("a run's config is a JSON object, got {config}");
        };
        config.insert("worker_host".into(), json!(WORKER_ID));
        let request = RunRequest {
            prompt: prompt.into(),
            title: None,
            config,
        };
        match self.client.submit(&request) {
            Ok(created) => created.run_id,
            Err(error) => panic!("create run: {:#}", anyhow::Error::from(error)),
        }
    }

    pub fn get(&self, run_id: &str) -> Value {
        match self.client.get(run_id) {
            Ok(run) => serde_json::to_value(run).expect("a run is JSON"),
            Err(error) => panic!("get run {run_id}: {:#}", anyhow::Error::from(error)),
        }
    }

    /// The status and body of the answer to a cancellation.
    pub fn cancel(&self, run_id: &str) -> (u16, Value) {
        match self.client.cancel(run_id) {
            Ok(cancelled) => (200, serde_json::to_value(cancelled).expect("JSON")),
            Err(ClientError::Status { status, body, .. }) => (
                status,
                serde_json::from_str(&body).unwrap_or(Value::String(body)),
            ),
            Err(error) => panic!("cancel run {run_id}: {:#}", anyhow::Error::from(error)),
        }
    }

    pub fn wait_for_state(&self, run_id: &str, state: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        wait_until(timeout, &format!("run {run_id} to be {state}"), || {
            last = self.get(run_id);
            last["state"] == state
        });
        last
    }
}

/// Runs `ozfleet certs <args>` and asserts it succeeded.
pub fn certs_command(args: &[&str]) {
    let output = Command::new(ozfleet())
        .arg("certs")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ozfleet certs");
    assert!(
        output.status.success(),
        "ozfleet certs {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A control plane plus a gateway attached to it, in `dir`.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub control_plane: Proc,
    pub gateway: Proc,
    pub gateway_port: u16,
    /// The gateway's admin API (operators, grpcurl, the CLI).
    pub admin_port: u16,
    pub http_port: u16,
    pub api: Api,
    /// The gateway's extra arguments and environment, to start it again the same way.
    gateway_extra: Vec<String>,
    gateway_env: Vec<(String, String)>,
}

impl Stack {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`Stack::start`], with extra `ozfleet control-plane` arguments.
    pub fn start_with(control_plane_args: &[&str]) -> Self {
        Self::start_full(control_plane_args, &[])
    }

    /// Like [`Stack::start`], with extra control plane arguments and gateway environment.
    pub fn start_full(control_plane_args: &[&str], gateway_env: &[(&str, &str)]) -> Self {
        Self::start_gateway_args(
            tempfile::tempdir().expect("temp dir"),
            control_plane_args,
            &[],
            gateway_env,
        )
    }

    /// Like [`Stack::start`], with extra control plane and gateway arguments.
    pub fn start_with_args(control_plane_args: &[&str], gateway_args: &[&str]) -> Self {
        Self::start_gateway_args(
            tempfile::tempdir().expect("temp dir"),
            control_plane_args,
            gateway_args,
            &[],
        )
    }

    /// The gateway's node listener.
    pub fn gateway_address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.gateway_port))
    }

    /// Asserts that no log of this stack (every process, restarts included) holds a
    /// secret: the API key, the join token, any run's token (the task's `WARP_API_KEY`,
    /// read from the control plane's database), or a bearer header.
    pub fn assert_no_secrets_in_logs(&self) {
        let database = rusqlite::Connection::open_with_flags(
            self.dir.path().join("runs.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the control plane's database");
        let mut statement = database
            .prepare("SELECT run_token FROM runs")
            .expect("query run tokens");
        let run_tokens: Vec<String> = statement
            .query_map([], |row| row.get(0))
            .expect("read run tokens")
            .collect::<Result<_, _>>()
            .expect("run tokens");
        assert!(!run_tokens.is_empty(), "the test created no run");
        let mut secrets = vec![API_KEY.to_owned(), JOIN_TOKEN.to_owned()];
        // A run token is `<run id>.<secret>`: the secret part alone must not show either.
        secrets.extend(
            run_tokens
                .iter()
                .filter_map(|token| token.split_once('.').map(|(_, secret)| secret.to_owned())),
        );
        let mut logs = 0;
        for entry in std::fs::read_dir(self.dir.path()).expect("list the stack's dir") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_none_or(|extension| extension != "log") {
                continue;
            }
            logs += 1;
            let log = std::fs::read_to_string(&path).expect("read a log");
            assert_no_credentials(&log, API_KEY);
            for secret in &secrets {
                assert!(
                    !log.contains(secret.as_str()),
                    "a secret ({}…) is in {}",
                    &secret[..4],
                    path.display()
                );
            }
        }
        assert!(
            logs >= 2,
            "no process logs found in {}",
            self.dir.path().display()
        );
    }

    /// A stack whose gateway serves the node link with mTLS: `ozfleet certs` creates a
    /// CA, a gateway certificate for `gateway_dns` (and 127.0.0.1) and, for each of
    /// `node_ids`, a node certificate, all in [`Stack::certs_dir`]. The join token stays
    /// set, as a second factor.
    pub fn start_tls(gateway_dns: &str, node_ids: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        let certs_arg = certs.to_str().unwrap().to_owned();
        certs_command(&["ca", "--dir", &certs_arg]);
        certs_command(&[
            "gateway",
            "--dir",
            &certs_arg,
            "--dns",
            gateway_dns,
            "--ip",
            "127.0.0.1",
        ]);
        for node_id in node_ids {
            certs_command(&["node", "--dir", &certs_arg, "--node-id", node_id]);
        }
        let file = |name: &str| certs.join(name).to_str().unwrap().to_owned();
        let (cert, key, ca) = (file("gateway.pem"), file("gateway-key.pem"), file("ca.pem"));
        Self::start_gateway_args(
            dir,
            &[],
            &[
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &ca,
            ],
            &[],
        )
    }

    /// Where [`Stack::start_tls`] keeps the certificates.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Starts a Direct node agent named `name` on `gateway_url` with `extra` arguments
    /// (TLS flags) and `envs`, without waiting for it to attach.
    pub fn tls_agent(
        &self,
        name: &str,
        gateway_url: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Proc {
        let state_dir = self.dir.path().join(format!("{name}-state"));
        let workspaces = self.dir.path().join(format!("{name}-workspaces"));
        let demo_agent = demo_agent(self.dir.path());
        let mut args = vec![
            "agent",
            "--gateway",
            gateway_url,
            "--name",
            name,
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--backend",
            "direct",
            "--workspace-root",
            workspaces.to_str().unwrap(),
            "--oz-path",
            demo_agent.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Proc::spawn(name, self.dir.path(), &args, envs)
    }

    fn start_gateway_args(
        dir: tempfile::TempDir,
        control_plane_args: &[&str],
        gateway_args: &[&str],
        gateway_env: &[(&str, &str)],
    ) -> Self {
        let http_port = free_port();
        let listen = format!("127.0.0.1:{http_port}");
        let database = dir.path().join("runs.db");
        let mut args = vec![
            "control-plane",
            "--listen",
            &listen,
            "--database",
            database.to_str().unwrap(),
        ];
        args.extend_from_slice(control_plane_args);
        let control_plane = Proc::spawn(
            "control-plane",
            dir.path(),
            &args,
            &[("WARP_API_KEY", API_KEY)],
        );
        let api = Api::new(http_port);
        wait_until(
            Duration::from_secs(20),
            "the control plane to serve",
            || api.is_up(),
        );

        let gateway_port = free_port();
        let admin_port = free_port();
        let gateway_extra: Vec<String> = gateway_args.iter().map(|arg| arg.to_string()).collect();
        let gateway_env: Vec<(String, String)> = gateway_env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let gateway = spawn_gateway(
            "gateway",
            dir.path(),
            http_port,
            gateway_port,
            admin_port,
            &gateway_extra,
            &gateway_env,
        );
        gateway.wait_for_log("Connected to Oz", Duration::from_secs(20));
        Self {
            dir,
            control_plane,
            gateway,
            gateway_port,
            admin_port,
            http_port,
            api,
            gateway_extra,
            gateway_env,
        }
    }

    /// `kill -9` of the gateway, then the same gateway again (same ports, same state dir).
    pub fn crash_and_restart_gateway(&mut self) {
        self.gateway.kill();
        self.gateway = spawn_gateway(
            "gateway-restarted",
            self.dir.path(),
            self.http_port,
            self.gateway_port,
            self.admin_port,
            &self.gateway_extra,
            &self.gateway_env,
        );
        self.gateway
            .wait_for_log("Connected to Oz", Duration::from_secs(20));
    }

    /// Stops the control plane (SIGTERM) and starts it again on the same port and database.
    pub fn restart_control_plane(&mut self) {
        self.control_plane
            .terminate(Duration::from_secs(10))
            .expect("control plane exits on SIGTERM");
        let listen = format!("127.0.0.1:{}", self.http_port);
        let database = self.dir.path().join("runs.db");
        self.control_plane = Proc::spawn(
            "control-plane-restarted",
            self.dir.path(),
            &[
                "control-plane",
                "--listen",
                &listen,
                "--database",
                database.to_str().unwrap(),
            ],
            &[("WARP_API_KEY", API_KEY)],
        );
        wait_until(
            Duration::from_secs(20),
            "the control plane to return",
            || self.api.is_up(),
        );
    }

    /// The node id an agent started with [`Stack::agent`] as `name` keeps in its state dir.
    pub fn node_id(&self, name: &str) -> String {
        let path = self
            .dir
            .path()
            .join(format!("{name}-state"))
            .join("node-id");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
            .trim()
            .to_owned()
    }

    /// `ozfleet <args> --admin <this gateway's admin API>`: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
        let output = Command::new(ozfleet())
            .args(args)
            .args(["--admin", &format!("127.0.0.1:{}", self.admin_port)])
            .env_remove("OZFLEET_ADMIN_TOKEN")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run the ozfleet CLI");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Starts a Direct node agent named `name` running the demo agent; waits until the
    /// gateway has it attached.
    pub fn agent(&self, name: &str, extra: &[&str]) -> Proc {
        self.agent_with_env(name, extra, &[])
    }

    /// [`Stack::agent`] with extra environment variables.
    pub fn agent_with_env(&self, name: &str, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut args = self.direct_args(name);
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.node_agent_with_env(name, &args, envs)
    }

    /// `--backend direct` running the demo agent, in `name`'s own workspace root.
    fn direct_args(&self, name: &str) -> Vec<String> {
        let workspaces = self.dir.path().join(format!("{name}-workspaces"));
        let demo_agent = demo_agent(self.dir.path());
        vec![
            "--backend".into(),
            "direct".into(),
            "--workspace-root".into(),
            workspaces.to_str().unwrap().into(),
            "--oz-path".into(),
            demo_agent.to_str().unwrap().into(),
        ]
    }

    /// Starts a node agent named `name` with `backend_args`; its state dir is
    /// `<dir>/<name>-state`, so starting the same name again reuses the identity.
    pub fn node_agent(&self, name: &str, backend_args: &[&str]) -> Proc {
        self.node_agent_with_env(name, backend_args, &[])
    }

    /// [`Stack::node_agent`] with extra environment variables.
    pub fn node_agent_with_env(
        &self,
        name: &str,
        backend_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Proc {
        let gateway = format!("http://127.0.0.1:{}", self.gateway_port);
        self.node_agent_at(name, &gateway, backend_args, envs)
    }

    /// A Direct agent like [`Stack::agent`] that dials the gateway at `gateway` (a proxy
    /// in front of it).
    pub fn agent_via(&self, name: &str, gateway: &str) -> Proc {
        let args = self.direct_args(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.node_agent_at(name, gateway, &args, &[])
    }

    /// The outcomes the agent `name` holds on disk, not yet acknowledged by the gateway.
    pub fn pending_outcomes(&self, name: &str) -> usize {
        let directory = self
            .dir
            .path()
            .join(format!("{name}-state"))
            .join("outcomes");
        // Files being written are dot-files (temporaries renamed into place).
        std::fs::read_dir(directory).map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
    }

    /// Starts a node agent named `name` dialing `gateway`; waits until it is attached.
    fn node_agent_at(
        &self,
        name: &str,
        gateway: &str,
        backend_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Proc {
        let state_dir = self.dir.path().join(format!("{name}-state"));
        let mut args = vec![
            "agent",
            "--gateway",
            gateway,
            "--name",
            name,
            "--state-dir",
            state_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(backend_args);
        let attached_before = self.gateway.log().matches("Node attached").count();
        let agent = Proc::spawn(
            name,
            self.dir.path(),
            &args,
            &[&[("OZFLEET_JOIN_TOKEN", JOIN_TOKEN)], envs].concat(),
        );
        wait_until(
            Duration::from_secs(20),
            &format!("{name} to attach"),
            || self.gateway.log().matches("Node attached").count() > attached_before,
        );
        agent
    }
}
