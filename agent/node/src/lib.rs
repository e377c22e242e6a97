//! ozfleet node agent: dials the gateway, advertises its capacity and runs tasks.
//!
//! - [`node`]: the session with the gateway (attach, reconnect, accept, report, drain);
//! - [`backend`]: the [`TaskBackend`](backend::TaskBackend) trait, the Direct and Docker
//!   backends and building one from the worker configuration;
//! - [`argv`], [`task_env`], [`images`]: what a task runs with (spec §3);
//! - [`identity`], [`reported`]: what the node keeps in its state directory;
//! - [`tls`]: the node's side of mTLS on the node link.

pub mod argv;
pub mod backend;
pub mod identity;
pub mod images;
pub mod node;
pub mod observe;
pub mod outcomes;
pub mod reported;
pub mod task_env;
pub mod tls;

pub use node::{CancelSource, GatewayConnector, GrpcConnector, NodeConfig, run, run_observed};
pub use observe::NodeTelemetry;
