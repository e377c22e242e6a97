//! Executions whose outcome the gateway has acknowledged, kept in the state directory.
//! With cleanup disabled their containers stay behind; this is how a restarted agent tells
//! them apart from tasks that ended while it was down, so nothing is reported twice.
//!
//! The set lives in memory ([`ReportedLog`], read and updated under the node's lock
//! without I/O); the file follows it through [`ReportedWriter`], which applies queued
//! appends and compactions in order on the blocking pool.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

const FILE_NAME: &str = "reported-executions";
/// Past this many entries the file is rewritten with the newest half.
const MAX_ENTRIES: usize = 10_000;

/// A change of the file, applied in the order it was queued.
enum FileWrite {
    Append(String),
    /// Replace the whole file with these lines.
    Rewrite(Vec<String>),
}

pub struct ReportedLog {
    entries: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
    /// `None` once closed: later records stay in memory only.
    writes: Option<mpsc::UnboundedSender<FileWrite>>,
}

/// Persists what a [`ReportedLog`] records; [`ReportedWriter::run`] ends once the log is
/// closed (or dropped) and every queued write is done.
pub struct ReportedWriter {
    path: PathBuf,
    writes: mpsc::UnboundedReceiver<FileWrite>,
}

impl ReportedLog {
    /// Loads the log from `state_dir` (empty when there is none yet).
    pub async fn open(state_dir: &Path) -> io::Result<(Self, ReportedWriter)> {
        let path = state_dir.join(FILE_NAME);
        let contents = match tokio::fs::read_to_string(&path).await {
            Ok(contents) => contents,
            Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(error),
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut log = Self {
            entries: HashSet::new(),
            order: VecDeque::new(),
            writes: Some(sender),
        };
        for line in contents.lines() {
            if let Some((task_id, execution_id)) = line.split_once('\t') {
                log.remember(task_id.to_owned(), execution_id.to_owned());
            }
        }
        let writer = ReportedWriter {
            path,
            writes: receiver,
        };
        Ok((log, writer))
    }

    pub fn contains(&self, task_id: &str, execution_id: &str) -> bool {
        self.entries
            .contains(&(task_id.to_owned(), execution_id.to_owned()))
    }

    /// Records an execution and queues its write; never blocks.
    pub fn record(&mut self, task_id: &str, execution_id: &str) {
        // Ids with line or field separators cannot be written back unambiguously.
        if [task_id, execution_id]
            .iter()
            .any(|id| id.contains(['\t', '\n', '\r']))
        {
            return;
        }
        if !self.remember(task_id.to_owned(), execution_id.to_owned()) {
            return;
        }
        let write = if self.order.len() > MAX_ENTRIES {
            while self.order.len() > MAX_ENTRIES / 2 {
                if let Some(oldest) = self.order.pop_front() {
                    self.entries.remove(&oldest);
                }
            }
            FileWrite::Rewrite(self.order.iter().map(line).collect())
        } else {
            FileWrite::Append(line(&(task_id.to_owned(), execution_id.to_owned())))
        };
        if let Some(writes) = &self.writes {
            // A writer that is gone has stopped the agent's shutdown already.
            let _ = writes.send(write);
        }
    }

    /// Stops queueing writes, so the writer finishes once the queued ones are done.
    pub fn close(&mut self) {
        self.writes = None;
    }

    fn remember(&mut self, task_id: String, execution_id: String) -> bool {
        let key = (task_id, execution_id);
        let new = self.entries.insert(key.clone());
        if new {
            self.order.push_back(key);
        }
        new
    }
}

fn line((task_id, execution_id): &(String, String)) -> String {
    format!("{task_id}\t{execution_id}\n")
}

impl ReportedWriter {
    /// Applies queued writes in order until the log is closed. A failed write is logged:
    /// the set in memory stays right, and only a restart could report an execution again.
    pub async fn run(mut self) {
        while let Some(write) = self.writes.recv().await {
            let path = self.path.clone();
            let done = tokio::task::spawn_blocking(move || apply(&path, write))
                .await
                .unwrap_or_else(|error| Err(io::Error::other(error)));
            if let Err(error) = done {
                tracing::warn!(
                    path = %self.path.display(),
                    "Cannot record a reported outcome: {error}"
                );
            }
        }
    }
}

fn apply(path: &Path, write: FileWrite) -> io::Result<()> {
    match write {
        FileWrite::Append(line) => fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(line.as_bytes()),
        FileWrite::Rewrite(lines) => {
            let staging = path.with_extension("tmp");
            let mut file = fs::File::create(&staging)?;
            for line in lines {
                file.write_all(line.as_bytes())?;
            }
            file.sync_all()?;
            fs::rename(&staging, path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn reopen(dir: &Path) -> ReportedLog {
        ReportedLog::open(dir).await.unwrap().0
    }

    #[tokio::test]
    async fn recorded_executions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, writer) = ReportedLog::open(dir.path()).await.unwrap();
        assert!(!log.contains("run-1", "exec-1"));
        log.record("run-1", "exec-1");
        log.record("run-1", "exec-1");
        log.record("run-2", "exec-2");
        log.record("bad\tid", "exec");
        assert!(
            log.contains("run-1", "exec-1"),
            "known before it is written"
        );
        log.close();
        writer.run().await;
        let reopened = reopen(dir.path()).await;
        assert!(reopened.contains("run-1", "exec-1"));
        assert!(reopened.contains("run-2", "exec-2"));
        assert!(!reopened.contains("run-1", "exec-2"));
        let lines = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(lines.lines().count(), 2, "no duplicate or unwritable lines");
    }

    #[tokio::test]
    async fn the_file_is_compacted_to_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, writer) = ReportedLog::open(dir.path()).await.unwrap();
        for i in 0..=MAX_ENTRIES {
            log.record(&format!("run-{i}"), "exec");
        }
        log.record("after", "compaction");
        drop(log);
        writer.run().await;
        let reopened = reopen(dir.path()).await;
        assert!(!reopened.contains("run-0", "exec"));
        assert!(reopened.contains(&format!("run-{MAX_ENTRIES}"), "exec"));
        assert!(reopened.contains("after", "compaction"));
        assert_eq!(reopened.order.len(), MAX_ENTRIES / 2 + 1);
    }
}
