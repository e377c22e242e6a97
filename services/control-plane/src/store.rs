//! Runs persisted in SQLite, so a restart of the control plane loses nothing.
//!
//! Calls run synchronously on the caller's thread: every statement touches a handful of
//! indexed rows of a local file, and WAL with `synchronous = NORMAL` does not fsync on
//! commit, so a critical section costs microseconds and would cost more as a
//! `spawn_blocking` round trip.

use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::types::{Type, Value as SqlValue};
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::auth::RunToken;
use crate::listing::{RunListQuery, SortOrder};

/// Bumped whenever the schema changes; `PRAGMA user_version` holds the applied one.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run_id           TEXT PRIMARY KEY,
    title            TEXT NOT NULL,
    prompt           TEXT NOT NULL,
    skill            TEXT,
    team             INTEGER NOT NULL,
    agent_config     TEXT NOT NULL,
    worker_host      TEXT NOT NULL,
    state            TEXT NOT NULL,
    run_token        TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    claimed_by       TEXT,
    execution_id     TEXT,
    status_message   TEXT,
    failure_reason   TEXT,
    exit_code        INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_state_and_age ON runs (state, created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_by_created_at ON runs (created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_by_updated_at ON runs (updated_at, run_id);
CREATE INDEX IF NOT EXISTS runs_by_claimer ON runs (claimed_by, cancel_requested);
";

const RUN_COLUMNS: &str = "run_id, title, prompt, skill, team, agent_config, worker_host, state, \
     run_token, created_at, updated_at, started_at, claimed_by, execution_id, status_message, \
     failure_reason, exit_code, cancel_requested";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "database schema version {found} is newer than this control plane understands ({SCHEMA_VERSION})"
    )]
    SchemaTooNew { found: i64 },
}

/// Run states this control plane moves runs through (a subset of Oz's `RunState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    Queued,
    Claimed,
    InProgress,
    Succeeded,
    Failed,
    Cancelled,
    Error,
}

impl RunState {
    pub const ALL: [RunState; 7] = [
        Self::Queued,
        Self::Claimed,
        Self::InProgress,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Claimed => "CLAIMED",
            Self::InProgress => "INPROGRESS",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::Error => "ERROR",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Error
        )
    }

    /// Held by a worker: the only states a worker's terminal report may end.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Claimed | Self::InProgress)
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// On the wire a state is its Oz name (`INPROGRESS`), as in the database.
impl Serialize for RunState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RunState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| D::Error::custom(format!("unknown run state {text:?}")))
    }
}

/// A point in time with microsecond precision, stored as an integer so that SQLite orders
/// it numerically (keyset pagination compares these values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn now() -> Self {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        Self((nanos / 1_000) as i64)
    }

    pub fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub fn as_micros(self) -> i64 {
        self.0
    }

    pub fn to_rfc3339(self) -> String {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000)
            .ok()
            .and_then(|instant| instant.format(&Rfc3339).ok())
            .unwrap_or_else(|| format!("invalid timestamp ({} µs since the epoch)", self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let instant = OffsetDateTime::parse(&text, &Rfc3339)
            .map_err(|error| D::Error::custom(format!("{text:?} is not RFC 3339: {error}")))?;
        i64::try_from(instant.unix_timestamp_nanos() / 1_000)
            .map(Self)
            .map_err(|_| D::Error::custom(format!("{text:?} is out of range")))
    }
}

/// One run, as stored.
#[derive(Debug, Clone)]
pub struct Run {
    pub run_id: String,
    pub title: String,
    pub prompt: String,
    pub skill: Option<String>,
    pub team: bool,
    /// The submitted `config` object, kept whole.
    pub agent_config: Map<String, Value>,
    /// `config.worker_host`, copied out so the dispatcher can select by it.
    pub worker_host: String,
    pub state: RunState,
    pub run_token: RunToken,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub claimed_by: Option<String>,
    pub execution_id: Option<String>,
    pub status_message: Option<String>,
    pub failure_reason: Option<String>,
    pub exit_code: Option<i32>,
    pub cancel_requested: bool,
}

/// How a worker ended a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Cancelled,
    Failed {
        message: String,
        failure_reason: String,
        exit_code: Option<i32>,
    },
}

impl Outcome {
    pub fn state(&self) -> RunState {
        match self {
            Self::Succeeded => RunState::Succeeded,
            Self::Cancelled => RunState::Cancelled,
            Self::Failed { .. } => RunState::Failed,
        }
    }
}

/// One page of a listing, in listing order.
#[derive(Debug)]
pub struct RunPage {
    pub runs: Vec<Run>,
    pub has_next_page: bool,
}

