//! Task processes in their own process group: start, stop (SIGTERM, then SIGKILL after a
//! grace period), make sure no descendant outlives its step, and read how a step ended.

use std::future::Future;
use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::go_errors::{exit_code, go_errno_text, go_exit_text};

/// Where task processes read and write. Like the reference, output goes to the node's own
/// stdout/stderr; every task process is wired here so capturing output is one change.
fn attach_task_stdio(command: &mut Command) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
}

/// How a task process ended.
#[derive(Debug)]
pub(super) enum ProcessEnd {
    Exited(ExitStatus),
    /// `stop` fired and the group was terminated; the leader's status if it was reaped.
    Stopped(Option<ExitStatus>),
    SpawnFailed(io::Error),
    WaitFailed(io::Error),
}

/// Runs `command` as the leader of a new process group. When `stop` completes first the
/// group gets SIGTERM, then SIGKILL after `grace`. Once the leader has exited, the group
/// is SIGKILLed so no descendant survives; dropping the returned future does the same.
pub(super) async fn run_in_process_group(
    mut command: Command,
    stop: impl Future<Output = ()>,
    grace: Duration,
) -> ProcessEnd {
    attach_task_stdio(&mut command);
    command.process_group(0).kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return ProcessEnd::SpawnFailed(error),
    };
    let mut group = ProcessGroup::led_by(&child);
    let end = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => ProcessEnd::Exited(status),
            Err(error) => ProcessEnd::WaitFailed(error),
        },
        () = stop => ProcessEnd::Stopped(group.terminate(&mut child, grace).await),
    };
    group.kill_remaining();
    end
}

/// A process group led by a spawned child; SIGKILLed on drop unless already killed.
/// (Signals do no I/O, so this guard is safe to run on any thread.)
struct ProcessGroup(Option<Pid>);

impl ProcessGroup {
    fn led_by(child: &Child) -> Self {
        Self(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw),
        )
    }

    fn signal(&self, signal: Signal) {
        let Some(group) = self.0 else { return };
        match killpg(group, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => tracing::warn!(%group, %signal, %error, "failed to signal process group"),
        }
    }

    /// SIGTERM, wait up to `grace` for the leader, then SIGKILL.
    async fn terminate(&self, child: &mut Child, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
            return status.ok();
        }
        tracing::warn!(?grace, "process group ignored SIGTERM; sending SIGKILL");
        self.signal(Signal::SIGKILL);
        child.wait().await.ok()
    }

    fn kill_remaining(&mut self) {
        self.signal(Signal::SIGKILL);
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

/// Outcome of a step that did not succeed.
pub(super) enum StepError {
    Cancelled {
        exit_code: i32,
    },
    /// `text` is Go's wording of the error (`exit status 3`, `signal: killed`, …).
    Failed {
        text: String,
        exit_code: i32,
    },
}

/// Maps how a process ended to the step result. Like the reference, a failure while the
/// task is being cancelled counts as a cancellation.
pub(super) fn interpret(
    end: ProcessEnd,
    cancel_requested: bool,
    program: &Path,
) -> Result<(), StepError> {
    match end {
        ProcessEnd::Exited(status) if status.success() => Ok(()),
        ProcessEnd::Exited(status) if cancel_requested => Err(StepError::Cancelled {
            exit_code: exit_code(status),
        }),
        ProcessEnd::Stopped(status) => Err(StepError::Cancelled {
            exit_code: status.map_or(0, exit_code),
        }),
        _ if cancel_requested => Err(StepError::Cancelled { exit_code: 0 }),
        ProcessEnd::Exited(status) => Err(StepError::Failed {
            text: go_exit_text(status),
            exit_code: exit_code(status),
        }),
        ProcessEnd::SpawnFailed(error) => Err(StepError::Failed {
            text: format!("fork/exec {}: {}", program.display(), go_errno_text(&error)),
            exit_code: 0,
        }),
        ProcessEnd::WaitFailed(error) => Err(StepError::Failed {
            text: format!("wait: {}", go_errno_text(&error)),
            exit_code: 0,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn step_interpretation() {
        let oz = Path::new("/opt/oz");
        assert!(interpret(ProcessEnd::Exited(ExitStatus::from_raw(0)), true, oz).is_ok());
        assert!(matches!(
            interpret(ProcessEnd::Exited(ExitStatus::from_raw(2 << 8)), false, oz),
            Err(StepError::Failed { text, exit_code: 2 }) if text == "exit status 2"
        ));
        assert!(matches!(
            interpret(ProcessEnd::Exited(ExitStatus::from_raw(2 << 8)), true, oz),
            Err(StepError::Cancelled { exit_code: 2 })
        ));
        assert!(matches!(
            interpret(ProcessEnd::Stopped(None), false, oz),
            Err(StepError::Cancelled { exit_code: 0 })
        ));
        let missing = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(matches!(
            interpret(ProcessEnd::SpawnFailed(missing), false, oz),
            Err(StepError::Failed { text, exit_code: 0 })
                if text == "fork/exec /opt/oz: no such file or directory"
        ));
        let missing = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(matches!(
            interpret(ProcessEnd::SpawnFailed(missing), true, oz),
            Err(StepError::Cancelled { exit_code: 0 })
        ));
    }
}
