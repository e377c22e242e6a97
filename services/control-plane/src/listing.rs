//! `GET /agent/runs` query parameters and keyset pagination cursors.
//!
//! A cursor carries the sort value and run id of the last run of a page; the next page
//! starts strictly after that pair. Unlike an offset, this neither repeats nor skips runs
//! when runs are created or change state between pages.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::ApiError;
use crate::store::{Run, RunState};

pub const DEFAULT_PAGE_SIZE: usize = 20;
pub const MAX_PAGE_SIZE: usize = 500;

/// What `GET /agent/runs` sorts by (`sort_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortField {
    UpdatedAt,
    CreatedAt,
}

impl SortField {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "updated_at" => Some(Self::UpdatedAt),
            "created_at" => Some(Self::CreatedAt),
            _ => None,
        }
    }

    /// The `sort_by` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpdatedAt => "updated_at",
            Self::CreatedAt => "created_at",
        }
    }

    /// The `runs` column holding this field.
    pub fn column(self) -> &'static str {
        self.as_str()
    }

    fn value_of(self, run: &Run) -> i64 {
        match self {
            Self::UpdatedAt => run.updated_at.as_micros(),
            Self::CreatedAt => run.created_at.as_micros(),
        }
    }
}

/// The direction of a listing (`sort_order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortOrder {
    Asc,
    Desc,
}

impl SortOrder {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "asc" => Some(Self::Asc),
            "desc" => Some(Self::Desc),
            _ => None,
        }
    }

    /// The `sort_order` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Asc => "asc",
            Self::Desc => "desc",
        }
    }
}

/// Where the previous page ended, and under which sort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub sort_field: SortField,
    pub sort_order: SortOrder,
    pub sort_value: i64,
    pub run_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`cursor` is not a cursor issued by this control plane")]
pub struct InvalidCursor;

impl Cursor {
    pub fn after(run: &Run, sort_field: SortField, sort_order: SortOrder) -> Self {
        Self {
            sort_field,
            sort_order,
            sort_value: sort_field.value_of(run),
            run_id: run.run_id.clone(),
        }
    }

    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{}|{}|{}|{}",
            self.sort_field.as_str(),
            self.sort_order.as_str(),
            self.sort_value,
            self.run_id
        ))
    }

    pub fn decode(text: &str) -> Result<Self, InvalidCursor> {
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| InvalidCursor)?;
        let text = String::from_utf8(bytes).map_err(|_| InvalidCursor)?;
        let mut parts = text.splitn(4, '|');
        let mut next_part = || parts.next().ok_or(InvalidCursor);
        let sort_field = SortField::parse(next_part()?).ok_or(InvalidCursor)?;
        let sort_order = SortOrder::parse(next_part()?).ok_or(InvalidCursor)?;
        let sort_value = next_part()?.parse().map_err(|_| InvalidCursor)?;
        let run_id = next_part()?.to_owned();
        if run_id.is_empty() {
            return Err(InvalidCursor);
        }
        Ok(Self {
            sort_field,
            sort_order,
            sort_value,
            run_id,
        })
    }
}

/// A validated `GET /agent/runs` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunListQuery {
    /// Empty means every state.
    pub states: Vec<RunState>,
    /// Matches `config.name`.
    pub name: Option<String>,
    pub sort_field: SortField,
    pub sort_order: SortOrder,
    pub limit: usize,
    pub after: Option<Cursor>,
}

impl RunListQuery {
    /// Parses the query string's pairs; `state` may repeat and may hold comma-separated
    /// states. Parameters this control plane does not support are ignored, as Oz ignores
    /// unknown ones.
    pub fn from_query_pairs(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let mut query = Self {
            states: Vec::new(),
            name: None,
            sort_field: SortField::UpdatedAt,
            sort_order: SortOrder::Desc,
            limit: DEFAULT_PAGE_SIZE,
            after: None,
        };
        let mut cursor_text = None;
        for (key, value) in pairs {
            match key.as_str() {
                "state" => {
                    for text in value
                        .split(',')
                        .map(str::trim)
                        .filter(|text| !text.is_empty())
                    {
                        let state = RunState::parse(&text.to_ascii_uppercase())
                            .ok_or_else(|| unknown_state(text))?;
                        if !query.states.contains(&state) {
                            query.states.push(state);
                        }
                    }
                }
                "limit" => query.limit = parse_limit(value)?,
                "cursor" => cursor_text = Some(value.as_str()).filter(|text| !text.is_empty()),
                "sort_by" => {
                    query.sort_field = SortField::parse(value).ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "`sort_by` must be updated_at or created_at, got {value:?}"
                        ))
                    })?;
                }
                "sort_order" => {
                    query.sort_order = SortOrder::parse(value).ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "`sort_order` must be asc or desc, got {value:?}"
                        ))
                    })?;
                }
                "name" => query.name = Some(value.clone()),
                _ => {}
            }
        }
        if let Some(text) = cursor_text {
            let cursor =
                Cursor::decode(text).map_err(|error| ApiError::BadRequest(error.to_string()))?;
            if cursor.sort_field != query.sort_field || cursor.sort_order != query.sort_order {
                return Err(ApiError::BadRequest(format!(
                    "`cursor` continues a listing sorted by {} {}; send the same sort_by and \
                     sort_order with it",
                    cursor.sort_field.as_str(),
                    cursor.sort_order.as_str()
                )));
            }
            query.after = Some(cursor);
        }
        Ok(query)
    }
}

