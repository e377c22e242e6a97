//! Configuration of an ozfleet worker, compatible with Warp's
//! `oz-agent-worker`: the same YAML file, the same flag semantics, the same
//! precedence and the same error messages, so existing configs and scripts
//! keep working.
//!
//! The pipeline mirrors the reference's startup:
//!
//! 1. [`FileConfig::load`] reads, parses (strictly) and validates the file.
//! 2. The binary maps its parsed flags onto [`WorkerFlags`].
//! 3. [`merge`] combines both into a [`MergedConfig`], parsing durations and
//!    quantities and resolving the task environment.
//!
//! Nothing here touches the process environment directly: inherited
//! variables come from the lookup function handed to [`merge`].

mod duration;
mod env;
mod file;
mod merge;
mod quantity;
mod quote;
mod raw;
mod serde_helpers;
mod settings;

pub use duration::{DurationError, parse_go_duration};
pub use env::{EnvEntry, EnvFlagError, parse_env_flag, resolve_env};
pub use file::{
    BackendConfig, CommandConfig, ConfigError, DirectConfig, DockerConfig, FileConfig,
    KubernetesConfig, ParseError, ValidationError,
};
pub use merge::{
    BackendName, BackendSource, MergeError, MergedConfig, WorkerFlags, merge, validate_worker_id,
};
pub use quantity::{Quantity, QuantityError};
pub use settings::{
    CommandSettings, DEFAULT_DISPATCH_TIMEOUT, DEFAULT_NAMESPACE, DEFAULT_PREFLIGHT_IMAGE,
    DEFAULT_TTL_SECONDS_AFTER_FINISHED, DEFAULT_UNSCHEDULABLE_TIMEOUT, DEFAULT_WORKSPACE_ROOT,
    DirectSettings, DockerSettings, ImagePullPolicy, KubernetesSettings,
};
