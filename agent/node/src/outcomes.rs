//! Terminal outcomes not yet acknowledged, kept durably in the state directory: each is
//! written (and fsync'd) before the gateway hears of it and removed once the gateway
//! acknowledged it, which it does only after writing it to Oz. A node agent killed with
//! `kill -9` in between finds them at start and announces them in its first hello, so no
//! outcome is lost; the gateway drops repeats by (task, execution).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use ozfleet_proto::v1::TaskOutcome;
use prost::Message as _;
use sha2::{Digest as _, Sha256};

const DIRECTORY: &str = "outcomes";

/// The directory of pending outcomes under a state dir.
#[derive(Debug, Clone)]
pub struct OutcomeStore {
    directory: PathBuf,
}

impl OutcomeStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            directory: state_dir.join(DIRECTORY),
        }
    }

    fn path(&self, task_id: &str, execution_id: &str) -> PathBuf {
        let mut digest = Sha256::new();
        digest.update(task_id.as_bytes());
        digest.update([0]);
        digest.update(execution_id.as_bytes());
        let name: String = digest
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        self.directory.join(name)
    }

    /// Writes `outcome` durably: a temporary file, fsync, rename, fsync of the directory.
    /// Blocking: call it off the runtime threads.
    pub fn save(&self, outcome: &TaskOutcome) -> io::Result<()> {
        fs::create_dir_all(&self.directory)?;
        let mut file = tempfile::NamedTempFile::new_in(&self.directory)?;
        file.write_all(&outcome.encode_to_vec())?;
        file.as_file().sync_all()?;
        file.persist(self.path(&outcome.task_id, &outcome.execution_id))
            .map_err(|error| error.error)?;
        fs::File::open(&self.directory)?.sync_all()
    }

    /// Forgets an acknowledged outcome. Blocking.
    pub fn remove(&self, task_id: &str, execution_id: &str) -> io::Result<()> {
        match fs::remove_file(self.path(task_id, execution_id)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Every pending outcome, by (task, execution). Unreadable files (a crash during the
    /// first write leaves only a temporary file, never a torn one) are skipped. Blocking.
    pub fn load(&self) -> io::Result<BTreeMap<(String, String), TaskOutcome>> {
        let mut outcomes = BTreeMap::new();
        let entries = match fs::read_dir(&self.directory) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(outcomes),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let path = entry?.path();
            let is_outcome = path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
                });
            if !is_outcome {
                // A temporary file a crash left behind.
                let _ = fs::remove_file(&path);
                continue;
            }
            if let Ok(outcome) = TaskOutcome::decode(fs::read(&path)?.as_slice()) {
                outcomes.insert(
                    (outcome.task_id.clone(), outcome.execution_id.clone()),
                    outcome,
                );
            }
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use ozfleet_proto::v1::{self, task_outcome};

    use super::*;

    fn outcome(task_id: &str) -> TaskOutcome {
        TaskOutcome {
            task_id: task_id.into(),
            execution_id: "exec".into(),
            result: Some(task_outcome::Result::Failed(v1::TaskFailed {
                failure_reason: "agent_invocation".into(),
                exit_code: 3,
                message: "m".into(),
            })),
        }
    }

    #[test]
    fn saved_outcomes_survive_until_removed_and_strays_are_cleared() {
        let state = tempfile::tempdir().unwrap();
        let store = OutcomeStore::new(state.path());
        assert!(store.load().unwrap().is_empty());
        store.save(&outcome("run/1 with odd\tchars")).unwrap();
        store.save(&outcome("run-2")).unwrap();
        std::fs::write(state.path().join(DIRECTORY).join(".tmpXYZ"), b"half").unwrap();

        let reopened = OutcomeStore::new(state.path());
        let loaded = reopened.load().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(
            loaded[&("run-2".to_owned(), "exec".to_owned())],
            outcome("run-2")
        );
        assert!(!state.path().join(DIRECTORY).join(".tmpXYZ").exists());
        reopened.remove("run-2", "exec").unwrap();
        reopened.remove("run-2", "exec").unwrap();
        assert_eq!(reopened.load().unwrap().len(), 1);
    }
}
