//! The `ozfleet` binary: each subcommand wires one part of ozfleet (see the README).

mod cli;
mod commands;
mod demo_agent;
mod runtime;

pub use cli::main;
pub use commands::dev::processes_of_run;
