//! The Oz run API (spec `oz-platform.md` §6) and the routes of the whole server.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::{Extension, Json, Router, middleware};
use ozfleet_proto::oz::WORKER_WEB_SOCKET_PATH;
use tracing::info;
use uuid::Uuid;

use crate::AppState;
use crate::auth::{self, Caller, RunToken};
use crate::error::ApiError;
use crate::listing::{Cursor, RunListQuery};
use crate::run_api::{PageInfo, RunCancelled, RunCreated, RunItem, RunPage, StatusMessage};
use crate::run_request::parse_run_request;
use crate::store::{Run, RunState, Timestamp};
use crate::worker_ws;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/agent/run", post(create_run))
        .route("/api/v1/agent/runs", post(create_run).get(list_runs))
        .route("/api/v1/agent/runs/{run_id}", get(get_run))
        .route("/api/v1/agent/runs/{run_id}/cancel", post(cancel_run))
        .route(WORKER_WEB_SOCKET_PATH, get(worker_ws::accept))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .with_state(state)
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn create_run(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RunCreated>, ApiError> {
    let body = body.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let submission = parse_run_request(&body)?;
    let run_id = Uuid::now_v7().to_string();
    let now = Timestamp::now();
    let run = Run {
        run_token: RunToken::generate(&run_id),
        run_id,
        title: submission.title,
        prompt: submission.prompt,
        skill: submission.skill,
        team: submission.team,
        agent_config: submission.config,
        worker_host: submission.worker_host,
        state: RunState::Queued,
        created_at: now,
        updated_at: now,
        started_at: None,
        claimed_by: None,
        execution_id: None,
        status_message: None,
        failure_reason: None,
        exit_code: None,
        cancel_requested: false,
    };
    state.store.insert(&run)?;
    let at_capacity = !state.dispatcher.is_worker_connected(&run.worker_host);
    info!(
        "run {} QUEUED for worker {}{}",
        run.run_id,
        run.worker_host,
        if at_capacity {
            " (not connected yet)"
        } else {
            ""
        }
    );
    state.dispatcher.wake();
    Ok(Json(RunCreated {
        at_capacity,
        task_id: run.run_id.clone(),
        run_id: run.run_id,
        state: RunState::Queued,
    }))
}

async fn list_runs(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<RunPage>, ApiError> {
    let Query(pairs) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let query = RunListQuery::from_query_pairs(&pairs)?;
    let page = state.store.list(&query)?;
    let next_cursor = page
        .runs
        .last()
        .filter(|_| page.has_next_page)
        .map(|last| Cursor::after(last, query.sort_field, query.sort_order).encode());
    Ok(Json(RunPage {
        runs: page.runs.into_iter().map(RunItem::from).collect(),
        page_info: PageInfo {
            has_next_page: page.has_next_page,
            next_cursor,
        },
    }))
}

async fn get_run(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(run_id): Path<String>,
) -> Result<Json<RunItem>, ApiError> {
    // The agent's first call with its run token is how the control plane learns that the
    // run is executing, as with Oz and the real `oz` CLI.
    if matches!(caller, Caller::RunAgent { .. })
        && state.store.mark_in_progress(&run_id, Timestamp::now())?
    {
        info!("run {run_id} CLAIMED -> INPROGRESS (its agent reported in)");
    }
    let run = state
        .store
        .get(&run_id)?
        .ok_or(ApiError::RunNotFound(run_id))?;
    Ok(Json(RunItem::from(run)))
}

async fn cancel_run(
    State(state): State<Arc<AppState>>,
    Path(run_id): Path<String>,
) -> Result<Json<RunCancelled>, ApiError> {
    state.dispatcher.cancel_run(&run_id)?;
    Ok(Json(RunCancelled { run_id }))
}

impl From<Run> for RunItem {
    fn from(run: Run) -> Self {
        let status_message = (run.state == RunState::Failed).then(|| StatusMessage {
            message: run.status_message.unwrap_or_default(),
            error_code: run.failure_reason.clone(),
        });
        Self {
            task_id: run.run_id.clone(),
            run_id: run.run_id,
            title: run.title,
            state: run.state,
            prompt: run.prompt,
            created_at: run.created_at,
            updated_at: run.updated_at,
            started_at: run.started_at,
            status_message,
            agent_config: run.agent_config,
            execution_location: "REMOTE".into(),
            source: "API".into(),
            claimed_by: run.claimed_by,
            execution_id: run.execution_id,
            failure_reason: run.failure_reason,
            exit_code: run.exit_code,
            cancel_requested: run.cancel_requested,
        }
    }
}