pub struct Store {
    connection: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        let found: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found });
        }
        connection.execute_batch(SCHEMA)?;
        connection.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self {
            connection: Mutex::new(connection),
        })
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        // A panic elsewhere cannot leave the SQLite handle half-updated: every write is a
        // single statement, so the connection stays usable after poisoning.
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn insert(&self, run: &Run) -> Result<(), StoreError> {
        let agent_config = Value::Object(run.agent_config.clone()).to_string();
        self.connection().execute(
            &format!(
                "INSERT INTO runs ({RUN_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
            ),
            params![
                run.run_id,
                run.title,
                run.prompt,
                run.skill,
                run.team,
                agent_config,
                run.worker_host,
                run.state.as_str(),
                run.run_token.expose(),
                run.created_at.as_micros(),
                run.updated_at.as_micros(),
                run.started_at.map(Timestamp::as_micros),
                run.claimed_by,
                run.execution_id,
                run.status_message,
                run.failure_reason,
                run.exit_code,
                run.cancel_requested,
            ],
        )?;
        Ok(())
    }

    pub fn get(&self, run_id: &str) -> Result<Option<Run>, StoreError> {
        let run = self
            .connection()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?1"),
                [run_id],
                run_from_row,
            )
            .optional()?;
        Ok(run)
    }

    pub fn run_token(&self, run_id: &str) -> Result<Option<RunToken>, StoreError> {
        let token = self
            .connection()
            .query_row(
                "SELECT run_token FROM runs WHERE run_id = ?1",
                [run_id],
                |row| row.get::<_, String>(0),
            )
            .optional()?;
        Ok(token.map(RunToken::from_stored))
    }

    pub fn list(&self, query: &RunListQuery) -> Result<RunPage, StoreError> {
        let column = query.sort_field.column();
        let (comparison, direction) = match query.sort_order {
            SortOrder::Asc => (">", "ASC"),
            SortOrder::Desc => ("<", "DESC"),
        };
        let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1");
        let mut values: Vec<SqlValue> = Vec::new();
        if !query.states.is_empty() {
            let placeholders = vec!["?"; query.states.len()].join(", ");
            sql.push_str(&format!(" AND state IN ({placeholders})"));
            values.extend(
                query
                    .states
                    .iter()
                    .map(|state| SqlValue::Text(state.as_str().to_owned())),
            );
        }
        if let Some(name) = &query.name {
            sql.push_str(" AND json_extract(agent_config, '$.name') = ?");
            values.push(SqlValue::Text(name.clone()));
        }
        if let Some(cursor) = &query.after {
            sql.push_str(&format!(" AND ({column}, run_id) {comparison} (?, ?)"));
            values.push(SqlValue::Integer(cursor.sort_value));
            values.push(SqlValue::Text(cursor.run_id.clone()));
        }
        sql.push_str(&format!(
            " ORDER BY {column} {direction}, run_id {direction} LIMIT ?"
        ));
        // One extra row tells whether another page follows.
        values.push(SqlValue::Integer(query.limit as i64 + 1));

        let connection = self.connection();
        let mut statement = connection.prepare(&sql)?;
        let mut runs = statement
            .query_map(params_from_iter(values), run_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let has_next_page = runs.len() > query.limit;
        runs.truncate(query.limit);
        Ok(RunPage {
            runs,
            has_next_page,
        })
    }

    /// Queued runs addressed to any of `worker_hosts`, oldest first.
    pub fn queued_runs_for(&self, worker_hosts: &[String]) -> Result<Vec<Run>, StoreError> {
        if worker_hosts.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; worker_hosts.len()].join(", ");
        let connection = self.connection();
        let mut statement = connection.prepare(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE state = 'QUEUED' AND worker_host IN ({placeholders}) \
             ORDER BY created_at, run_id"
        ))?;
        let runs = statement
            .query_map(params_from_iter(worker_hosts), run_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(runs)
    }

    /// Runs held by `worker_id` whose cancellation the worker has yet to act on.
    pub fn runs_awaiting_cancellation(&self, worker_id: &str) -> Result<Vec<String>, StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare(
            "SELECT run_id FROM runs WHERE claimed_by = ?1 AND cancel_requested = 1 \
             AND state IN ('CLAIMED', 'INPROGRESS') ORDER BY created_at, run_id",
        )?;
        let run_ids = statement
            .query_map([worker_id], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(run_ids)
    }

    /// QUEUED → CLAIMED. False when the run was not queued.
    pub fn claim(
        &self,
        run_id: &str,
        worker_id: &str,
        execution_id: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let changed = self.connection().execute(
            "UPDATE runs SET state = 'CLAIMED', claimed_by = ?2, execution_id = ?3, \
             started_at = ?4, updated_at = ?4 WHERE run_id = ?1 AND state = 'QUEUED'",
            params![run_id, worker_id, execution_id, now.as_micros()],
        )?;
        Ok(changed == 1)
    }

    /// CLAIMED → INPROGRESS. False when the run was not claimed.
    pub fn mark_in_progress(&self, run_id: &str, now: Timestamp) -> Result<bool, StoreError> {
        let changed = self.connection().execute(
            "UPDATE runs SET state = 'INPROGRESS', updated_at = ?2 \
             WHERE run_id = ?1 AND state = 'CLAIMED'",
            params![run_id, now.as_micros()],
        )?;
        Ok(changed == 1)
    }

    /// QUEUED → CANCELLED. False when the run was not queued.
    pub fn cancel_queued(&self, run_id: &str, now: Timestamp) -> Result<bool, StoreError> {
        let changed = self.connection().execute(
            "UPDATE runs SET state = 'CANCELLED', cancel_requested = 1, updated_at = ?2 \
             WHERE run_id = ?1 AND state = 'QUEUED'",
            params![run_id, now.as_micros()],
        )?;
        Ok(changed == 1)
    }

    /// Records that the user asked to cancel a run a worker holds. False when no worker
    /// holds it.
    pub fn request_cancellation(&self, run_id: &str, now: Timestamp) -> Result<bool, StoreError> {
        let changed = self.connection().execute(
            "UPDATE runs SET cancel_requested = 1, updated_at = ?2 \
             WHERE run_id = ?1 AND state IN ('CLAIMED', 'INPROGRESS')",
            params![run_id, now.as_micros()],
        )?;
        Ok(changed == 1)
    }

    /// CLAIMED or INPROGRESS → the outcome's terminal state. False when no worker held it.
    pub fn finish(
        &self,
        run_id: &str,
        outcome: &Outcome,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let (status_message, failure_reason, exit_code) = match outcome {
            Outcome::Succeeded | Outcome::Cancelled => (None, None, None),
            Outcome::Failed {
                message,
                failure_reason,
                exit_code,
            } => (Some(message), Some(failure_reason), *exit_code),
        };
        let changed = self.connection().execute(
            "UPDATE runs SET state = ?2, status_message = ?3, failure_reason = ?4, \
             exit_code = ?5, updated_at = ?6 \
             WHERE run_id = ?1 AND state IN ('CLAIMED', 'INPROGRESS')",
            params![
                run_id,
                outcome.state().as_str(),
                status_message,
                failure_reason,
                exit_code,
                now.as_micros()
            ],
        )?;
        Ok(changed == 1)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown run state {0:?}")]
struct UnknownRunState(String);

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<Run> {
    let agent_config_text: String = row.get(5)?;
    let agent_config = serde_json::from_str(&agent_config_text).map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(5, Type::Text, Box::new(error))
    })?;
    let state_text: String = row.get(7)?;
    let state = RunState::parse(&state_text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            7,
            Type::Text,
            Box::new(UnknownRunState(state_text)),
        )
    })?;
    Ok(Run {
        run_id: row.get(0)?,
        title: row.get(1)?,
        prompt: row.get(2)?,
        skill: row.get(3)?,
        team: row.get(4)?,
        agent_config,
        worker_host: row.get(6)?,
        state,
        run_token: RunToken::from_stored(row.get(8)?),
        created_at: Timestamp::from_micros(row.get(9)?),
        updated_at: Timestamp::from_micros(row.get(10)?),
        started_at: row.get::<_, Option<i64>>(11)?.map(Timestamp::from_micros),
        claimed_by: row.get(12)?,
        execution_id: row.get(13)?,
        status_message: row.get(14)?,
        failure_reason: row.get(15)?,
        exit_code: row.get(16)?,
        cancel_requested: row.get(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_rfc3339_utc() {
        let instant = Timestamp::from_micros(1_767_225_600_123_456);
        assert_eq!(instant.to_rfc3339(), "2026-01-01T00:00:00.123456Z");
    }

    #[test]
    fn run_states_round_trip() {
        for state in RunState::ALL {
            assert_eq!(RunState::parse(state.as_str()), Some(state));
        }
        assert_eq!(RunState::parse("queued"), None);
    }

    #[test]
    fn reopening_keeps_the_schema_version_and_wal_mode() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("runs.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .connection()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let journal_mode: String = store
            .connection()
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(journal_mode, "wal");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("runs.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let error = Store::open(&path)
            .err()
            .expect("a newer schema must be refused");
        assert!(matches!(error, StoreError::SchemaTooNew { .. }), "{error}");
    }
}