fn unknown_state(text: &str) -> ApiError {
    let known: Vec<&str> = RunState::ALL.iter().map(|state| state.as_str()).collect();
    ApiError::BadRequest(format!(
        "`state` {text:?} is not a run state; use one of {}",
        known.join(", ")
    ))
}

fn parse_limit(text: &str) -> Result<usize, ApiError> {
    text.parse::<usize>()
        .ok()
        .filter(|limit| (1..=MAX_PAGE_SIZE).contains(limit))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "`limit` must be an integer from 1 to {MAX_PAGE_SIZE}, got {text:?}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn parse(query: &[(&str, &str)]) -> Result<RunListQuery, String> {
        RunListQuery::from_query_pairs(&pairs(query)).map_err(|error| error.to_string())
    }

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor {
            sort_field: SortField::CreatedAt,
            sort_order: SortOrder::Asc,
            sort_value: 1_767_225_600_123_456,
            run_id: "019a0000-0000-7000-8000-000000000001".into(),
        };
        let encoded = cursor.encode();
        assert!(
            encoded
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "cursors must be safe in a query string: {encoded}"
        );
        assert_eq!(Cursor::decode(&encoded), Ok(cursor));
    }

    #[test]
    fn foreign_cursors_are_rejected() {
        for text in [
            "",
            "!!!",
            &URL_SAFE_NO_PAD.encode("updated_at|desc|12"),
            &URL_SAFE_NO_PAD.encode("updated_at|desc|twelve|run"),
            &URL_SAFE_NO_PAD.encode("title|desc|12|run"),
            &URL_SAFE_NO_PAD.encode("updated_at|sideways|12|run"),
            &URL_SAFE_NO_PAD.encode("updated_at|desc|12|"),
            &URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ] {
            assert_eq!(Cursor::decode(text), Err(InvalidCursor), "{text:?}");
        }
    }

    #[test]
    fn defaults_apply_when_no_parameter_is_given() {
        let query = parse(&[]).unwrap();
        assert_eq!(query.states, vec![]);
        assert_eq!(query.limit, DEFAULT_PAGE_SIZE);
        assert_eq!(query.sort_field, SortField::UpdatedAt);
        assert_eq!(query.sort_order, SortOrder::Desc);
        assert_eq!(query.after, None);
    }

    #[test]
    fn states_repeat_and_split_on_commas() {
        let query = parse(&[
            ("state", "QUEUED"),
            ("state", "failed, CANCELLED"),
            ("state", "QUEUED"),
            ("unknown", "ignored"),
        ])
        .unwrap();
        assert_eq!(
            query.states,
            vec![RunState::Queued, RunState::Failed, RunState::Cancelled]
        );
    }

    #[test]
    fn invalid_parameters_name_the_parameter() {
        for (query, expected) in [
            (vec![("limit", "0")], "`limit`"),
            (vec![("limit", "501")], "`limit`"),
            (vec![("limit", "ten")], "`limit`"),
            (vec![("state", "DONE")], "`state` \"DONE\""),
            (vec![("sort_by", "title")], "`sort_by`"),
            (vec![("sort_order", "up")], "`sort_order`"),
            (vec![("cursor", "garbage")], "`cursor`"),
        ] {
            let error = parse(&query).unwrap_err();
            assert!(error.contains(expected), "{query:?}: {error}");
        }
        assert_eq!(parse(&[("limit", "500")]).unwrap().limit, 500);
        assert_eq!(parse(&[("limit", "1")]).unwrap().limit, 1);
    }

    #[test]
    fn a_cursor_must_match_the_requested_sort() {
        let cursor = Cursor {
            sort_field: SortField::CreatedAt,
            sort_order: SortOrder::Asc,
            sort_value: 5,
            run_id: "r".into(),
        }
        .encode();
        let error = parse(&[("cursor", &cursor)]).unwrap_err();
        assert!(error.contains("sorted by created_at asc"), "{error}");
        let query = parse(&[
            ("cursor", &cursor),
            ("sort_by", "created_at"),
            ("sort_order", "asc"),
        ])
        .unwrap();
        assert_eq!(query.after.unwrap().sort_value, 5);
    }
}
