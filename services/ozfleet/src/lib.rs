//! The `ozfleet` binary: each subcommand wires one part of ozfleet (see the README).

mod cli;
mod commands;
mod demo_agent;
mod log_writer;
mod runtime;
mod task_shim;

pub use cli::main;
pub use commands::dev::processes_of_run;
