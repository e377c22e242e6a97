//! Merging CLI flags with the config file, with the reference's precedence:
//! flags > file > defaults.

use std::{fmt, path::PathBuf};

use crate::{
    duration::{DurationError, parse_go_duration},
    env::{EnvEntry, EnvFlagError, EnvNames, overlay_env, parse_env_flag, resolve_env},
    file::{
        BackendConfig, CommandConfig, DirectConfig, FileConfig, Issues, KubernetesConfig,
        ValidationError,
    },
    quantity::{Quantity, QuantityError},
    quote::strconv_quote,
    raw,
    settings::{
        CommandSettings, DEFAULT_DISPATCH_TIMEOUT, DEFAULT_NAMESPACE, DEFAULT_PREFLIGHT_IMAGE,
        DEFAULT_TTL_SECONDS_AFTER_FINISHED, DEFAULT_UNSCHEDULABLE_TIMEOUT, DEFAULT_WORKSPACE_ROOT,
        DirectSettings, DockerSettings, ImagePullPolicy, KubernetesSettings,
    },
};

/// The worker's flags as the CLI parsed them (the CLI layer owns flag syntax,
/// including the reference's `,` splitting of `--env` and `--volumes`).
/// Empty strings count as "not given", as they do in the reference.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WorkerFlags {
    /// `--backend`.
    pub backend: Option<String>,
    /// `--worker-id`.
    pub worker_id: Option<String>,
    /// `--target-dir` (direct backend only).
    pub target_dir: Option<PathBuf>,
    /// `--no-cleanup`.
    pub no_cleanup: bool,
    /// `--env`/`-e` entries: `KEY=VALUE` or bare `KEY`.
    pub env: Vec<String>,
    /// `--volumes`/`-v` entries (Docker only).
    pub volumes: Vec<String>,
    /// `--max-concurrent-tasks`; 0 means "not given".
    pub max_concurrent_tasks: i64,
    /// `--idle-on-complete`.
    pub idle_on_complete: Option<String>,
}

/// `--env` values may be secrets, so Debug lists their keys only.
impl fmt::Debug for WorkerFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_keys: Vec<&str> = self
            .env
            .iter()
            .map(|entry| entry.split_once('=').map_or(entry.as_str(), |(key, _)| key))
            .collect();
        f.debug_struct("WorkerFlags")
            .field("backend", &self.backend)
            .field("worker_id", &self.worker_id)
            .field("target_dir", &self.target_dir)
            .field("no_cleanup", &self.no_cleanup)
            .field("env", &env_keys)
            .field("volumes", &self.volumes)
            .field("max_concurrent_tasks", &self.max_concurrent_tasks)
            .field("idle_on_complete", &self.idle_on_complete)
            .finish()
    }
}

/// The task-execution backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendName {
    /// Containers on a Docker daemon; used when nothing selects a backend.
    #[default]
    Docker,
    /// Processes on the host.
    Direct,
    /// Kubernetes Jobs.
    Kubernetes,
    /// An operator-supplied dispatch command.
    Command,
}

impl BackendName {
    /// Parses a `--backend` value.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "docker" => Some(Self::Docker),
            "direct" => Some(Self::Direct),
            "kubernetes" => Some(Self::Kubernetes),
            "command" => Some(Self::Command),
            _ => None,
        }
    }

    /// The flag / config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Direct => "direct",
            Self::Kubernetes => "kubernetes",
            Self::Command => "command",
        }
    }
}

impl fmt::Display for BackendName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What decided the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendSource {
    /// `--backend`.
    Flag,
    /// The one `backend.*` block present in the file.
    ConfigFile,
    /// Nothing; Docker by default.
    Default,
}

