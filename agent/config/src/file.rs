//! The YAML config file of oz-agent-worker: schema, loading and validation.
//!
//! The schema is strict (unknown keys are errors at every level) except for
//! `pod_template` and `preflight_resources`, which are raw Kubernetes objects.

use std::{collections::BTreeMap, fmt, path::Path};

use serde::Deserialize;

use crate::{
    env::{EnvEntry, contains_space_or_tab},
    serde_helpers::{nullable, optional_yaml11_bool, yaml11_bool},
    settings::ImagePullPolicy,
};

/// Top level of the config file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Empty when absent; `--worker-id` takes precedence.
    #[serde(default, deserialize_with = "nullable")]
    pub worker_id: String,
    /// `None` when absent, which means cleanup is enabled.
    #[serde(default, deserialize_with = "optional_yaml11_bool")]
    pub cleanup: Option<bool>,
    /// `None` when absent.
    #[serde(default)]
    pub max_concurrent_tasks: Option<i64>,
    /// Passed to oz verbatim (e.g. `45m`); `None` when absent.
    #[serde(default)]
    pub idle_on_complete: Option<String>,
    /// Backend blocks; at most one may be present.
    #[serde(default, deserialize_with = "nullable")]
    pub backend: BackendConfig,
}

/// `backend:`. A block whose value is null (`docker:` with nothing under it)
/// is absent; `docker: {}` is present.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `backend.docker`.
    #[serde(default)]
    pub docker: Option<DockerConfig>,
    /// `backend.direct`.
    #[serde(default)]
    pub direct: Option<DirectConfig>,
    /// `backend.kubernetes`.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
    /// `backend.command`.
    #[serde(default)]
    pub command: Option<CommandConfig>,
}

/// `backend.docker`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// `HOST:CONTAINER[:MODE]` binds, passed to the daemon as written.
    #[serde(default, deserialize_with = "nullable")]
    pub volumes: Vec<String>,
    /// Task environment.
    #[serde(default, deserialize_with = "nullable")]
    pub environment: Vec<EnvEntry>,
    /// ozfleet extension: `Always` (the reference's behaviour, default), `IfNotPresent`
    /// or `Never`.
    #[serde(default, deserialize_with = "nullable")]
    pub image_pull_policy: String,
    /// ozfleet extension: the containers' network mode (`host`, `none`, a network name);
    /// empty = the daemon's default.
    #[serde(default, deserialize_with = "nullable")]
    pub network_mode: String,
}

/// `backend.direct`. Empty strings mean "not set".
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectConfig {
    /// Parent of per-task workspaces.
    #[serde(default, deserialize_with = "nullable")]
    pub workspace_root: String,
    /// Shared directory used instead of per-task workspaces.
    #[serde(default, deserialize_with = "nullable")]
    pub target_dir: String,
    /// oz binary; looked up on `PATH` when empty.
    #[serde(default, deserialize_with = "nullable")]
    pub oz_path: String,
    /// Shell command run before each task.
    #[serde(default, deserialize_with = "nullable")]
    pub setup_command: String,
    /// Shell command run after each task.
    #[serde(default, deserialize_with = "nullable")]
    pub teardown_command: String,
    /// Task environment.
    #[serde(default, deserialize_with = "nullable")]
    pub environment: Vec<EnvEntry>,
}

