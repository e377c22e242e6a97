//! Oz's self-hosted worker WebSocket protocol (spec `oz-agent-worker.md` §1.5–1.9).
//!
//! Every frame is a text frame holding one `{"type": …, "data": {…}}` object. Parsing is
//! as lenient as the reference worker (unknown keys ignored, `null` read as the zero value)
//! except where the reference crashes: a missing `task` is a clear error here.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

/// Default upstream WebSocket endpoint of Oz.
pub const DEFAULT_WEB_SOCKET_URL: &str = "wss://oz.warp.dev/api/v1/selfhosted/worker/ws";
/// Default Oz server root, handed to tasks.
pub const DEFAULT_SERVER_ROOT_URL: &str = "https://app.warp.dev";
/// Path of the worker WebSocket on an Oz server.
pub const WORKER_WEB_SOCKET_PATH: &str = "/api/v1/selfhosted/worker/ws";

/// The only rejection reason the reference worker sends.
pub const REJECTED_AT_CAPACITY: &str = "worker at maximum concurrency";
pub const COMPLETED_MESSAGE: &str = "Task completed successfully";
pub const CANCELLED_MESSAGE: &str = "Task cancelled by user request.";
pub const CANCELLED_TASK_STATE: &str = "CANCELLED";
/// User-facing text for failures caused by an interrupted (cancelled) context.
pub const INTERRUPTED_MESSAGE: &str = "The task was interrupted due to an infrastructure issue (context canceled). This is typically transient — please try again.";
/// User-facing text for failures caused by a deadline.
pub const TIMEOUT_MESSAGE: &str = "The task exceeded its maximum allowed execution time and was terminated. Consider breaking the task into smaller steps or increasing the timeout.";

/// User-facing message for a backend failure, as the reference words it.
pub fn failed_to_execute_message(error: &str) -> String {
    format!("Failed to execute task: {error}")
}

pub mod message_type {
    pub const TASK_ASSIGNMENT: &str = "task_assignment";
    pub const TASK_CANCELLATION: &str = "task_cancellation";
    pub const TASK_CLAIMED: &str = "task_claimed";
    pub const TASK_REJECTED: &str = "task_rejected";
    pub const TASK_COMPLETED: &str = "task_completed";
    pub const TASK_FAILED: &str = "task_failed";
}

/// The bounded set of failure reasons (also the `failure_reason` wire values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    Unknown,
    TaskTimeout,
    TaskCancelled,
    GracefulShutdown,
    ImagePull,
    SidecarPrep,
    ContainerCreate,
    ContainerStart,
    ContainerWait,
    ContainerExit,
    ContainerOom,
    WorkspaceSetup,
    SetupCommand,
    AgentInvocation,
    TeardownCommand,
    DispatchCommand,
    DispatchTimeout,
    CancelCommand,
    JobCreate,
    JobWatch,
    JobFailed,
    Evicted,
    PodWatch,
    Unschedulable,
    VolumeMount,
    InitContainer,
    InvalidImage,
    ActiveDeadline,
    Cleanup,
}

impl FailureReason {
    pub const ALL: [FailureReason; 29] = [
        Self::Unknown,
        Self::TaskTimeout,
        Self::TaskCancelled,
        Self::GracefulShutdown,
        Self::ImagePull,
        Self::SidecarPrep,
        Self::ContainerCreate,
        Self::ContainerStart,
        Self::ContainerWait,
        Self::ContainerExit,
        Self::ContainerOom,
        Self::WorkspaceSetup,
        Self::SetupCommand,
        Self::AgentInvocation,
        Self::TeardownCommand,
        Self::DispatchCommand,
        Self::DispatchTimeout,
        Self::CancelCommand,
        Self::JobCreate,
        Self::JobWatch,
        Self::JobFailed,
        Self::Evicted,
        Self::PodWatch,
        Self::Unschedulable,
        Self::VolumeMount,
        Self::InitContainer,
        Self::InvalidImage,
        Self::ActiveDeadline,
        Self::Cleanup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::TaskTimeout => "task_timeout",
            Self::TaskCancelled => "task_cancelled",
            Self::GracefulShutdown => "graceful_shutdown",
            Self::ImagePull => "image_pull",
            Self::SidecarPrep => "sidecar_prep",
            Self::ContainerCreate => "container_create",
            Self::ContainerStart => "container_start",
            Self::ContainerWait => "container_wait",
            Self::ContainerExit => "container_exit",
            Self::ContainerOom => "container_oom",
            Self::WorkspaceSetup => "workspace_setup",
            Self::SetupCommand => "setup_command",
            Self::AgentInvocation => "agent_invocation",
            Self::TeardownCommand => "teardown_command",
            Self::DispatchCommand => "dispatch_command",
            Self::DispatchTimeout => "dispatch_timeout",
            Self::CancelCommand => "cancel_command",
            Self::JobCreate => "job_create",
            Self::JobWatch => "job_watch",
            Self::JobFailed => "job_failed",
            Self::Evicted => "evicted",
            Self::PodWatch => "pod_watch",
            Self::Unschedulable => "unschedulable",
            Self::VolumeMount => "volume_mount",
            Self::InitContainer => "init_container",
            Self::InvalidImage => "invalid_image",
            Self::ActiveDeadline => "active_deadline",
            Self::Cleanup => "cleanup",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|reason| reason.as_str() == value)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads `null` as the type's default, like Go's JSON decoder does for value fields.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// Per-task environment sent by Oz. It carries credentials (`WARP_API_KEY`,
/// `GITHUB_ACCESS_TOKEN`, …), so its `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EnvVars(pub BTreeMap<String, String>);

impl fmt::Debug for EnvVars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|name| (name, "<redacted>")))
            .finish()
    }
}

