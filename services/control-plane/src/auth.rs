//! Bearer authentication: the operator's API key, or a run token handed to one run's agent.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Holder of the control plane's API key: may do everything.
    Operator,
    /// The agent of one run, holding that run's token: may only read that run.
    RunAgent { run_id: String },
}

/// A per-run secret, sent to the worker as the agent's `WARP_API_KEY`.
///
/// Its text is `<run id>.<random secret>`: the run id locates the stored token, and the
/// comparison with it then runs in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct RunToken(String);

impl RunToken {
    pub fn generate(run_id: &str) -> Self {
        let secret = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        Self(format!("{run_id}.{secret}"))
    }

    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    /// The run a presented token claims to belong to, if it has the shape of a run token.
    fn claimed_run_id(presented: &str) -> Option<&str> {
        presented
            .split_once('.')
            .map(|(run_id, _)| run_id)
            .filter(|run_id| !run_id.is_empty())
    }

    fn matches(&self, presented: &str) -> bool {
        constant_time_equal(&self.0, presented)
    }

    /// The secret itself, for storage and for the assignment's environment only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RunToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunToken(<redacted>)")
    }
}

fn constant_time_equal(expected: &str, presented: &str) -> bool {
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware: identifies the caller, enforces what a run token may reach, and leaves the
/// [`Caller`] in the request extensions.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = bearer_token(request.headers()).ok_or(ApiError::Unauthenticated)?;
    let caller = identify(&state, presented)?.ok_or(ApiError::Unauthenticated)?;
    if let Caller::RunAgent { run_id } = &caller {
        let own_run_path = format!("/api/v1/agent/runs/{run_id}");
        if request.method() != Method::GET || request.uri().path() != own_run_path {
            return Err(ApiError::Forbidden(format!(
                "a run token may only read its own run (GET {own_run_path})"
            )));
        }
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

fn identify(state: &AppState, presented: &str) -> Result<Option<Caller>, ApiError> {
    if constant_time_equal(&state.api_key, presented) {
        return Ok(Some(Caller::Operator));
    }
    let Some(run_id) = RunToken::claimed_run_id(presented) else {
        return Ok(None);
    };
    let genuine = state
        .store
        .run_token(run_id)?
        .is_some_and(|token| token.matches(presented));
    Ok(genuine.then(|| Caller::RunAgent {
        run_id: run_id.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers_with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).unwrap(),
        );
        headers
    }

    #[test]
    fn bearer_tokens_are_extracted() {
        assert_eq!(bearer_token(&headers_with("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers_with("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers_with("Basic abc")), None);
        assert_eq!(bearer_token(&headers_with("Bearer ")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn run_tokens_name_their_run_and_match_only_themselves() {
        let token = RunToken::generate("019a-run");
        assert_eq!(RunToken::claimed_run_id(token.expose()), Some("019a-run"));
        assert!(token.matches(token.expose()));
        assert!(!token.matches(&format!("{}x", token.expose())));
        assert_ne!(token, RunToken::generate("019a-run"));
        assert_eq!(RunToken::claimed_run_id("no-dot"), None);
        assert_eq!(RunToken::claimed_run_id(".secret"), None);
    }

    #[test]
    fn run_token_debug_hides_the_secret() {
        let token = RunToken::generate("019a-run");
        assert!(!format!("{token:?}").contains(token.expose()));
    }
}