/// `backend.kubernetes`. Empty strings mean "not set".
///
/// The pre-`pod_template` keys (`image_pull_secret`, `service_account`,
/// `node_selector`, `tolerations`, `resources`,
/// `termination_grace_period_seconds`, `environment`) are unknown fields:
/// they must move into `pod_template`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Namespace for task Jobs.
    #[serde(default, deserialize_with = "nullable")]
    pub namespace: String,
    /// Kubeconfig path.
    #[serde(default, deserialize_with = "nullable")]
    pub kubeconfig: String,
    /// Task image when the server sends none; no spaces or tabs.
    #[serde(default, deserialize_with = "nullable")]
    pub default_image: String,
    /// `Always`, `Never` or `IfNotPresent`.
    #[serde(default, deserialize_with = "nullable")]
    pub image_pull_policy: String,
    /// Mount sidecars as image volumes instead of copying them.
    #[serde(default, deserialize_with = "yaml11_bool")]
    pub use_image_volumes: bool,
    /// Image for the startup preflight Job; no spaces or tabs.
    #[serde(default, deserialize_with = "nullable")]
    pub preflight_image: String,
    /// Replaces the server's `/agent` sidecar image; no spaces or tabs.
    #[serde(default, deserialize_with = "nullable")]
    pub sidecar_image: String,
    /// Init-container shell command.
    #[serde(default, deserialize_with = "nullable")]
    pub setup_command: String,
    /// preStop shell command.
    #[serde(default, deserialize_with = "nullable")]
    pub teardown_command: String,
    /// Labels added to Jobs and pods.
    #[serde(default, deserialize_with = "nullable")]
    pub extra_labels: BTreeMap<String, String>,
    /// Annotations added to Jobs and pods.
    #[serde(default, deserialize_with = "nullable")]
    pub extra_annotations: BTreeMap<String, String>,
    /// Job `activeDeadlineSeconds`.
    #[serde(default)]
    pub active_deadline_seconds: Option<i64>,
    /// Job `ttlSecondsAfterFinished` when cleanup is enabled.
    #[serde(default)]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Kubernetes quantity for the workspace emptyDir, e.g. `10Gi`.
    #[serde(default, deserialize_with = "nullable")]
    pub workspace_size_limit: String,
    /// Go duration; `None` when absent (an explicit empty string is invalid).
    #[serde(default)]
    pub unschedulable_timeout: Option<String>,
    /// Harness name → sidecar image.
    #[serde(default, deserialize_with = "nullable")]
    pub coding_cli_sidecars: BTreeMap<String, String>,
    /// Raw Kubernetes PodSpec, kept as written.
    #[serde(default)]
    pub pod_template: Option<serde_yaml::Value>,
    /// Raw Kubernetes ResourceRequirements for preflight containers.
    #[serde(default)]
    pub preflight_resources: Option<serde_yaml::Value>,
}

/// `backend.command`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Shell command that receives the dispatch payload; required.
    #[serde(default, deserialize_with = "nullable")]
    pub dispatch_command: String,
    /// Shell command run on cancellation.
    #[serde(default, deserialize_with = "nullable")]
    pub cancel_command: String,
    /// Go duration; empty means the default.
    #[serde(default, deserialize_with = "nullable")]
    pub dispatch_timeout: String,
    /// Environment for the dispatch and cancel commands.
    #[serde(default, deserialize_with = "nullable")]
    pub environment: Vec<EnvEntry>,
}

/// Loading or validating the config file failed. Display matches the
/// reference; the underlying error is part of the message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file: {}: {reason}", path.display())]
    Read {
        /// Path as given.
        path: std::path::PathBuf,
        /// The I/O failure.
        reason: std::io::Error,
    },
    /// Not YAML, or not this schema (unknown key, wrong type), or empty.
    #[error("failed to parse config file: {0}")]
    Parse(ParseError),
    /// Parsed, but breaks a rule; every broken rule is listed.
    #[error("invalid config: {}", Issues(.0))]
    Invalid(Vec<ValidationError>),
}

/// Why the text is not a config document.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// No YAML document at all (empty or comments only). Go's decoder
    /// reports this as a bare `EOF`.
    #[error("EOF")]
    Empty,
    /// YAML syntax, unknown key or type mismatch; names the key and position.
    #[error(transparent)]
    Yaml(serde_yaml::Error),
}

/// One broken rule, worded like go-playground/validator as the reference
/// formats it. Namespaces use the Go struct names
/// (`FileConfig.Backend.Docker.Environment[0].Name`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A required field is empty.
    #[error("{0} is required")]
    Required(String),
    /// The field contains a space or tab.
    #[error("{0} must not contain whitespace")]
    ContainsWhitespace(String),
    /// More than one `backend.*` block is present.
    #[error("at most one backend may be configured")]
    MultipleBackends,
    /// The value is not one of the allowed ones (`tag` is the validator tag).
    #[error("{namespace} failed validation \"{tag}\"")]
    Failed {
        /// Go namespace of the field.
        namespace: String,
        /// Validator tag, e.g. `oneof`.
        tag: &'static str,
    },
}

/// Displays issues joined by `; `, as the reference does.
pub(crate) struct Issues<'a>(pub(crate) &'a [ValidationError]);

impl fmt::Display for Issues<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

