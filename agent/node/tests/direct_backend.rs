//! Direct backend against real processes: a fake `oz` shell script, temp dirs only.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ozfleet_agent::backend::direct::DirectSetupError;
use ozfleet_agent::backend::{
    DirectBackend, DirectConfig, DirectSettings, TaskBackend, TaskFailure, TaskRun, secret_env,
};
use ozfleet_proto::oz::FailureReason;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const GRACE: Duration = Duration::from_millis(300);
/// Upper bound for any single task in these tests (they take well under a second).
const TASK_LIMIT: Duration = Duration::from_secs(20);

/// A temp dir holding the workspace root, the fake `oz` and an output dir the scripts
/// write to (`$TEST_OUT`).
struct Fixture {
    _tmp: TempDir,
    base: PathBuf,
    root: PathBuf,
    out: PathBuf,
    oz: PathBuf,
}

impl Fixture {
    /// `agent_body` is the fake oz's shell script after the shebang.
    fn new(agent_body: &str) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let base = tmp.path().to_path_buf();
        let out = base.join("out");
        std::fs::create_dir(&out).unwrap();
        let oz = base.join("bin").join("oz");
        std::fs::create_dir(oz.parent().unwrap()).unwrap();
        write_executable(&oz, &format!("#!/bin/sh\n{agent_body}\n"));
        Self {
            root: base.join("root"),
            _tmp: tmp,
            base,
            out,
            oz,
        }
    }

    fn config(&self) -> DirectConfig {
        DirectConfig {
            settings: DirectSettings {
                workspace_root: self.root.clone(),
                target_dir: None,
                oz_path: Some(self.oz.clone()),
                setup_command: None,
                teardown_command: None,
            },
            environment: Vec::new(),
            cleanup: true,
            cancel_grace: GRACE,
            task_shim: None,
        }
    }

    fn backend(&self, adjust: impl FnOnce(&mut DirectConfig)) -> DirectBackend {
        let mut config = self.config();
        adjust(&mut config);
        DirectBackend::new(config).expect("backend starts")
    }

    fn task(&self, task_id: &str) -> TaskRun {
        TaskRun {
            task_id: task_id.into(),
            execution_id: format!("{task_id}-exec"),
            base_args: vec![
                "agent".into(),
                "run".into(),
                "--task-id".into(),
                task_id.into(),
            ],
            env: secret_env([
                ("TASK_ID", task_id),
                ("TEST_OUT", self.out.to_str().unwrap()),
            ]),
            harness: None,
            image: String::new(),
            sidecars: Vec::new(),
            instance_shape: None,
        }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    fn workspace(&self, task_id: &str) -> PathBuf {
        self.root.join(task_id)
    }
}

/// Writes an executable through a child process so this (multi-threaded) test process
/// never holds a writable descriptor of a file it later executes (ETXTBSY races).
fn write_executable(path: &Path, contents: &str) {
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"printf '%s' "$1" > "$2" && chmod 755 "$2""#)
        .arg("sh")
        .arg(contents)
        .arg(path)
        .status()
        .expect("run /bin/sh");
    assert!(status.success());
}

async fn run(backend: &DirectBackend, task: TaskRun) -> Result<(), TaskFailure> {
    run_with(backend, task, CancellationToken::new()).await
}

async fn run_with(
    backend: &DirectBackend,
    task: TaskRun,
    cancel: CancellationToken,
) -> Result<(), TaskFailure> {
    tokio::time::timeout(TASK_LIMIT, backend.execute(task, cancel))
        .await
        .expect("task finished in time")
}

/// Parses `env` output.
fn read_env(path: &Path) -> BTreeMap<String, String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// This test process's environment, restricted to what a shell passes on unchanged:
/// UTF-8 values under shell-identifier names.
fn node_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, _)| {
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect()
}

