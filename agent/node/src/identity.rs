//! The node's stable identity: generated once, persisted in the state directory, and
//! presented on every connection so the gateway recognises a returning node.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

const NODE_ID_FILE: &str = "node-id";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds an invalid node id {id:?}: expected 1-128 characters of [A-Za-z0-9._-]")]
    Invalid { path: String, id: String },
}

pub use ozfleet_proto::node_id::is_valid_node_id;

/// Reads the node id from `state_dir`, creating the directory and a fresh id on first use.
/// A corrupt id file is an error rather than silently replaced: a new identity would
/// orphan every task the gateway believes this node runs.
pub fn load_or_create_node_id(state_dir: &Path) -> Result<String, IdentityError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|source| IdentityError::StateDir {
            path: state_dir.display().to_string(),
            source,
        })?;
    let path = state_dir.join(NODE_ID_FILE);
    let shown = path.display().to_string();
    match fs::read_to_string(&path) {
        Ok(contents) => {
            let id = contents.trim();
            if is_valid_node_id(id) {
                Ok(id.to_owned())
            } else {
                Err(IdentityError::Invalid {
                    path: shown,
                    id: id.chars().take(140).collect(),
                })
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            let staging = state_dir.join(format!(".{NODE_ID_FILE}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&staging)?;
                writeln!(file, "{id}")?;
                file.sync_all()?;
                fs::rename(&staging, &path)
            };
            write().map_err(|source| IdentityError::Write {
                path: shown,
                source,
            })?;
            Ok(id)
        }
        Err(source) => Err(IdentityError::Read {
            path: shown,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let first = load_or_create_node_id(&state_dir).unwrap();
        assert!(is_valid_node_id(&first));
        let second = load_or_create_node_id(&state_dir).unwrap();
        assert_eq!(first, second);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&state_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_corrupt_identity_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(NODE_ID_FILE), "not/valid id\n").unwrap();
        let error = load_or_create_node_id(dir.path()).unwrap_err().to_string();
        assert!(error.contains("node-id"), "{error}");
        assert!(error.contains("invalid node id"), "{error}");
    }
}