impl FileConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
            path: path.to_owned(),
            reason,
        })?;
        Self::from_yaml_str(&text)
    }

    /// Parses and validates config text.
    ///
    /// Like the reference's decoder, only the first YAML document is read.
    pub fn from_yaml_str(text: &str) -> Result<Self, ConfigError> {
        if !has_yaml_content(text) {
            return Err(ConfigError::Parse(ParseError::Empty));
        }
        let first = serde_yaml::Deserializer::from_str(text)
            .next()
            .ok_or(ConfigError::Parse(ParseError::Empty))?;
        let config =
            Self::deserialize(first).map_err(|e| ConfigError::Parse(ParseError::Yaml(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules the schema alone cannot express, reporting every
    /// violation in the reference's order (fields first, then the
    /// one-backend rule).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let issues = self.validation_issues();
        if issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(issues))
        }
    }

    /// Every broken rule, in the order [`FileConfig::validate`] reports them.
    pub fn validation_issues(&self) -> Vec<ValidationError> {
        let mut issues = Vec::new();
        let backend = &self.backend;
        if let Some(docker) = &backend.docker {
            check_environment(
                &mut issues,
                "FileConfig.Backend.Docker",
                &docker.environment,
            );
            if !docker.image_pull_policy.is_empty()
                && ImagePullPolicy::from_name(&docker.image_pull_policy).is_none()
            {
                issues.push(ValidationError::Failed {
                    namespace: "FileConfig.Backend.Docker.ImagePullPolicy".into(),
                    tag: "oneof",
                });
            }
            if contains_space_or_tab(&docker.network_mode) {
                issues.push(ValidationError::ContainsWhitespace(
                    "FileConfig.Backend.Docker.NetworkMode".into(),
                ));
            }
        }
        if let Some(direct) = &backend.direct {
            check_environment(
                &mut issues,
                "FileConfig.Backend.Direct",
                &direct.environment,
            );
        }
        if let Some(kubernetes) = &backend.kubernetes {
            check_kubernetes(&mut issues, kubernetes);
        }
        if let Some(command) = &backend.command {
            const NS: &str = "FileConfig.Backend.Command";
            if command.dispatch_command.is_empty() {
                issues.push(ValidationError::Required(format!("{NS}.DispatchCommand")));
            }
            check_environment(&mut issues, NS, &command.environment);
        }
        let present = [
            backend.docker.is_some(),
            backend.direct.is_some(),
            backend.kubernetes.is_some(),
            backend.command.is_some(),
        ];
        if present.into_iter().filter(|p| *p).count() > 1 {
            issues.push(ValidationError::MultipleBackends);
        }
        issues
    }
}

/// False for text that is blank or only comments. serde_yaml reads that as an
/// empty mapping, but the reference's decoder fails with EOF, so an
/// accidentally emptied file must not silently start a default worker.
fn has_yaml_content(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim_start_matches(['\u{feff}', ' ', '\t']);
        !line.is_empty() && !line.starts_with('#')
    })
}

fn check_environment(issues: &mut Vec<ValidationError>, parent: &str, entries: &[EnvEntry]) {
    for (i, entry) in entries.iter().enumerate() {
        let namespace = format!("{parent}.Environment[{i}].Name");
        if entry.name.is_empty() {
            issues.push(ValidationError::Required(namespace));
        } else if contains_space_or_tab(&entry.name) {
            issues.push(ValidationError::ContainsWhitespace(namespace));
        }
    }
}

fn check_kubernetes(issues: &mut Vec<ValidationError>, config: &KubernetesConfig) {
    // Message order follows the reference's struct field order.
    check_image(issues, "DefaultImage", &config.default_image);
    if !config.image_pull_policy.is_empty()
        && ImagePullPolicy::from_name(&config.image_pull_policy).is_none()
    {
        issues.push(ValidationError::Failed {
            namespace: format!("{KUBERNETES_NS}.ImagePullPolicy"),
            tag: "oneof",
        });
    }
    check_image(issues, "PreflightImage", &config.preflight_image);
    check_image(issues, "SidecarImage", &config.sidecar_image);
}

const KUBERNETES_NS: &str = "FileConfig.Backend.Kubernetes";

fn check_image(issues: &mut Vec<ValidationError>, field: &str, value: &str) {
    if contains_space_or_tab(value) {
        issues.push(ValidationError::ContainsWhitespace(format!(
            "{KUBERNETES_NS}.{field}"
        )));
    }
}