/// `data` of a `task_assignment` message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskAssignment {
    pub task_id: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub execution_id: String,
    pub task: Task,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub docker_image: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub sidecar_image: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "env_is_empty"
    )]
    pub env_vars: EnvVars,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub additional_sidecars: Vec<SidecarMount>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub additional_oz_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_shape: Option<InstanceShape>,
}

fn env_is_empty(env: &EnvVars) -> bool {
    env.0.is_empty()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarMount {
    #[serde(default, deserialize_with = "null_as_default")]
    pub image: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub mount_path: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub read_write: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceShape {
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_zero"
    )]
    pub vcpus: i64,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_zero"
    )]
    pub memory_gb: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Task {
    #[serde(default, deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_definition: Option<TaskDefinition>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub created_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub updated_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_config_snapshot: Option<AgentConfig>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub agent_conversation_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskDefinition {
    #[serde(default, deserialize_with = "null_as_default")]
    pub prompt: String,
}

/// Owner of a task; Oz spells these keys capitalised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(rename = "Type", default, deserialize_with = "null_as_default")]
    pub kind: String,
    #[serde(rename = "Id", default, deserialize_with = "null_as_default")]
    pub id: i64,
}

impl Owner {
    pub fn is_team(&self) -> bool {
        self.kind == "TEAM"
    }
}

/// `agent_config_snapshot` (Oz's AmbientAgentConfig as the worker sees it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentConfig {
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub environment_id: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub base_prompt: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub model_id: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub profile_id: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub skill_spec: String,
    /// Server name → configuration, each kept as the exact JSON text received.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "McpServers::is_empty"
    )]
    pub mcp_servers: McpServers,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_use_enabled: Option<bool>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_zero"
    )]
    pub idle_timeout_minutes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harness: Option<Harness>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harness_auth_secrets: Option<HarnessAuthSecrets>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_providers: Option<InferenceProviders>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_sharing: Option<SessionSharing>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_false"
    )]
    pub snapshot_disabled: bool,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_zero"
    )]
    pub snapshot_upload_timeout_secs: i64,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_zero"
    )]
    pub snapshot_script_timeout_secs: i64,
}

/// MCP server configurations. They often carry credentials (headers, env), so `Debug`
/// shows the server names only.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct McpServers(pub BTreeMap<String, Box<RawValue>>);

impl McpServers {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for McpServers {
    type Target = BTreeMap<String, Box<RawValue>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl fmt::Debug for McpServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|name| (name, "<redacted>")))
            .finish()
    }
}

impl AgentConfig {
    /// The harness type as sent (untrimmed), if any.
    pub fn harness_type(&self) -> Option<&str> {
        self.harness.as_ref().and_then(|h| h.kind.as_deref())
    }

