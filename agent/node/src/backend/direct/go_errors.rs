//! Go-compatible error texts: the reference worker is written in Go, and Oz users see its
//! wording (`exit status 3`, `signal: killed`, `mkdir /x: permission denied`), so the
//! direct backend words its failures the same way.

use std::borrow::Cow;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use nix::errno::Errno;

/// The exit status normalised to 128+signal for signal deaths.
pub(super) fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(0)
}

/// Go's `ProcessState.String()`: `exit status 3`, `signal: terminated`,
/// `signal: segmentation fault (core dumped)`.
pub(super) fn go_exit_text(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(signal) => {
            let mut text = format!("signal: {}", go_signal_name(signal));
            if status.core_dumped() {
                text.push_str(" (core dumped)");
            }
            text
        }
        None => status.to_string(),
    }
}

/// Go's names of the Linux signals (`syscall.Signal.String()`).
pub(super) fn go_signal_name(signal: i32) -> Cow<'static, str> {
    let name = match signal {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGSTKFLT => "stack fault",
        libc::SIGCHLD => "child exited",
        libc::SIGCONT => "continued",
        libc::SIGSTOP => "stopped (signal)",
        libc::SIGTSTP => "stopped",
        libc::SIGTTIN => "stopped (tty input)",
        libc::SIGTTOU => "stopped (tty output)",
        libc::SIGURG => "urgent I/O condition",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        libc::SIGVTALRM => "virtual timer expired",
        libc::SIGPROF => "profiling timer expired",
        libc::SIGWINCH => "window changed",
        libc::SIGIO => "I/O possible",
        #[cfg(any(target_os = "linux", target_os = "android"))]
        libc::SIGPWR => "power failure",
        libc::SIGSYS => "bad system call",
        other => return Cow::Owned(format!("signal {other}")),
    };
    Cow::Borrowed(name)
}

/// Go's text for an OS error (`no such file or directory`), else the error's own text.
pub(super) fn go_errno_text(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => {
            let description = Errno::from_raw(code).desc();
            let mut chars = description.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => description.to_owned(),
            }
        }
        None => error.to_string(),
    }
}

/// Go's `*PathError` text: `<op> <path>: <errno text>`.
pub(super) fn go_path_error(op: &str, path: &Path, error: &io::Error) -> String {
    format!("{op} {}: {}", path.display(), go_errno_text(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_texts_follow_go() {
        let exited = ExitStatus::from_raw(3 << 8);
        assert_eq!(go_exit_text(exited), "exit status 3");
        assert_eq!(exit_code(exited), 3);

        let exited_143 = ExitStatus::from_raw(143 << 8);
        assert_eq!(go_exit_text(exited_143), "exit status 143");
        assert_eq!(exit_code(exited_143), 143);

        let terminated = ExitStatus::from_raw(libc::SIGTERM);
        assert_eq!(go_exit_text(terminated), "signal: terminated");
        assert_eq!(exit_code(terminated), 143);

        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(go_exit_text(killed), "signal: killed");
        assert_eq!(exit_code(killed), 137);

        let interrupted = ExitStatus::from_raw(libc::SIGINT);
        assert_eq!(go_exit_text(interrupted), "signal: interrupt");
        assert_eq!(exit_code(interrupted), 130);

        let core = ExitStatus::from_raw(libc::SIGSEGV | 0x80);
        assert_eq!(
            go_exit_text(core),
            "signal: segmentation fault (core dumped)"
        );
        assert_eq!(exit_code(core), 139);

        assert_eq!(go_signal_name(40), "signal 40");
    }

    #[test]
    fn go_error_texts() {
        let error = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(
            go_path_error("mkdir", Path::new("/x"), &error),
            "mkdir /x: permission denied"
        );
        let custom = io::Error::other("boom");
        assert_eq!(go_errno_text(&custom), "boom");
    }
}