/// Flags and file merged into what the worker runs with.
///
/// `docker` and `direct` always hold settings (defaults when their block is
/// absent); `kubernetes` and `command` are `Some` exactly when that backend is
/// selected, because only then are their values parsed and checked.
#[derive(Clone, PartialEq)]
pub struct MergedConfig {
    /// `--worker-id`, else `worker_id`; see [`MergedConfig::require_worker_id`].
    pub worker_id: Option<String>,
    /// The selected backend.
    pub backend: BackendName,
    /// What selected it.
    pub backend_source: BackendSource,
    /// Backend name for metrics and resource attributes: empty when nothing
    /// selected a backend, as the reference reports it.
    pub backend_name_for_telemetry: String,
    /// False with `--no-cleanup` or `cleanup: false`.
    pub cleanup: bool,
    /// ≤ 0 means unlimited.
    pub max_concurrent_tasks: i64,
    /// Passed to oz as `--idle-on-complete`.
    pub idle_on_complete: Option<String>,
    /// Operator task env: the selected backend's `environment` (not for
    /// Kubernetes, whose declarative env lives in `pod_template`), then
    /// `--env`, which wins per name.
    pub env: Vec<(String, String)>,
    /// Direct backend settings.
    pub direct: DirectSettings,
    /// Docker backend settings.
    pub docker: DockerSettings,
    /// Kubernetes backend settings, when selected.
    pub kubernetes: Option<KubernetesSettings>,
    /// Command backend settings, when selected.
    pub command: Option<CommandSettings>,
}

/// Env values may be secrets, so Debug lists their names only.
impl fmt::Debug for MergedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MergedConfig")
            .field("worker_id", &self.worker_id)
            .field("backend", &self.backend)
            .field("backend_source", &self.backend_source)
            .field(
                "backend_name_for_telemetry",
                &self.backend_name_for_telemetry,
            )
            .field("cleanup", &self.cleanup)
            .field("max_concurrent_tasks", &self.max_concurrent_tasks)
            .field("idle_on_complete", &self.idle_on_complete)
            .field("env", &EnvNames(&self.env))
            .field("direct", &self.direct)
            .field("docker", &self.docker)
            .field("kubernetes", &self.kubernetes)
            .field("command", &self.command)
            .finish()
    }
}

impl MergedConfig {
    /// The worker ID, or the reference's error when neither the flag nor the
    /// file set one.
    pub fn require_worker_id(&self) -> Result<&str, MergeError> {
        self.worker_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .ok_or(MergeError::WorkerIdRequired)
    }
}

/// Merging failed. Display matches the reference's fatal startup messages;
/// the underlying parse error is part of the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// No worker ID from the flag or the file.
    #[error("worker-id is required (via --worker-id flag or config file)")]
    WorkerIdRequired,
    /// The ID starts with `warp` (case-sensitive), which the server reserves.
    #[error("invalid worker-id: values starting with 'warp' are reserved and cannot be used")]
    ReservedWorkerId,
    /// The config file breaks a rule. [`FileConfig::load`] already rejects
    /// such files; this covers a `FileConfig` built or edited in code.
    #[error("invalid config: {}", Issues(.0))]
    InvalidConfig(Vec<ValidationError>),
    /// `--backend` is not a known backend.
    #[error(
        "invalid --backend {}: must be one of docker, direct, kubernetes, command",
        strconv_quote(.0)
    )]
    UnknownBackend(String),
    /// An `--env` entry is malformed.
    #[error(transparent)]
    EnvFlag(#[from] EnvFlagError),
    /// `backend.kubernetes.workspace_size_limit` is not a quantity.
    #[error(
        "invalid backend.kubernetes.workspace_size_limit {}: {reason}",
        strconv_quote(.value)
    )]
    WorkspaceSizeLimit {
        /// The configured text.
        value: String,
        /// Why it is not a quantity.
        reason: QuantityError,
    },
    /// `backend.kubernetes.unschedulable_timeout` is not a Go duration.
    #[error(
        "invalid backend.kubernetes.unschedulable_timeout {}: {reason}",
        strconv_quote(.value)
    )]
    UnschedulableTimeout {
        /// The configured text.
        value: String,
        /// Why it is not a duration.
        reason: DurationError,
    },
    /// `backend.kubernetes.pod_template` is not a PodSpec object.
    #[error("invalid backend.kubernetes.pod_template: {0}")]
    PodTemplate(String),
    /// `backend.kubernetes.preflight_resources` is not ResourceRequirements.
    #[error("invalid backend.kubernetes.preflight_resources: {0}")]
    PreflightResources(String),
    /// `backend.command.dispatch_timeout` is not a Go duration.
    #[error(
        "invalid backend.command.dispatch_timeout {}: {reason}",
        strconv_quote(.value)
    )]
    DispatchTimeout {
        /// The configured text.
        value: String,
        /// Why it is not a duration.
        reason: DurationError,
    },
    /// The command backend was selected without a dispatch command (possible
    /// only via `--backend command`, since the file requires one).
    #[error("command backend requires a dispatch command")]
    MissingDispatchCommand,
}

