//! The JSON shapes of the run API (spec `oz-platform.md` §6), shared by the server
//! ([`crate::api`]) and the client ([`crate::client`]) so the two cannot drift apart.
//!
//! Fields are declared in the order they appear on the wire.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::listing::{SortField, SortOrder};
pub use crate::store::{RunState, Timestamp};

/// `POST /api/v1/agent/runs`: a run of `prompt` on the self-hosted worker named in
/// `config.worker_host`. The server reads more keys (`skill`, `team`, the rest of
/// `config`); `config` is sent and kept as it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRequest {
    pub prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub config: Map<String, Value>,
}

impl RunRequest {
    /// A run of `prompt` for the worker (or ozfleet gateway) whose id is `worker_host`.
    pub fn new(prompt: impl Into<String>, worker_host: impl Into<String>) -> Self {
        let mut config = Map::new();
        config.insert("worker_host".into(), Value::String(worker_host.into()));
        Self {
            prompt: prompt.into(),
            title: None,
            config,
        }
    }

    /// Sets the title; without one the server derives it from the prompt.
    pub fn with_title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Sets one `config` key (`docker_image`, `instance_shape`, `name`, …).
    pub fn with_config(mut self, key: impl Into<String>, value: Value) -> Self {
        self.config.insert(key.into(), value);
        self
    }
}

/// The answer to a run request. `at_capacity` is true when no connection of the run's
/// worker is open, so the run waits in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCreated {
    pub at_capacity: bool,
    pub run_id: String,
    pub state: RunState,
    pub task_id: String,
}

/// The answer to `POST /api/v1/agent/runs/{id}/cancel`. A queued run is cancelled at
/// once; a claimed one when its worker reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCancelled {
    pub run_id: String,
}

/// Oz's `RunItem`, limited to what this control plane knows, plus the worker-side
/// details (`claimed_by`, `execution_id`, `failure_reason`, `exit_code`,
/// `cancel_requested`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunItem {
    pub run_id: String,
    pub task_id: String,
    pub title: String,
    pub state: RunState,
    pub prompt: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub started_at: Option<Timestamp>,
    /// Set on failed runs only.
    pub status_message: Option<StatusMessage>,
    pub agent_config: Map<String, Value>,
    /// Always `REMOTE` here.
    pub execution_location: String,
    /// Always `API` here.
    pub source: String,
    pub claimed_by: Option<String>,
    pub execution_id: Option<String>,
    pub failure_reason: Option<String>,
    pub exit_code: Option<i32>,
    pub cancel_requested: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusMessage {
    pub message: String,
    pub error_code: Option<String>,
}

/// One page of `GET /api/v1/agent/runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPage {
    pub runs: Vec<RunItem>,
    pub page_info: PageInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageInfo {
    pub has_next_page: bool,
    /// Pass it as [`ListRuns::cursor`], with the same sort, for the next page.
    pub next_cursor: Option<String>,
}

/// The query of `GET /api/v1/agent/runs`; `None` and empty leave the server's default
/// (every state, most recently updated first, 20 runs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRuns {
    pub states: Vec<RunState>,
    /// Only runs whose `config.name` is this.
    pub name: Option<String>,
    pub limit: Option<usize>,
    pub sort_by: Option<SortField>,
    pub sort_order: Option<SortOrder>,
    pub cursor: Option<String>,
}

impl ListRuns {
    /// The query string's pairs, in the server's spelling.
    pub(crate) fn query_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if !self.states.is_empty() {
            let states: Vec<&str> = self.states.iter().map(|state| state.as_str()).collect();
            pairs.push(("state", states.join(",")));
        }
        if let Some(name) = &self.name {
            pairs.push(("name", name.clone()));
        }
        if let Some(limit) = self.limit {
            pairs.push(("limit", limit.to_string()));
        }
        if let Some(sort_by) = self.sort_by {
            pairs.push(("sort_by", sort_by.as_str().to_owned()));
        }
        if let Some(sort_order) = self.sort_order {
            pairs.push(("sort_order", sort_order.as_str().to_owned()));
        }
        if let Some(cursor) = &self.cursor {
            pairs.push(("cursor", cursor.clone()));
        }
        pairs
    }
}

/// The body of every error answer: a stable machine-readable `error` code
/// (`not_found`, `run_already_finished`, …) and a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
    pub message: String,
}
