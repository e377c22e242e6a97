//! The Direct backend's task shim: `ozfleet __task-shim PROGRAM ARGS…` leads the task's
//! process group, runs PROGRAM in it and exits as PROGRAM did. Its job is the one thing
//! a node agent cannot do for itself: when the agent dies (even by SIGKILL), the kernel
//! tells the shim (parent-death signal), and the shim kills the whole group, so no task
//! process outlives the agent and its run's terminal report (which the gateway then sends
//! as `task_failed`). While the agent lives, the shim is transparent: cancellation's
//! SIGTERM reaches every process of the group as before, and the exit status (code or
//! signal) is mirrored exactly.

use std::process::ExitCode;

use nix::sys::signal::{SigHandler, SigSet, Signal, kill, killpg, raise, signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, getpgrp, getppid};

/// The argument that selects the shim (hidden from `--help`).
pub const ARGUMENT: &str = "__task-shim";

pub fn main(program_and_args: &[std::ffi::OsString]) -> ExitCode {
    let Some((program, args)) = program_and_args.split_first() else {
        eprintln!("ozfleet {ARGUMENT}: missing the program to run");
        return ExitCode::from(2);
    };
    let agent = getppid();
    // Block the signals we wait for before anything can deliver them.
    let mut waited = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        waited.add(signal);
    }
    if waited.thread_block().is_err() {
        return ExitCode::from(2);
    }
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    if getppid() != agent {
        // The agent died before the flag was set.
        let _ = killpg(getpgrp(), Signal::SIGKILL);
        return ExitCode::from(137);
    }
    let mut command = std::process::Command::new(program);
    command.args(args);
    // The child must not inherit the blocked signal mask.
    // SAFETY: between fork and exec only async-signal-safe calls are made.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            let mut all = SigSet::empty();
            for signal in [
                Signal::SIGTERM,
                Signal::SIGCHLD,
                Signal::SIGINT,
                Signal::SIGHUP,
            ] {
                all.add(signal);
            }
            all.thread_unblock().map_err(std::io::Error::from)
        });
    }
    let child = match command.spawn() {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(error) => {
            // Go's wording for a program that cannot start, as the agent would report.
            eprintln!("fork/exec {}: {error}", program.to_string_lossy());
            return ExitCode::from(127);
        }
    };
    loop {
        let Ok(received) = waited.wait() else {
            continue;
        };
        match received {
            Signal::SIGCHLD => match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return ExitCode::from(code as u8),
                Ok(WaitStatus::Signaled(_, signal_received, _)) => return mirror(signal_received),
                _ => continue,
            },
            _ if getppid() != agent => {
                // The agent is gone: nothing may outlive it.
                let _ = killpg(getpgrp(), Signal::SIGKILL);
                return ExitCode::from(137);
            }
            // The agent's own SIGTERM to the group (a cancellation) reached the program
            // too; wait for it to end.
            _ => {}
        }
    }
}

/// Ends the shim by the signal that ended the program, so the agent sees the same status.
fn mirror(received: Signal) -> ExitCode {
    // SAFETY: restoring the default action of a signal this process handles itself.
    unsafe {
        let _ = signal(received, SigHandler::SigDfl);
    }
    let mut unblock = SigSet::empty();
    unblock.add(received);
    let _ = unblock.thread_unblock();
    let _ = raise(received);
    let _ = kill(Pid::this(), received);
    // A signal whose default action is not to terminate: report it like a shell does.
    ExitCode::from(128u8.saturating_add(received as u8))
}
