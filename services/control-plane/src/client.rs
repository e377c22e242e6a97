//! A blocking client of the run API, for `ozfleet dev`, the test harnesses and command-line
//! tools. It speaks the JSON of [`crate::run_api`], the same types the server answers with.
//!
//! It blocks because its callers are synchronous (test harnesses, CLIs); async code calls
//! it from `tokio::task::spawn_blocking`.
//!
//! ```no_run
//! use ozfleet_control_plane::client::RunClient;
//! use ozfleet_control_plane::run_api::RunRequest;
//!
//! let client = RunClient::new("http://127.0.0.1:8080", "local-key".into());
//! let created = client.submit(&RunRequest::new("Say hello", "my-fleet"))?;
//! println!("{:?}", client.get(&created.run_id)?.state);
//! # Ok::<(), ozfleet_control_plane::client::ClientError>(())
//! ```

use std::time::Duration;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;

use crate::run_api::{
    ApiErrorBody, ListRuns, RunCancelled, RunCreated, RunItem, RunPage, RunRequest,
};

const RUNS_PATH: &str = "/api/v1/agent/runs";

/// What may not appear unescaped in one path segment: a run id is user input and must not
/// be able to reach another route (`/`, `?`, `#`).
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// What went wrong with a call. The API key appears in none of them.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: connection refused, DNS, timeout, or the connection failed mid-answer.
    #[error("{method} {url}: the control plane cannot be reached")]
    Unreachable {
        method: &'static str,
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// An answer other than 2xx; `body` is what the server said (for this control plane a
    /// JSON [`ApiErrorBody`], see [`ClientError::api_error`]).
    #[error("{method} {url} answered HTTP {status}: {body}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
    },
    /// A 2xx answer that is not the JSON this client expects.
    #[error("{method} {url} answered with JSON this client cannot read")]
    BadJson {
        method: &'static str,
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status of a [`ClientError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Unreachable { .. } | Self::BadJson { .. } => None,
        }
    }

    /// The server's error code and message, when the answer was an API error.
    pub fn api_error(&self) -> Option<ApiErrorBody> {
        match self {
            Self::Status { body, .. } => serde_json::from_str(body).ok(),
            Self::Unreachable { .. } | Self::BadJson { .. } => None,
        }
    }
}

/// A client of one control plane (or Oz) run API. Cloning is cheap and shares the
/// connection pool.
#[derive(Debug, Clone)]
pub struct RunClient {
    base_url: String,
    api_key: SecretString,
    agent: ureq::Agent,
}

impl RunClient {
    /// How long one call may take, connection and answer included, unless
    /// [`RunClient::with_timeout`] says otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A client of the API at `base_url` (`http://host:port`, no path), authenticating
    /// with `api_key` (the API key, or a run's own token).
    pub fn new(base_url: impl Into<String>, api_key: SecretString) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_owned();
        Self {
            base_url,
            api_key,
            agent: agent(Self::DEFAULT_TIMEOUT),
        }
    }

    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self {
            agent: agent(timeout),
            ..self
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /api/v1/agent/runs`: queues a run.
    pub fn submit(&self, request: &RunRequest) -> Result<RunCreated, ClientError> {
        let url = format!("{}{RUNS_PATH}", self.base_url);
        let sent = self
            .agent
            .post(&url)
            .header("Authorization", self.bearer())
            .send_json(request);
        read("POST", url, sent)
    }

    /// `GET /api/v1/agent/runs/{run_id}`.
    pub fn get(&self, run_id: &str) -> Result<RunItem, ClientError> {
        let url = self.run_url(run_id, "");
        let sent = self
            .agent
            .get(&url)
            .header("Authorization", self.bearer())
            .call();
        read("GET", url, sent)
    }

    /// `GET /api/v1/agent/runs`: one page; follow `page_info.next_cursor` for the next.
    pub fn list(&self, query: &ListRuns) -> Result<RunPage, ClientError> {
        let url = format!("{}{RUNS_PATH}", self.base_url);
        let sent = self
            .agent
            .get(&url)
            .header("Authorization", self.bearer())
            .query_pairs(query.query_pairs())
            .call();
        read("GET", url, sent)
    }

    /// `POST /api/v1/agent/runs/{run_id}/cancel`.
    pub fn cancel(&self, run_id: &str) -> Result<RunCancelled, ClientError> {
        let url = self.run_url(run_id, "/cancel");
        let sent = self
            .agent
            .post(&url)
            .header("Authorization", self.bearer())
            .send_empty();
        read("POST", url, sent)
    }

    fn run_url(&self, run_id: &str, suffix: &str) -> String {
        let run_id = utf8_percent_encode(run_id, PATH_SEGMENT);
        format!("{}{RUNS_PATH}/{run_id}{suffix}", self.base_url)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.api_key.expose_secret())
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        // Error answers carry a JSON body naming the problem; read it rather than
        // getting ureq's bare status error.
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// Reads an answer: 2xx as `T`, anything else as [`ClientError::Status`].
fn read<T: DeserializeOwned>(
    method: &'static str,
    url: String,
    sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<T, ClientError> {
    let unreachable = |url: String, error: ureq::Error| ClientError::Unreachable {
        method,
        url,
        source: Box::new(error),
    };
    let mut response = match sent {
        Ok(response) => response,
        Err(error) => return Err(unreachable(url, error)),
    };
    let status = response.status();
    let body = match response.body_mut().read_to_string() {
        Ok(body) => body,
        Err(error) => return Err(unreachable(url, error)),
    };
    if !status.is_success() {
        return Err(ClientError::Status {
            method,
            url,
            status: status.as_u16(),
            body,
        });
    }
    serde_json::from_str(&body).map_err(|source| ClientError::BadJson {
        method,
        url,
        source,
    })
}