    /// Oz's own harness: no harness, no type, an empty type or exactly `oz`.
    pub fn is_oz_harness(&self) -> bool {
        matches!(self.harness_type(), None | Some("") | Some("oz"))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Harness {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HarnessAuthSecrets {
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub claude_auth_secret_name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InferenceProviders {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsInferenceProvider>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AwsInferenceProvider {
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_false"
    )]
    pub disabled: bool,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub role_arn: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub region: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionSharing {
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub public_access: String,
}

/// `data` of a `task_cancellation` message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCancellation {
    pub task_id: String,
}

/// A message from the server, parsed.
#[derive(Debug)]
pub enum ServerMessage {
    TaskAssignment {
        assignment: Box<TaskAssignment>,
        /// The `data` object exactly as received, relayed verbatim to nodes.
        raw_data: Box<RawValue>,
    },
    TaskCancellation(TaskCancellation),
}

/// Why an incoming frame was ignored. Texts never include field values (they may be secrets).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame is not a JSON message envelope: {0}")]
    NotAnEnvelope(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("{message_type} message has no data")]
    MissingData { message_type: String },
    #[error("{message_type} data is invalid: {reason}")]
    InvalidData {
        message_type: String,
        reason: String,
    },
}

#[derive(Deserialize)]
struct IncomingEnvelope<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Parses one text frame from the server.
pub fn parse_server_message(text: &str) -> Result<ServerMessage, FrameError> {
    let envelope: IncomingEnvelope<'_> = serde_json::from_str(text)
        .map_err(|error| FrameError::NotAnEnvelope(redacted_serde_error(&error)))?;
    let data = || {
        envelope
            .data
            .filter(|raw| raw.get() != "null")
            .ok_or_else(|| FrameError::MissingData {
                message_type: envelope.kind.clone(),
            })
    };
    match envelope.kind.as_str() {
        message_type::TASK_ASSIGNMENT => {
            let raw = data()?;
            let assignment: TaskAssignment = parse_data(&envelope.kind, raw)?;
            if assignment.task_id.is_empty() {
                return Err(FrameError::InvalidData {
                    message_type: envelope.kind,
                    reason: "task_id is empty".into(),
                });
            }
            Ok(ServerMessage::TaskAssignment {
                assignment: Box::new(assignment),
                raw_data: raw.to_owned(),
            })
        }
        message_type::TASK_CANCELLATION => {
            let cancellation: TaskCancellation = parse_data(&envelope.kind, data()?)?;
            Ok(ServerMessage::TaskCancellation(cancellation))
        }
        _ => Err(FrameError::UnknownType(envelope.kind)),
    }
}

/// Parses an assignment `data` object relayed verbatim (as a node receives it).
pub fn parse_assignment_data(raw: &[u8]) -> Result<TaskAssignment, FrameError> {
    let text = std::str::from_utf8(raw).map_err(|_| FrameError::InvalidData {
        message_type: message_type::TASK_ASSIGNMENT.into(),
        reason: "not UTF-8".into(),
    })?;
    let raw: &RawValue = serde_json::from_str(text).map_err(|error| FrameError::InvalidData {
        message_type: message_type::TASK_ASSIGNMENT.into(),
        reason: redacted_serde_error(&error),
    })?;
    parse_data(message_type::TASK_ASSIGNMENT, raw)
}

fn parse_data<T: DeserializeOwned>(message_type: &str, raw: &RawValue) -> Result<T, FrameError> {
    // serde reads a struct from a JSON array too (fields by position); Go's decoder, and
    // so Oz's protocol, knows objects only. (Found by the parser's property test.)
    if !raw.get().trim_start().starts_with('{') {
        return Err(FrameError::InvalidData {
            message_type: message_type.to_owned(),
            reason: "expected a JSON object".into(),
        });
    }
    serde_json::from_str(raw.get()).map_err(|error| FrameError::InvalidData {
        message_type: message_type.to_owned(),
        reason: redacted_serde_error(&error),
    })
}

/// The text of a serde_json error with the values it quotes blanked.
///
/// serde's messages quote offending values (`invalid type: string "sk-…"`); values may
/// be credentials, so everything quoted is blanked unless the message names a field
/// (`missing field`, `unknown field`, `duplicate field`). The position (`at line L column
/// C`) is kept. Use it wherever a parse error of a document that may hold secrets is
/// logged or returned.
pub fn redacted_serde_error(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let (message, position) = match text.rfind(" at line ") {
        Some(index) => text.split_at(index),
        None => (text.as_str(), ""),
    };
    let names_a_field = ["missing field", "unknown field", "duplicate field"]
        .iter()
        .any(|prefix| message.starts_with(prefix));
    if names_a_field {
        return text;
    }
    let mut redacted = String::with_capacity(message.len());
    let mut open_quote: Option<char> = None;
    for ch in message.chars() {
        match open_quote {
            Some(quote) if ch == quote => {
                redacted.push('…');
                redacted.push(ch);
                open_quote = None;
            }
            Some(_) => {}
            None if ch == '"' || ch == '`' => {
                redacted.push(ch);
                open_quote = Some(ch);
            }
            None => redacted.push(ch),
        }
    }
    redacted.push_str(position);
    redacted
}

/// A message from the worker to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum WorkerMessage {
    TaskClaimed(TaskClaimed),
    TaskRejected(TaskRejected),
    TaskCompleted(TaskCompleted),
    TaskFailed(TaskFailed),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskClaimed {
    pub task_id: String,
    #[serde(default)]
    pub worker_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRejected {
    pub task_id: String,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCompleted {
    pub task_id: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_state: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailed {
    pub task_id: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub failure_reason: String,
    /// Normalised exit status; omitted when none was observed (0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

impl WorkerMessage {
    pub fn task_id(&self) -> &str {
        match self {
            Self::TaskClaimed(m) => &m.task_id,
            Self::TaskRejected(m) => &m.task_id,
            Self::TaskCompleted(m) => &m.task_id,
            Self::TaskFailed(m) => &m.task_id,
        }
    }

    pub fn message_type(&self) -> &'static str {
        match self {
            Self::TaskClaimed(_) => message_type::TASK_CLAIMED,
            Self::TaskRejected(_) => message_type::TASK_REJECTED,
            Self::TaskCompleted(_) => message_type::TASK_COMPLETED,
            Self::TaskFailed(_) => message_type::TASK_FAILED,
        }
    }

    pub fn claimed(task_id: &str, worker_id: &str) -> Self {
        Self::TaskClaimed(TaskClaimed {
            task_id: task_id.into(),
            worker_id: worker_id.into(),
        })
    }

    pub fn rejected_at_capacity(task_id: &str) -> Self {
        Self::TaskRejected(TaskRejected {
            task_id: task_id.into(),
            reason: REJECTED_AT_CAPACITY.into(),
        })
    }

    pub fn completed(task_id: &str) -> Self {
        Self::TaskCompleted(TaskCompleted {
            task_id: task_id.into(),
            message: COMPLETED_MESSAGE.into(),
            task_state: None,
        })
    }

    pub fn cancelled(task_id: &str) -> Self {
        Self::TaskCompleted(TaskCompleted {
            task_id: task_id.into(),
            message: CANCELLED_MESSAGE.into(),
            task_state: Some(CANCELLED_TASK_STATE.into()),
        })
    }

    /// `exit_code` 0 means "none observed" and is omitted on the wire.
    pub fn failed(task_id: &str, reason: FailureReason, message: String, exit_code: i32) -> Self {
        Self::TaskFailed(TaskFailed {
            task_id: task_id.into(),
            message,
            failure_reason: reason.as_str().into(),
            exit_code: (exit_code != 0).then_some(exit_code),
        })
    }

    /// The text frame, encoded like Go's `encoding/json` (`<`, `>`, `&` escaped).
    pub fn to_frame(&self) -> String {
        let json = serde_json::to_string(self).expect("worker messages always serialize");
        go_html_escape(&json)
    }
}

/// Go's JSON encoder escapes `<`, `>`, `&`, U+2028 and U+2029 inside strings. Outside
/// strings these characters cannot occur in JSON, so a plain replacement is exact.
pub fn go_html_escape(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        match ch {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            _ => out.push(ch),
        }
    }
    out
}

/// Parses a worker → server frame (what a control plane receives).
pub fn parse_worker_message(text: &str) -> Result<WorkerMessage, FrameError> {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(rename = "type")]
        kind: String,
    }
    let envelope: Envelope = serde_json::from_str(text)
        .map_err(|error| FrameError::NotAnEnvelope(redacted_serde_error(&error)))?;
    match envelope.kind.as_str() {
        message_type::TASK_CLAIMED
        | message_type::TASK_REJECTED
        | message_type::TASK_COMPLETED
        | message_type::TASK_FAILED => {
            serde_json::from_str(text).map_err(|error| FrameError::InvalidData {
                message_type: envelope.kind.clone(),
                reason: redacted_serde_error(&error),
            })
        }
        _ => Err(FrameError::UnknownType(envelope.kind)),
    }
}

/// Builds a server → worker `task_assignment` frame from its `data` object.
pub fn assignment_frame(data: &serde_json::Value) -> String {
    serde_json::json!({ "type": message_type::TASK_ASSIGNMENT, "data": data }).to_string()
}

/// Builds a server → worker `task_cancellation` frame.
pub fn cancellation_frame(task_id: &str) -> String {
    serde_json::json!({ "type": message_type::TASK_CANCELLATION, "data": { "task_id": task_id } })
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"{"type":"task_assignment","data":{
      "task_id":"019f-run","execution_id":"019f-exec","docker_image":"my/img:1",
      "sidecar_image":"docker.io/warpdotdev/warp-agent:latest",
      "env_vars":{"GITHUB_ACCESS_TOKEN":"ghp_secret"},
      "additional_sidecars":[{"image":"docker.io/warpdotdev/claude-cli:latest","mount_path":"/mnt/claude-cli-sidecar","read_write":true}],
      "additional_oz_args":["--skip-initial-turn"],
      "instance_shape":{"vcpus":4,"memory_gb":16},
      "task":{"id":"019f-run","title":"Fix bug","task_definition":{"prompt":"do it"},
              "created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z",
              "owner":{"Type":"TEAM","Id":42},
              "agent_config_snapshot":{"model_id":"m1","harness":{"type":"claude"},
                 "mcp_servers":{"b":{"url":"x"},"a":{"command":"y"}}}}}}"#;

