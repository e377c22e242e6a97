//! The API's errors and their single mapping to HTTP status and JSON body.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::run_api::ApiErrorBody;
use crate::store::{RunState, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key: send `Authorization: Bearer <api key>`")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("run {0} not found")]
    RunNotFound(String),
    #[error("run {run_id} is already {state} and cannot be cancelled")]
    RunFinished { run_id: String, state: RunState },
    #[error("no endpoint {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("internal error: {0}")]
    Store(#[from] StoreError),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::BadRequest(_) | Self::RunFinished { .. } => StatusCode::BAD_REQUEST,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RunNotFound(_) | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::BadRequest(_) => "bad_request",
            Self::Unprocessable(_) => "unprocessable_entity",
            Self::RunNotFound(_) | Self::RouteNotFound { .. } => "not_found",
            Self::RunFinished { .. } => "run_already_finished",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::Store(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            Self::Store(error) => {
                tracing::error!("request failed: {error}");
                "internal error; see the control plane log".to_owned()
            }
            other => other.to_string(),
        };
        let body = ApiErrorBody {
            error: self.code().to_owned(),
            message,
        };
        (self.status(), Json(body)).into_response()
    }
}