/// Waits until a script has written a full line to `path`, returns it trimmed.
async fn wait_for_line(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_pid(path: &Path) -> i32 {
    wait_for_line(path).await.parse().expect("a pid")
}

/// Dead: no `/proc` entry, or a zombie waiting for its (re)parent to reap it.
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn assert_dies(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_dead(pid) {
        assert!(Instant::now() < deadline, "process {pid} survived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn success_runs_oz_with_base_args_in_a_private_workspace() {
    let fx = Fixture::new(
        r#"for arg in "$@"; do echo "$arg"; done > "$TEST_OUT/args"
pwd > "$TEST_OUT/pwd"
ls -a > "$TEST_OUT/ls""#,
    );
    let backend = fx.backend(|config| config.cleanup = false);
    run(&backend, fx.task("task-ok")).await.expect("success");

    let workspace = fx.workspace("task-ok");
    assert_eq!(
        std::fs::read_to_string(fx.out("args")).unwrap(),
        "agent\nrun\n--task-id\ntask-ok\n"
    );
    assert_eq!(
        std::fs::read_to_string(fx.out("pwd")).unwrap().trim(),
        workspace.to_str().unwrap()
    );
    let listing = std::fs::read_to_string(fx.out("ls")).unwrap();
    assert!(
        listing.lines().any(|name| name.starts_with("oz-env-")),
        "the env file exists while the agent runs: {listing}"
    );
    assert_eq!(mode(&workspace), 0o700);
    assert_eq!(mode(&fx.root), 0o700);
    assert!(
        entries(&workspace).is_empty(),
        "no-cleanup keeps the workspace but removes the env file"
    );
}

#[tokio::test]
async fn workspace_root_is_created_private_at_startup() {
    let fx = Fixture::new("exit 0");
    let nested = fx.base.join("a").join("b");
    let _backend = fx.backend(|config| config.settings.workspace_root = nested.clone());
    assert!(nested.is_dir());
    assert_eq!(mode(&nested), 0o700);
}

#[tokio::test]
async fn cleanup_removes_the_workspace() {
    let fx = Fixture::new(r#"echo data > file.txt"#);
    let backend = fx.backend(|_| {});
    run(&backend, fx.task("task-clean")).await.expect("success");
    assert!(!fx.workspace("task-clean").exists());
    assert!(fx.root.is_dir());
}

#[tokio::test]
async fn non_zero_exit_is_an_agent_invocation_failure() {
    let fx = Fixture::new("exit 3");
    let backend = fx.backend(|_| {});
    let failure = run(&backend, fx.task("task-exit")).await.unwrap_err();
    assert_eq!(
        failure,
        TaskFailure {
            reason: FailureReason::AgentInvocation,
            exit_code: 3,
            error: "oz agent exited with error: exit status 3".into(),
        }
    );
    assert!(
        !fx.workspace("task-exit").exists(),
        "cleaned up after failure"
    );
}

#[tokio::test]
async fn signal_death_is_normalised_to_128_plus_signal() {
    let fx = Fixture::new("kill -TERM $$\nsleep 5");
    let backend = fx.backend(|_| {});
    let failure = run(&backend, fx.task("task-sig")).await.unwrap_err();
    assert_eq!(
        failure,
        TaskFailure {
            reason: FailureReason::AgentInvocation,
            exit_code: 143,
            error: "oz agent exited with error: signal: terminated".into(),
        }
    );
}

#[tokio::test]
async fn missing_oz_binary_is_reported_without_exit_code() {
    let fx = Fixture::new("exit 0");
    let missing = fx.base.join("no-such-oz");
    let backend = fx.backend(|config| config.settings.oz_path = Some(missing.clone()));
    let failure = run(&backend, fx.task("task-missing")).await.unwrap_err();
    assert_eq!(
        failure,
        TaskFailure {
            reason: FailureReason::AgentInvocation,
            exit_code: 0,
            error: format!(
                "oz agent exited with error: fork/exec {}: no such file or directory",
                missing.display()
            ),
        }
    );
}

#[tokio::test]
async fn agent_env_is_host_basics_plus_task_env_only() {
    let fx = Fixture::new(r#"env > "$TEST_OUT/env""#);
    let backend = fx.backend(|config| {
        config.environment = secret_env([("OPERATOR_VAR", "op"), ("TASK_ID", "operator-wins")]);
        config.settings.setup_command = Some("true".into());
    });
    let mut task = fx.task("task-env");
    task.env
        .extend(secret_env([("SECRET_TOKEN", "s3cr3t value")]));
    run(&backend, task).await.expect("success");

    let env = read_env(&fx.out("env"));
    let workspace = fx.workspace("task-env");
    assert_eq!(env["OPERATOR_VAR"], "op");
    assert_eq!(
        env["TASK_ID"], "operator-wins",
        "operator env overrides task env"
    );
    assert_eq!(env["SECRET_TOKEN"], "s3cr3t value");
    assert_eq!(
        env["GIT_CONFIG_GLOBAL"],
        workspace.join(".gitconfig").to_str().unwrap()
    );
    for name in ["HOME", "PATH", "TMPDIR"] {
        if let Ok(value) = std::env::var(name) {
            assert_eq!(env.get(name), Some(&value), "{name} comes from the host");
        }
    }
    for name in [
        "OZ_RUN_ID",
        "OZ_WORKSPACE_ROOT",
        "OZ_WORKER_BACKEND",
        "OZ_ENVIRONMENT_FILE",
    ] {
        assert!(!env.contains_key(name), "{name} must not reach the agent");
    }

    // Everything else the agent sees was set by us or by the shell itself.
    let allowed = [
        "HOME",
        "PATH",
        "TMPDIR",
        "TASK_ID",
        "TEST_OUT",
        "OPERATOR_VAR",
        "SECRET_TOKEN",
        "GIT_CONFIG_GLOBAL",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
    ];
    let unexpected: Vec<&String> = env
        .keys()
        .filter(|name| !allowed.contains(&name.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "leaked into the agent env: {unexpected:?}"
    );
    let leaked: Vec<String> = node_env()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !allowed.contains(&name.as_str()) && env.contains_key(name))
        .collect();
    assert!(leaked.is_empty(), "node env leaked: {leaked:?}");
}

#[tokio::test]
async fn setup_gets_oz_vars_and_exports_through_the_env_file() {
    let fx = Fixture::new(r#"env > "$TEST_OUT/agent_env""#);
    let backend = fx.backend(|config| {
        config.environment = secret_env([("OPERATOR_VAR", "op")]);
        config.settings.setup_command = Some(
            r#"env > "$TEST_OUT/setup_env"
pwd > "$TEST_OUT/setup_pwd"
printf '%s\n' 'FOO=bar' '# a comment' 'export QUOTED="two words"' 'OPERATOR_VAR=from-setup' >> "$OZ_ENVIRONMENT_FILE""#
                .into(),
        );
    });
    run(&backend, fx.task("task-setup")).await.expect("success");

    let workspace = fx.workspace("task-setup");
    let setup = read_env(&fx.out("setup_env"));
    assert_eq!(setup["OZ_WORKSPACE_ROOT"], workspace.to_str().unwrap());
    assert_eq!(setup["OZ_WORKER_BACKEND"], "direct");
    assert_eq!(setup["OZ_RUN_ID"], "task-setup");
    let env_file = PathBuf::from(&setup["OZ_ENVIRONMENT_FILE"]);
    assert_eq!(env_file.parent(), Some(workspace.as_path()));
    assert!(
        env_file
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("oz-env-")
    );
    assert_eq!(setup["TASK_ID"], "task-setup", "setup sees the task env");
    assert_eq!(setup["OPERATOR_VAR"], "op");
    assert_eq!(
        setup["GIT_CONFIG_GLOBAL"],
        workspace.join(".gitconfig").to_str().unwrap()
    );
    // The full node environment reaches the setup command (names we set, and variables
    // a shell manages or cannot represent, aside).
    let ours = [
        "TASK_ID",
        "TEST_OUT",
        "OPERATOR_VAR",
        "GIT_CONFIG_GLOBAL",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
    ];
    for (name, value) in node_env() {
        if !ours.contains(&name.as_str()) && !name.starts_with("OZ_") && !value.contains('\n') {
            assert_eq!(setup.get(&name), Some(&value), "{name}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(fx.out("setup_pwd")).unwrap().trim(),
        workspace.to_str().unwrap()
    );

    let agent = read_env(&fx.out("agent_env"));
    assert_eq!(agent["FOO"], "bar");
    assert_eq!(agent["QUOTED"], "two words");
    assert_eq!(
        agent["OPERATOR_VAR"], "from-setup",
        "env file overrides task env"
    );
    assert!(!agent.contains_key("OZ_ENVIRONMENT_FILE"));
    assert!(!env_file.exists());
}

#[tokio::test]
async fn env_file_cannot_override_git_config_global() {
    let fx = Fixture::new(r#"env > "$TEST_OUT/agent_env""#);
    let backend = fx.backend(|config| {
        config.settings.setup_command = Some(
            r#"echo 'GIT_CONFIG_GLOBAL=/tmp/evil-gitconfig' >> "$OZ_ENVIRONMENT_FILE"
git_config="$GIT_CONFIG_GLOBAL"
printf '[user]\n\tname = setup\n' > "$git_config""#
                .into(),
        );
        config.cleanup = false;
    });
    run(&backend, fx.task("task-git")).await.expect("success");
    let workspace = fx.workspace("task-git");
    let agent = read_env(&fx.out("agent_env"));
    assert_eq!(
        agent["GIT_CONFIG_GLOBAL"],
        workspace.join(".gitconfig").to_str().unwrap()
    );
    assert!(
        std::fs::read_to_string(workspace.join(".gitconfig"))
            .unwrap()
            .contains("name = setup"),
        "setup wrote the isolated git config"
    );
}

#[tokio::test]
async fn unparsable_env_file_exports_nothing() {
    let fx = Fixture::new(r#"env > "$TEST_OUT/agent_env""#);
    let backend = fx.backend(|config| {
        config.settings.setup_command =
            Some(r#"printf 'GOOD=1\nthis line is not dotenv\n' >> "$OZ_ENVIRONMENT_FILE""#.into());
    });
    run(&backend, fx.task("task-badenv"))
        .await
        .expect("success");
    assert!(!read_env(&fx.out("agent_env")).contains_key("GOOD"));
}

#[tokio::test]
async fn harness_state_vars_point_into_the_workspace() {
    let fx = Fixture::new(r#"env > "$TEST_OUT/env-$TASK_ID""#);
    let backend = fx.backend(|_| {});
    let cases = [
        (
            "h-claude",
            Some("claude"),
            Some(("CLAUDE_CONFIG_DIR", ".claude")),
        ),
        ("h-codex", Some("codex"), Some(("CODEX_HOME", ".codex"))),
        ("h-gemini", Some("gemini"), None),
        ("h-none", None, None),
    ];
    for (task_id, harness, expected) in cases {
        let mut task = fx.task(task_id);
        task.harness = harness.map(String::from);
        run(&backend, task).await.expect("success");
        let env = read_env(&fx.out(&format!("env-{task_id}")));
        let workspace = fx.workspace(task_id);
        for name in ["CLAUDE_CONFIG_DIR", "CODEX_HOME"] {
            let want = expected
                .filter(|(var, _)| *var == name)
                .map(|(_, dir)| workspace.join(dir).to_str().unwrap().to_owned());
            assert_eq!(env.get(name).cloned(), want, "{task_id} {name}");
        }
    }
}

#[tokio::test]
async fn teardown_runs_with_its_own_env_even_after_failure() {
    let fx = Fixture::new("exit 3");
    let marker = fx.base.join("teardown_env");
    let backend = fx.backend(|config| {
        config.settings.teardown_command = Some(format!(
            "env > '{}'; test -d \"$OZ_WORKSPACE_ROOT\" && echo present > '{}'",
            marker.display(),
            fx.base.join("teardown_saw_workspace").display()
        ));
    });
    let failure = run(&backend, fx.task("task-td")).await.unwrap_err();
    assert_eq!(failure.reason, FailureReason::AgentInvocation);

    let workspace = fx.workspace("task-td");
    let env = read_env(&marker);
    assert_eq!(env["OZ_WORKSPACE_ROOT"], workspace.to_str().unwrap());
    assert_eq!(env["OZ_WORKER_BACKEND"], "direct");
    assert_eq!(env["OZ_RUN_ID"], "task-td");
    assert_eq!(
        env["GIT_CONFIG_GLOBAL"],
        workspace.join(".gitconfig").to_str().unwrap()
    );
    assert!(!env.contains_key("OZ_ENVIRONMENT_FILE"));
    assert!(!env.contains_key("TEST_OUT"), "no task env in teardown");
    assert!(
        fx.base.join("teardown_saw_workspace").exists(),
        "teardown runs before the workspace is removed"
    );
    assert!(!workspace.exists());
}

#[tokio::test]
async fn teardown_failure_does_not_fail_the_task() {
    let fx = Fixture::new("exit 0");
    let backend = fx.backend(|config| config.settings.teardown_command = Some("exit 9".into()));
    run(&backend, fx.task("task-tdfail"))
        .await
        .expect("success");
    assert!(!fx.workspace("task-tdfail").exists());
}

#[tokio::test]
async fn teardown_skipped_when_cleanup_disabled() {
    let fx = Fixture::new("exit 0");
    let marker = fx.base.join("teardown_ran");
    let backend = fx.backend(|config| {
        config.cleanup = false;
        config.settings.teardown_command = Some(format!("touch '{}'", marker.display()));
    });
    run(&backend, fx.task("task-keep")).await.expect("success");
    assert!(
        !marker.exists(),
        "the reference skips teardown without cleanup"
    );
    assert!(fx.workspace("task-keep").is_dir());
}

#[tokio::test]
async fn setup_failure_is_reported_and_the_agent_does_not_run() {
    let fx = Fixture::new(r#"touch "$TEST_OUT/agent_ran""#);
    let marker = fx.base.join("teardown_ran");
    let backend = fx.backend(|config| {
        config.settings.setup_command = Some("exit 4".into());
        config.settings.teardown_command = Some(format!("touch '{}'", marker.display()));
    });
    let failure = run(&backend, fx.task("task-setupfail")).await.unwrap_err();
    assert_eq!(
        failure,
        TaskFailure {
            reason: FailureReason::SetupCommand,
            exit_code: 0,
            error: "setup command failed: exit status 4".into(),
        }
    );
    assert!(!fx.out("agent_ran").exists());
    assert!(marker.exists(), "teardown still runs");
    assert!(!fx.workspace("task-setupfail").exists());
}

#[tokio::test]
async fn unsafe_task_ids_are_rejected_before_touching_the_disk() {
    let fx = Fixture::new(r#"touch "$TEST_OUT/agent_ran""#);
    let backend = fx.backend(|config| {
        config.settings.setup_command = Some(r#"touch "$TEST_OUT/setup_ran""#.into());
    });
    let before = entries(&fx.base);
    for task_id in ["../escape", "a/../../escape", "/abs/path", "..", ".", ""] {
        let failure = run(&backend, fx.task(task_id)).await.unwrap_err();
        assert_eq!(
            failure,
            TaskFailure {
                reason: FailureReason::WorkspaceSetup,
                exit_code: 0,
                error: "invalid task ID for workspace path: invalid task ID".into(),
            },
            "{task_id:?}"
        );
    }
    assert_eq!(entries(&fx.base), before);
    assert!(entries(&fx.root).is_empty());
    assert!(entries(&fx.out).is_empty());
    assert!(!Path::new("/abs/path").exists());
}

#[tokio::test]
async fn target_dir_is_used_and_never_deleted() {
    let fx = Fixture::new(
        r#"pwd > "$TEST_OUT/pwd"
echo "$GIT_CONFIG_GLOBAL" > "$TEST_OUT/git_config"
test -d "$(dirname "$GIT_CONFIG_GLOBAL")" && echo yes > "$TEST_OUT/git_dir_exists""#,
    );
    let target = fx.base.join("checkout");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("README"), "keep me").unwrap();
    let marker = fx.base.join("teardown_ran");
    let backend = fx.backend(|config| {
        config.settings.target_dir = Some(target.clone());
        config.settings.teardown_command = Some(format!("touch '{}'", marker.display()));
    });
    assert!(!fx.root.exists(), "no workspace root in target-dir mode");

    run(&backend, fx.task("task-target"))
        .await
        .expect("success");
    assert_eq!(
        std::fs::read_to_string(fx.out("pwd")).unwrap().trim(),
        target.to_str().unwrap()
    );
    assert_eq!(
        entries(&target),
        vec!["README"],
        "env file removed, dir kept"
    );
    let git_config = PathBuf::from(
        std::fs::read_to_string(fx.out("git_config"))
            .unwrap()
            .trim(),
    );
    let git_dir = git_config.parent().unwrap();
    assert_eq!(git_config.file_name().unwrap(), ".gitconfig");
    assert!(
        git_dir
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("oz-gitconfig-")
    );
    assert!(!git_dir.starts_with(&target));
    assert!(fx.out("git_dir_exists").exists());
    assert!(!git_dir.exists(), "temporary git config dir removed");
    assert!(marker.exists(), "teardown runs in target-dir mode");

    // Task ID validation applies in target-dir mode too.
    let failure = run(&backend, fx.task("../x")).await.unwrap_err();
    assert_eq!(failure.reason, FailureReason::WorkspaceSetup);
}

#[tokio::test]
async fn bad_target_dir_is_rejected_with_the_reference_messages() {
    let fx = Fixture::new("exit 0");
    let missing = fx.base.join("missing");
    let mut config = fx.config();
    config.settings.target_dir = Some(missing.clone());
    let error = DirectBackend::new(config)
        .err()
        .expect("missing target dir");
    assert_eq!(
        error.to_string(),
        format!(
            "target directory {0} does not exist: stat {0}: no such file or directory",
            missing.display()
        )
    );

    let file = fx.base.join("file");
    std::fs::write(&file, "").unwrap();
    let mut config = fx.config();
    config.settings.target_dir = Some(file.clone());
    let error = DirectBackend::new(config).err().expect("target is a file");
    assert_eq!(
        error,
        DirectSetupError::TargetDirNotADirectory { path: file.clone() }
    );
    assert_eq!(
        error.to_string(),
        format!("target directory {} is not a directory", file.display())
    );
}

#[tokio::test]
async fn unusable_workspace_root_is_a_startup_error() {
    let fx = Fixture::new("exit 0");
    let file = fx.base.join("file");
    std::fs::write(&file, "").unwrap();
    let root = file.join("root");
    let mut config = fx.config();
    config.settings.workspace_root = root.clone();
    let error = DirectBackend::new(config).err().expect("root below a file");
    assert_eq!(
        error.to_string(),
        format!(
            "failed to create workspace root {0}: mkdir {0}: not a directory",
            root.display()
        )
    );
}

#[tokio::test]
async fn cancellation_terminates_the_whole_process_group() {
    let fx = Fixture::new(
        r#"sleep 1000 &
echo $! > "$TEST_OUT/grandchild"
echo $$ > "$TEST_OUT/leader"
sleep 1000"#,
    );
    let marker = fx.base.join("teardown_ran");
    let backend = fx.backend(|config| {
        config.settings.teardown_command = Some(format!("touch '{}'", marker.display()));
    });
    let cancel = CancellationToken::new();
    let (result, (leader, grandchild, cancelled_at)) = tokio::join!(
        run_with(&backend, fx.task("task-cancel"), cancel.clone()),
        async {
            let grandchild = wait_for_pid(&fx.out("grandchild")).await;
            let leader = wait_for_pid(&fx.out("leader")).await;
            cancel.cancel();
            (leader, grandchild, Instant::now())
        }
    );
    let elapsed = cancelled_at.elapsed();
    assert_eq!(
        result.unwrap_err(),
        TaskFailure {
            reason: FailureReason::TaskCancelled,
            exit_code: 143,
            error: "context canceled".into(),
        }
    );
    assert!(elapsed < GRACE + Duration::from_secs(2), "took {elapsed:?}");
    assert_dies(leader).await;
    assert_dies(grandchild).await;
    assert!(marker.exists(), "teardown runs after a cancellation");
    assert!(!fx.workspace("task-cancel").exists());
}

#[tokio::test]
async fn processes_ignoring_sigterm_are_killed_after_the_grace() {
    let fx = Fixture::new(
        r#"trap '' TERM
sleep 1000 &
echo $! > "$TEST_OUT/grandchild"
echo $$ > "$TEST_OUT/leader"
sleep 1000"#,
    );
    let backend = fx.backend(|_| {});
    let cancel = CancellationToken::new();
    let (result, (leader, grandchild, cancelled_at)) = tokio::join!(
        run_with(&backend, fx.task("task-stubborn"), cancel.clone()),
        async {
            let grandchild = wait_for_pid(&fx.out("grandchild")).await;
            let leader = wait_for_pid(&fx.out("leader")).await;
            cancel.cancel();
            (leader, grandchild, Instant::now())
        }
    );
    let elapsed = cancelled_at.elapsed();
    assert_eq!(
        result.unwrap_err(),
        TaskFailure {
            reason: FailureReason::TaskCancelled,
            exit_code: 137,
            error: "context canceled".into(),
        }
    );
    assert!(
        elapsed >= GRACE,
        "SIGKILL only after the grace: {elapsed:?}"
    );
    assert!(elapsed < GRACE + Duration::from_secs(2), "took {elapsed:?}");
    assert_dies(leader).await;
    assert_dies(grandchild).await;
}

#[tokio::test]
async fn stragglers_are_killed_when_the_agent_exits() {
    let fx = Fixture::new(
        r#"sleep 1000 &
echo $! > "$TEST_OUT/grandchild"
exit 0"#,
    );
    let backend = fx.backend(|_| {});
    run(&backend, fx.task("task-straggler"))
        .await
        .expect("success");
    let grandchild = wait_for_pid(&fx.out("grandchild")).await;
    assert_dies(grandchild).await;
}

#[tokio::test]
async fn cancelling_the_setup_command_stops_it() {
    let fx = Fixture::new(r#"touch "$TEST_OUT/agent_ran""#);
    let backend = fx.backend(|config| {
        config.settings.setup_command = Some(
            r#"sleep 1000 &
echo $! > "$TEST_OUT/grandchild"
echo $$ > "$TEST_OUT/setup"
sleep 1000"#
                .into(),
        );
    });
    let cancel = CancellationToken::new();
    let (result, (setup, grandchild)) = tokio::join!(
        run_with(&backend, fx.task("task-setupcancel"), cancel.clone()),
        async {
            let grandchild = wait_for_pid(&fx.out("grandchild")).await;
            let setup = wait_for_pid(&fx.out("setup")).await;
            cancel.cancel();
            (setup, grandchild)
        }
    );
    let failure = result.unwrap_err();
    assert_eq!(failure.reason, FailureReason::TaskCancelled);
    assert_eq!(failure.error, "context canceled");
    assert_eq!(failure.exit_code, 143);
    assert_dies(setup).await;
    assert_dies(grandchild).await;
    assert!(!fx.out("agent_ran").exists());
}

#[tokio::test]
async fn cancelled_before_start_runs_nothing_but_cleans_up() {
    let fx = Fixture::new(r#"touch "$TEST_OUT/agent_ran""#);
    let backend = fx.backend(|config| {
        config.settings.setup_command = Some(r#"touch "$TEST_OUT/setup_ran""#.into());
    });
    let cancel = CancellationToken::new();
    cancel.cancel();
    let failure = run_with(&backend, fx.task("task-early"), cancel)
        .await
        .unwrap_err();
    assert_eq!(
        failure,
        TaskFailure {
            reason: FailureReason::TaskCancelled,
            exit_code: 0,
            error: "context canceled".into(),
        }
    );
    assert!(entries(&fx.out).is_empty(), "neither setup nor agent ran");
    assert!(!fx.workspace("task-early").exists());
}

#[tokio::test]
async fn dropping_the_execution_kills_the_process_group() {
    let fx = Fixture::new(
        r#"sleep 1000 &
echo $! > "$TEST_OUT/grandchild"
echo $$ > "$TEST_OUT/leader"
sleep 1000"#,
    );
    let backend = fx.backend(|_| {});
    let (dropped, (leader, grandchild)) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(1),
            backend.execute(fx.task("task-drop"), CancellationToken::new()),
        ),
        async {
            let grandchild = wait_for_pid(&fx.out("grandchild")).await;
            let leader = wait_for_pid(&fx.out("leader")).await;
            (leader, grandchild)
        }
    );
    assert!(dropped.is_err(), "the execution was still running");
    assert_dies(leader).await;
    assert_dies(grandchild).await;
}

#[tokio::test]
async fn shutdown_keeps_kept_workspaces_and_never_touches_other_agents_ones() {
    let fx = Fixture::new("exit 0");
    let backend = fx.backend(|config| config.cleanup = false);
    run(&backend, fx.task("task-a")).await.expect("success");
    run(&backend, fx.task("task-b")).await.expect("success");
    let foreign = fx.root.join("other-agents-task");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::remove_dir_all(fx.workspace("task-b")).unwrap();

    backend.shutdown(Duration::from_secs(5)).await;
    assert_eq!(entries(&fx.root), vec!["other-agents-task", "task-a"]);

    let cleaning = fx.backend(|_| {});
    run(&cleaning, fx.task("task-c")).await.expect("success");
    cleaning.shutdown(Duration::from_secs(5)).await;
    assert_eq!(entries(&fx.root), vec!["other-agents-task", "task-a"]);
}