/// Checks a worker ID: non-empty, and not in the server's reserved `warp`
/// prefix (case-sensitive, so `Warp-1` is allowed).
pub fn validate_worker_id(id: &str) -> Result<(), MergeError> {
    if id.is_empty() {
        Err(MergeError::WorkerIdRequired)
    } else if id.starts_with("warp") {
        Err(MergeError::ReservedWorkerId)
    } else {
        Ok(())
    }
}

/// Merges flags with an optional config file (validated again here, so a
/// `FileConfig` built in code gets the same checks as a loaded one).
///
/// `lookup_env` supplies the worker's environment for inherited entries
/// (`--env KEY`, `environment` items without `value`); pass
/// `&|k| std::env::var(k).ok()` in production.
///
/// A missing worker ID is not an error here (see
/// [`MergedConfig::require_worker_id`]); a reserved one is.
pub fn merge(
    flags: WorkerFlags,
    file: Option<FileConfig>,
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<MergedConfig, MergeError> {
    let file = file.unwrap_or_default();
    let issues = file.validation_issues();
    if !issues.is_empty() {
        return Err(MergeError::InvalidConfig(issues));
    }

    let worker_id = flags
        .worker_id
        .and_then(non_empty)
        .or_else(|| non_empty(file.worker_id));
    if let Some(id) = &worker_id {
        validate_worker_id(id)?;
    }

    let (backend, backend_source) = select_backend(flags.backend.as_deref(), &file.backend)?;
    let cleanup = !flags.no_cleanup && file.cleanup.unwrap_or(true);
    let cli_env = flags
        .env
        .iter()
        .map(|entry| parse_env_flag(entry))
        .collect::<Result<Vec<_>, _>>()?;
    let max_concurrent_tasks = match flags.max_concurrent_tasks {
        0 => file.max_concurrent_tasks.unwrap_or(0),
        n => n,
    };
    let idle_on_complete = flags
        .idle_on_complete
        .and_then(non_empty)
        .or_else(|| file.idle_on_complete.and_then(non_empty));

    let BackendConfig {
        docker,
        direct,
        kubernetes,
        command,
    } = file.backend;

    let file_env: &[EnvEntry] = match backend {
        BackendName::Docker => docker.as_ref().map_or(&[], |d| &d.environment),
        BackendName::Direct => direct.as_ref().map_or(&[], |d| &d.environment),
        BackendName::Command => command.as_ref().map_or(&[], |c| &c.environment),
        BackendName::Kubernetes => &[],
    };
    let mut env = resolve_env(file_env, lookup_env);
    overlay_env(&mut env, &cli_env, lookup_env);

    let docker = docker.unwrap_or_default();
    let mut volumes = docker.volumes;
    volumes.extend(flags.volumes);
    let docker = DockerSettings {
        volumes,
        image_pull_policy: ImagePullPolicy::from_name(&docker.image_pull_policy)
            .unwrap_or(ImagePullPolicy::Always),
        network_mode: non_empty(docker.network_mode),
    };

    let kubernetes = match backend {
        BackendName::Kubernetes => Some(kubernetes_settings(
            kubernetes.unwrap_or_default(),
            cleanup,
        )?),
        _ => None,
    };
    let command = match backend {
        BackendName::Command => Some(command_settings(command.unwrap_or_default())?),
        _ => None,
    };

    Ok(MergedConfig {
        worker_id,
        backend,
        backend_source,
        backend_name_for_telemetry: match backend_source {
            BackendSource::Default => String::new(),
            BackendSource::Flag | BackendSource::ConfigFile => backend.as_str().to_owned(),
        },
        cleanup,
        max_concurrent_tasks,
        idle_on_complete,
        env,
        direct: direct_settings(direct.unwrap_or_default(), flags.target_dir),
        docker,
        kubernetes,
        command,
    })
}

/// `--backend` > the block present in the file (checked in the reference's
/// order) > Docker. A flag that disagrees with the file's block wins; the
/// block is then ignored, as in the reference.
fn select_backend(
    flag: Option<&str>,
    blocks: &BackendConfig,
) -> Result<(BackendName, BackendSource), MergeError> {
    if let Some(name) = flag.filter(|name| !name.is_empty()) {
        let backend = BackendName::from_name(name)
            .ok_or_else(|| MergeError::UnknownBackend(name.to_owned()))?;
        return Ok((backend, BackendSource::Flag));
    }
    let inferred = [
        (blocks.direct.is_some(), BackendName::Direct),
        (blocks.kubernetes.is_some(), BackendName::Kubernetes),
        (blocks.command.is_some(), BackendName::Command),
        (blocks.docker.is_some(), BackendName::Docker),
    ]
    .into_iter()
    .find_map(|(present, backend)| present.then_some(backend));
    Ok(match inferred {
        Some(backend) => (backend, BackendSource::ConfigFile),
        None => (BackendName::Docker, BackendSource::Default),
    })
}

fn direct_settings(config: DirectConfig, target_dir_flag: Option<PathBuf>) -> DirectSettings {
    DirectSettings {
        workspace_root: non_empty(config.workspace_root)
            .map_or_else(|| PathBuf::from(DEFAULT_WORKSPACE_ROOT), PathBuf::from),
        target_dir: target_dir_flag
            .filter(|dir| !dir.as_os_str().is_empty())
            .or_else(|| non_empty(config.target_dir).map(PathBuf::from)),
        oz_path: non_empty(config.oz_path).map(PathBuf::from),
        setup_command: non_empty(config.setup_command),
        teardown_command: non_empty(config.teardown_command),
    }
}

fn kubernetes_settings(
    config: KubernetesConfig,
    cleanup: bool,
) -> Result<KubernetesSettings, MergeError> {
    let workspace_size_limit = match non_empty(config.workspace_size_limit) {
        None => None,
        Some(value) => Some(
            Quantity::parse(&value)
                .map_err(|reason| MergeError::WorkspaceSizeLimit { value, reason })?,
        ),
    };
    // An explicit empty string is parsed (and rejected) like in the reference:
    // only an absent key means "default".
    let unschedulable_timeout = match config.unschedulable_timeout {
        None => DEFAULT_UNSCHEDULABLE_TIMEOUT,
        Some(value) => parse_go_duration(&value)
            .map_err(|reason| MergeError::UnschedulableTimeout { value, reason })?,
    };
    let pod_template = config
        .pod_template
        .as_ref()
        .map(raw::pod_template)
        .transpose()
        .map_err(MergeError::PodTemplate)?;
    let preflight_resources = config
        .preflight_resources
        .as_ref()
        .map(raw::preflight_resources)
        .transpose()
        .map_err(MergeError::PreflightResources)?;

    Ok(KubernetesSettings {
        namespace: non_empty(config.namespace).unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        kubeconfig: non_empty(config.kubeconfig).map(PathBuf::from),
        default_image: non_empty(config.default_image),
        // Validated at the top of `merge`: only "" (unset) falls back.
        image_pull_policy: ImagePullPolicy::from_name(&config.image_pull_policy)
            .unwrap_or_default(),
        use_image_volumes: config.use_image_volumes,
        preflight_image: non_empty(config.preflight_image)
            .unwrap_or_else(|| DEFAULT_PREFLIGHT_IMAGE.into()),
        sidecar_image: non_empty(config.sidecar_image),
        setup_command: non_empty(config.setup_command),
        teardown_command: non_empty(config.teardown_command),
        extra_labels: config.extra_labels,
        extra_annotations: config.extra_annotations,
        active_deadline_seconds: config.active_deadline_seconds,
        ttl_seconds_after_finished: cleanup.then(|| {
            config
                .ttl_seconds_after_finished
                .unwrap_or(DEFAULT_TTL_SECONDS_AFTER_FINISHED)
        }),
        workspace_size_limit,
        unschedulable_timeout,
        coding_cli_sidecars: config.coding_cli_sidecars,
        pod_template,
        preflight_resources,
    })
}

fn command_settings(config: CommandConfig) -> Result<CommandSettings, MergeError> {
    let dispatch_timeout = match non_empty(config.dispatch_timeout) {
        None => None,
        Some(value) => Some(
            parse_go_duration(&value)
                .map_err(|reason| MergeError::DispatchTimeout { value, reason })?,
        ),
    };
    let dispatch_command =
        non_empty(config.dispatch_command).ok_or(MergeError::MissingDispatchCommand)?;
    Ok(CommandSettings {
        dispatch_command,
        cancel_command: non_empty(config.cancel_command),
        // The reference falls back to the default for a zero (or negative,
        // which parses as zero) timeout too.
        dispatch_timeout: dispatch_timeout
            .filter(|timeout| !timeout.is_zero())
            .unwrap_or(DEFAULT_DISPATCH_TIMEOUT),
    })
}

/// The reference's string fields use "" for "not set".
fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}
