//! Executions whose outcome the gateway has acknowledged, kept in the state directory.
//! With cleanup disabled their containers stay behind; this is how a restarted agent tells
//! them apart from tasks that ended while it was down, so nothing is reported twice.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "reported-executions";
/// Past this many entries the file is rewritten with the newest half.
const MAX_ENTRIES: usize = 10_000;

pub struct ReportedLog {
    path: PathBuf,
    entries: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
}

impl ReportedLog {
    /// Loads the log from `state_dir` (empty when there is none yet).
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let path = state_dir.join(FILE_NAME);
        let mut log = Self {
            path,
            entries: HashSet::new(),
            order: VecDeque::new(),
        };
        match fs::read_to_string(&log.path) {
            Ok(contents) => {
                for line in contents.lines() {
                    if let Some((task_id, execution_id)) = line.split_once('\t') {
                        log.remember(task_id.to_owned(), execution_id.to_owned());
                    }
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        Ok(log)
    }

    pub fn contains(&self, task_id: &str, execution_id: &str) -> bool {
        self.entries
            .contains(&(task_id.to_owned(), execution_id.to_owned()))
    }

    pub fn record(&mut self, task_id: &str, execution_id: &str) -> std::io::Result<()> {
        // Ids with line or field separators cannot be written back unambiguously.
        if [task_id, execution_id]
            .iter()
            .any(|id| id.contains(['\t', '\n', '\r']))
        {
            return Ok(());
        }
        if !self.remember(task_id.to_owned(), execution_id.to_owned()) {
            return Ok(());
        }
        if self.order.len() > MAX_ENTRIES {
            while self.order.len() > MAX_ENTRIES / 2 {
                if let Some(oldest) = self.order.pop_front() {
                    self.entries.remove(&oldest);
                }
            }
            return self.rewrite();
        }
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(file, "{task_id}\t{execution_id}")
    }

    fn remember(&mut self, task_id: String, execution_id: String) -> bool {
        let key = (task_id, execution_id);
        let new = self.entries.insert(key.clone());
        if new {
            self.order.push_back(key);
        }
        new
    }

    fn rewrite(&self) -> std::io::Result<()> {
        let staging = self.path.with_extension("tmp");
        let mut file = fs::File::create(&staging)?;
        for (task_id, execution_id) in &self.order {
            writeln!(file, "{task_id}\t{execution_id}")?;
        }
        file.sync_all()?;
        fs::rename(&staging, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_executions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ReportedLog::open(dir.path()).unwrap();
        assert!(!log.contains("run-1", "exec-1"));
        log.record("run-1", "exec-1").unwrap();
        log.record("run-1", "exec-1").unwrap();
        log.record("run-2", "exec-2").unwrap();
        let reopened = ReportedLog::open(dir.path()).unwrap();
        assert!(reopened.contains("run-1", "exec-1"));
        assert!(reopened.contains("run-2", "exec-2"));
        assert!(!reopened.contains("run-1", "exec-2"));
        let lines = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(lines.lines().count(), 2, "no duplicate lines");
    }

    #[test]
    fn the_file_is_compacted_to_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ReportedLog::open(dir.path()).unwrap();
        for i in 0..=MAX_ENTRIES {
            log.record(&format!("run-{i}"), "exec").unwrap();
        }
        let reopened = ReportedLog::open(dir.path()).unwrap();
        assert!(!reopened.contains("run-0", "exec"));
        assert!(reopened.contains(&format!("run-{MAX_ENTRIES}"), "exec"));
        assert_eq!(reopened.order.len(), MAX_ENTRIES / 2);
    }
}
