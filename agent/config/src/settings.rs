//! Per-backend settings after merging: defaults applied, durations and
//! quantities parsed, raw Kubernetes objects converted to JSON.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use crate::quantity::Quantity;

/// Direct backend's workspace root when none is configured.
pub const DEFAULT_WORKSPACE_ROOT: &str = "/var/lib/oz/workspaces";
/// Kubernetes namespace when none is configured.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Image of the Kubernetes startup preflight Job when none is configured.
pub const DEFAULT_PREFLIGHT_IMAGE: &str = "busybox:1.36";
/// How long a task pod may stay unschedulable before the task fails.
pub const DEFAULT_UNSCHEDULABLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Job `ttlSecondsAfterFinished` when cleanup is on and none is configured.
pub const DEFAULT_TTL_SECONDS_AFTER_FINISHED: i32 = 86_400;
/// Command backend's dispatch timeout when none (or a non-positive one) is
/// configured.
pub const DEFAULT_DISPATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Kubernetes `imagePullPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ImagePullPolicy {
    /// `Always`.
    Always,
    /// `Never`.
    Never,
    /// `IfNotPresent`, the default.
    #[default]
    IfNotPresent,
}

impl ImagePullPolicy {
    /// Parses the exact Kubernetes spelling (case-sensitive, as the API is).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "Always" => Some(Self::Always),
            "Never" => Some(Self::Never),
            "IfNotPresent" => Some(Self::IfNotPresent),
            _ => None,
        }
    }

    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::Never => "Never",
            Self::IfNotPresent => "IfNotPresent",
        }
    }
}

/// Docker backend settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DockerSettings {
    /// File `volumes` followed by `--volumes`.
    pub volumes: Vec<String>,
    /// When to pull the task image; the reference always pulls.
    pub image_pull_policy: ImagePullPolicy,
    /// Container network mode; `None` = the daemon's default.
    pub network_mode: Option<String>,
}

/// Direct backend settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectSettings {
    /// Parent of per-task workspaces; [`DEFAULT_WORKSPACE_ROOT`] by default.
    pub workspace_root: PathBuf,
    /// Shared task directory: `--target-dir`, else the file's `target_dir`.
    pub target_dir: Option<PathBuf>,
    /// oz binary; `None` means look up `oz` on `PATH`.
    pub oz_path: Option<PathBuf>,
    /// Shell command run before each task.
    pub setup_command: Option<String>,
    /// Shell command run after each task.
    pub teardown_command: Option<String>,
}

impl Default for DirectSettings {
    fn default() -> Self {
        Self {
            workspace_root: PathBuf::from(DEFAULT_WORKSPACE_ROOT),
            target_dir: None,
            oz_path: None,
            setup_command: None,
            teardown_command: None,
        }
    }
}

/// Kubernetes backend settings.
#[derive(Clone, Debug, PartialEq)]
pub struct KubernetesSettings {
    /// Namespace for task Jobs; [`DEFAULT_NAMESPACE`] by default.
    pub namespace: String,
    /// Explicit kubeconfig; `None` means in-cluster, then default loading rules.
    pub kubeconfig: Option<PathBuf>,
    /// Task image when the server sends none.
    pub default_image: Option<String>,
    /// Pull policy for worker-built containers.
    pub image_pull_policy: ImagePullPolicy,
    /// Mount sidecars as image volumes instead of copying them.
    pub use_image_volumes: bool,
    /// Preflight Job image; [`DEFAULT_PREFLIGHT_IMAGE`] by default.
    pub preflight_image: String,
    /// Replaces the server's `/agent` sidecar image.
    pub sidecar_image: Option<String>,
    /// Setup init-container command.
    pub setup_command: Option<String>,
    /// preStop teardown command.
    pub teardown_command: Option<String>,
    /// Extra labels for Jobs and pods.
    pub extra_labels: BTreeMap<String, String>,
    /// Extra annotations for Jobs and pods.
    pub extra_annotations: BTreeMap<String, String>,
    /// Job `activeDeadlineSeconds`; `None` means no deadline.
    pub active_deadline_seconds: Option<i64>,
    /// Job `ttlSecondsAfterFinished`: `None` when cleanup is disabled (Jobs
    /// are kept), else the configured value or
    /// [`DEFAULT_TTL_SECONDS_AFTER_FINISHED`].
    pub ttl_seconds_after_finished: Option<i32>,
    /// `sizeLimit` of the workspace emptyDir.
    pub workspace_size_limit: Option<Quantity>,
    /// Unschedulable fail-fast timeout; [`Duration::ZERO`] disables it.
    pub unschedulable_timeout: Duration,
    /// Harness name → sidecar image, copied from the file.
    pub coding_cli_sidecars: BTreeMap<String, String>,
    /// `pod_template` as a JSON object (a Kubernetes PodSpec).
    pub pod_template: Option<serde_json::Value>,
    /// `preflight_resources` as a JSON object (Kubernetes
    /// ResourceRequirements) with valid quantities.
    pub preflight_resources: Option<serde_json::Value>,
}

/// Command backend settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSettings {
    /// Shell command receiving the dispatch payload on stdin; never empty.
    pub dispatch_command: String,
    /// Shell command run on cancellation.
    pub cancel_command: Option<String>,
    /// Always positive; [`DEFAULT_DISPATCH_TIMEOUT`] by default.
    pub dispatch_timeout: Duration,
}