    fn assignment(text: &str) -> (TaskAssignment, String) {
        match parse_server_message(text).expect("parses") {
            ServerMessage::TaskAssignment {
                assignment,
                raw_data,
            } => (*assignment, raw_data.get().to_owned()),
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    #[test]
    fn data_given_as_an_array_is_refused_like_go_does() {
        // Regression (found by tests/fuzz_oz_messages.rs): serde would read the struct's
        // fields by position from an array.
        let error = parse_server_message(r#"{"type":"task_assignment","data":[" ",null,[]]}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected a JSON object"), "{error}");
        let error = parse_assignment_data(br#"["t","e"]"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected a JSON object"), "{error}");
    }

    #[test]
    fn parses_every_field_of_the_spec_example() {
        let (a, raw) = assignment(SPEC_EXAMPLE);
        assert_eq!(a.task_id, "019f-run");
        assert_eq!(a.execution_id, "019f-exec");
        assert_eq!(a.docker_image, "my/img:1");
        assert_eq!(a.sidecar_image, "docker.io/warpdotdev/warp-agent:latest");
        assert_eq!(a.env_vars.0["GITHUB_ACCESS_TOKEN"], "ghp_secret");
        assert_eq!(
            a.additional_sidecars,
            vec![SidecarMount {
                image: "docker.io/warpdotdev/claude-cli:latest".into(),
                mount_path: "/mnt/claude-cli-sidecar".into(),
                read_write: true
            }]
        );
        assert_eq!(a.additional_oz_args, vec!["--skip-initial-turn"]);
        assert_eq!(
            a.instance_shape,
            Some(InstanceShape {
                vcpus: 4,
                memory_gb: 16
            })
        );
        assert_eq!(a.task.id, "019f-run");
        assert_eq!(a.task.title, "Fix bug");
        assert_eq!(a.task.task_definition.unwrap().prompt, "do it");
        assert_eq!(
            a.task.created_at.unwrap(),
            time::macros::datetime!(2026-01-01 0:00 UTC)
        );
        let owner = a.task.owner.unwrap();
        assert!(owner.is_team());
        assert_eq!(owner.id, 42);
        let config = a.task.agent_config_snapshot.unwrap();
        assert_eq!(config.model_id, "m1");
        assert_eq!(config.harness_type(), Some("claude"));
        assert!(!config.is_oz_harness());
        assert_eq!(config.mcp_servers["b"].get(), r#"{"url":"x"}"#);
        assert!(raw.contains("ghp_secret"), "raw data is relayed verbatim");
    }

    #[test]
    fn nulls_read_as_zero_values_like_go() {
        let (a, _) = assignment(
            r#"{"type":"task_assignment","data":{"task_id":"t","execution_id":null,"env_vars":null,
               "additional_oz_args":null,"task":{"id":"t","title":null,"owner":null}}}"#,
        );
        assert_eq!(a.execution_id, "");
        assert!(a.env_vars.0.is_empty());
        assert!(a.task.owner.is_none());
    }

    #[test]
    fn bad_frames_are_errors_naming_the_problem() {
        let cases = [
            ("not json", "not a JSON message envelope"),
            (
                r#"{"type":"heartbeat"}"#,
                "unknown message type \"heartbeat\"",
            ),
            (
                r#"{"type":"bogus","data":{}}"#,
                "unknown message type \"bogus\"",
            ),
            (
                r#"{"type":"task_assignment"}"#,
                "task_assignment message has no data",
            ),
            (r#"{"type":"task_assignment","data":null}"#, "has no data"),
            (
                r#"{"type":"task_assignment","data":{"task_id":"t"}}"#,
                "missing field `task`",
            ),
            (
                r#"{"type":"task_assignment","data":{"task_id":"t","task":{"created_at":"yesterday"}}}"#,
                "task_assignment data is invalid",
            ),
            (
                r#"{"type":"task_assignment","data":{"task_id":"","task":{}}}"#,
                "task_id is empty",
            ),
            (
                r#"{"type":"task_cancellation","data":{}}"#,
                "missing field `task_id`",
            ),
            (r#"{"type":7,"data":{}}"#, "not a JSON message envelope"),
        ];
        for (frame, expected) in cases {
            let error = parse_server_message(frame).expect_err(frame).to_string();
            assert!(error.contains(expected), "{frame}: {error}");
        }
    }

    #[test]
    fn wrong_typed_values_are_not_echoed() {
        let frame = r#"{"type":"task_assignment","data":{"task_id":"t","task":{},
            "env_vars":{"WARP_API_KEY":12345678}}}"#;
        let error = parse_server_message(frame).unwrap_err().to_string();
        assert!(error.contains("invalid type"), "{error}");
        assert!(!error.contains("12345678"), "{error}");
        let frame = r#"{"type":"task_assignment","data":{"task_id":"t","task":{},
            "instance_shape":{"vcpus":"sk-secret-value"}}}"#;
        let error = parse_server_message(frame).unwrap_err().to_string();
        assert!(!error.contains("sk-secret-value"), "{error}");
    }

    #[test]
    fn env_vars_and_mcp_configs_debug_hide_values() {
        let (a, _) = assignment(SPEC_EXAMPLE);
        let shown = format!("{a:?}");
        assert!(shown.contains("GITHUB_ACCESS_TOKEN"));
        assert!(!shown.contains("ghp_secret"), "{shown}");
        assert!(shown.contains("\"b\": \"<redacted>\""), "{shown}");
        assert!(!shown.contains("command"), "{shown}");
    }

    #[test]
    fn worker_messages_match_the_reference_bytes() {
        assert_eq!(
            WorkerMessage::claimed("t1", "w1").to_frame(),
            r#"{"type":"task_claimed","data":{"task_id":"t1","worker_id":"w1"}}"#
        );
        assert_eq!(
            WorkerMessage::rejected_at_capacity("t1").to_frame(),
            r#"{"type":"task_rejected","data":{"task_id":"t1","reason":"worker at maximum concurrency"}}"#
        );
        assert_eq!(
            WorkerMessage::completed("t1").to_frame(),
            r#"{"type":"task_completed","data":{"task_id":"t1","message":"Task completed successfully"}}"#
        );
        assert_eq!(
            WorkerMessage::cancelled("t1").to_frame(),
            r#"{"type":"task_completed","data":{"task_id":"t1","message":"Task cancelled by user request.","task_state":"CANCELLED"}}"#
        );
        assert_eq!(
            WorkerMessage::failed(
                "t1",
                FailureReason::AgentInvocation,
                "Failed to execute task: <boom> & more".into(),
                143
            )
            .to_frame(),
            r#"{"type":"task_failed","data":{"task_id":"t1","message":"Failed to execute task: \u003cboom\u003e \u0026 more","failure_reason":"agent_invocation","exit_code":143}}"#
        );
        let no_exit = WorkerMessage::failed("t1", FailureReason::Unknown, "x".into(), 0).to_frame();
        assert!(!no_exit.contains("exit_code"), "{no_exit}");
    }

    #[test]
    fn worker_messages_round_trip() {
        for message in [
            WorkerMessage::claimed("a", "w"),
            WorkerMessage::rejected_at_capacity("a"),
            WorkerMessage::completed("a"),
            WorkerMessage::cancelled("a"),
            WorkerMessage::failed("a", FailureReason::SetupCommand, "m <x>".into(), 2),
        ] {
            assert_eq!(parse_worker_message(&message.to_frame()).unwrap(), message);
        }
        assert!(parse_worker_message(r#"{"type":"heartbeat"}"#).is_err());
    }

    #[test]
    fn failure_reasons_round_trip_and_are_29() {
        assert_eq!(FailureReason::ALL.len(), 29);
        for reason in FailureReason::ALL {
            assert_eq!(FailureReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(FailureReason::parse("nope"), None);
    }
}
