//! Task environment entries, from the config file's `environment` lists and
//! from `--env`/`-e` flags, and their resolution against the worker's own
//! environment.

use std::fmt;

use serde::Deserialize;

use crate::{quote::strconv_quote, serde_helpers::nullable};

/// One `environment` entry (`{name, value?}`) or one parsed `--env` flag.
///
/// `value: None` means "inherit": the worker copies the variable from its own
/// environment at startup, or uses the empty string when it is unset there.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvEntry {
    /// Variable name; validation rejects empty names and spaces/tabs.
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    /// Explicit value, or `None` to inherit from the worker's environment.
    #[serde(default)]
    pub value: Option<String>,
}

impl EnvEntry {
    /// The value the task gets: the explicit one, else `lookup(name)`, else "".
    pub fn resolve(&self, lookup: &dyn Fn(&str) -> Option<String>) -> String {
        match &self.value {
            Some(value) => value.clone(),
            None => lookup(&self.name).unwrap_or_default(),
        }
    }
}

/// Values are often credentials (`GITHUB_TOKEN`), so Debug shows only the
/// name and whether a value was given.
impl fmt::Debug for EnvEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvEntry")
            .field("name", &self.name)
            .field("value", &self.value.as_ref().map(|_| Redacted))
            .finish()
    }
}

/// Debug placeholder for a secret-bearing value.
pub(crate) struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Debug view of resolved `(name, value)` pairs that prints names only.
pub(crate) struct EnvNames<'a>(pub(crate) &'a [(String, String)]);

impl fmt::Debug for EnvNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

/// Why an `--env` flag value was rejected. Display matches the reference.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvFlagError {
    /// `--env ""`.
    #[error("invalid --env flag: empty value")]
    Empty,
    /// `--env =VALUE`; carries the whole entry.
    #[error("invalid --env flag: missing key in {}", strconv_quote(.0))]
    MissingKey(String),
    /// A space or tab in the key; carries the whole entry.
    #[error("invalid --env flag: key contains whitespace in {}", strconv_quote(.0))]
    KeyContainsWhitespace(String),
}

/// Parses one `--env` value: `KEY=VALUE` (split on the first `=`, so the
/// value may contain `=`) or a bare `KEY` to inherit from the worker.
///
/// The reference's flag parser (kong) splits each value on `,` before this
/// runs; that splitting belongs to the CLI layer, not here.
pub fn parse_env_flag(entry: &str) -> Result<EnvEntry, EnvFlagError> {
    if entry.is_empty() {
        return Err(EnvFlagError::Empty);
    }
    let (name, value) = match entry.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (entry, None),
    };
    if name.is_empty() {
        return Err(EnvFlagError::MissingKey(entry.to_owned()));
    }
    if contains_space_or_tab(name) {
        return Err(EnvFlagError::KeyContainsWhitespace(entry.to_owned()));
    }
    Ok(EnvEntry {
        name: name.to_owned(),
        value: value.map(str::to_owned),
    })
}

/// Resolves entries in order; a repeated name keeps its first position and
/// takes the last value, like the reference's map-based resolution.
pub fn resolve_env(
    entries: &[EnvEntry],
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut resolved = Vec::with_capacity(entries.len());
    overlay_env(&mut resolved, entries, lookup);
    resolved
}

/// Applies `entries` on top of `env`: existing names are overwritten in
/// place, new names are appended.
pub(crate) fn overlay_env(
    env: &mut Vec<(String, String)>,
    entries: &[EnvEntry],
    lookup: &dyn Fn(&str) -> Option<String>,
) {
    for entry in entries {
        let value = entry.resolve(lookup);
        match env.iter_mut().find(|(name, _)| *name == entry.name) {
            Some((_, existing)) => *existing = value,
            None => env.push((entry.name.clone(), value)),
        }
    }
}

/// The reference's `no_whitespace` rule: only space and tab count.
pub(crate) fn contains_space_or_tab(s: &str) -> bool {
    s.contains([' ', '\t'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        (name == "FROM_HOST").then(|| "host_value".to_owned())
    }

    #[test]
    fn parses_key_value_and_bare_key() {
        assert_eq!(
            parse_env_flag("FOO=bar").unwrap(),
            EnvEntry {
                name: "FOO".into(),
                value: Some("bar".into())
            }
        );
        assert_eq!(
            parse_env_flag("URL=a=b=c").unwrap().value.as_deref(),
            Some("a=b=c")
        );
        assert_eq!(parse_env_flag("EMPTY=").unwrap().value.as_deref(), Some(""));
        assert_eq!(
            parse_env_flag("BARE").unwrap(),
            EnvEntry {
                name: "BARE".into(),
                value: None
            }
        );
    }

    #[test]
    fn rejects_with_reference_wording() {
        assert_eq!(
            parse_env_flag("").unwrap_err().to_string(),
            "invalid --env flag: empty value"
        );
        assert_eq!(
            parse_env_flag("=value").unwrap_err().to_string(),
            r#"invalid --env flag: missing key in "=value""#
        );
        assert_eq!(
            parse_env_flag("MY KEY=v").unwrap_err().to_string(),
            r#"invalid --env flag: key contains whitespace in "MY KEY=v""#
        );
        assert_eq!(
            parse_env_flag("MY\tKEY").unwrap_err().to_string(),
            r#"invalid --env flag: key contains whitespace in "MY\tKEY""#
        );
        // Only the key is checked; values may hold spaces.
        assert!(parse_env_flag("KEY=a b").is_ok());
    }

    #[test]
    fn resolves_explicit_host_and_missing_values() {
        let entries = [
            EnvEntry {
                name: "EXPLICIT".into(),
                value: Some("explicit_value".into()),
            },
            EnvEntry {
                name: "FROM_HOST".into(),
                value: None,
            },
            EnvEntry {
                name: "NONEXISTENT_VAR_12345".into(),
                value: None,
            },
        ];
        assert_eq!(
            resolve_env(&entries, &lookup),
            vec![
                ("EXPLICIT".to_owned(), "explicit_value".to_owned()),
                ("FROM_HOST".to_owned(), "host_value".to_owned()),
                ("NONEXISTENT_VAR_12345".to_owned(), String::new()),
            ]
        );
    }

    #[test]
    fn repeated_names_keep_position_and_last_value() {
        let entries = [
            parse_env_flag("A=1").unwrap(),
            parse_env_flag("B=2").unwrap(),
            parse_env_flag("A=3").unwrap(),
        ];
        assert_eq!(
            resolve_env(&entries, &lookup),
            vec![
                ("A".to_owned(), "3".to_owned()),
                ("B".to_owned(), "2".to_owned())
            ]
        );
    }

    #[test]
    fn debug_hides_values() {
        let entry = parse_env_flag("TOKEN=s3cret").unwrap();
        let shown = format!("{entry:?}");
        assert!(shown.contains("TOKEN"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        let pairs = [("TOKEN".to_owned(), "s3cret".to_owned())];
        assert_eq!(format!("{:?}", EnvNames(&pairs)), r#"["TOKEN"]"#);
    }
}
