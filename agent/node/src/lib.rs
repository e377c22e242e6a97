//! ozfleet node agent: dials the gateway, advertises its capacity and runs tasks.

pub mod argv;
pub mod backend;
pub mod identity;
pub mod images;
pub mod node;
pub mod reported;
pub mod task_env;

pub use node::{CancelSource, NodeConfig, run};
