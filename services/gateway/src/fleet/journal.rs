//! The gateway's journal of what it handed out: which node was given which execution, and
//! when the gateway was done with it. Written in the background (appended, fsync'd in
//! batches, a few milliseconds behind the fleet), read once at start: a restarted gateway
//! then knows which executions its nodes may still run, trusts a node's word about exactly
//! those, and holds Oz's re-offers of them until their node is back instead of starting
//! them a second time elsewhere.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

const FILE_NAME: &str = "ledger.journal";

/// Executions handed out and not settled when the journal was read: (task, execution) →
/// node.
pub type Recovered = HashMap<(String, String), Arc<str>>;

enum Entry {
    Given {
        task_id: String,
        execution_id: String,
        node_id: Arc<str>,
    },
    Settled {
        task_id: String,
        execution_id: String,
    },
}

impl Entry {
    fn line(&self) -> String {
        match self {
            Self::Given {
                task_id,
                execution_id,
                node_id,
            } => format!("G\t{task_id}\t{execution_id}\t{node_id}\n"),
            Self::Settled {
                task_id,
                execution_id,
            } => format!("S\t{task_id}\t{execution_id}\n"),
        }
    }
}

/// Ids that cannot be written as one tab-separated line are not journaled (Oz's ids are
/// UUIDs; such an execution just loses the restart protection).
fn writable(ids: &[&str]) -> bool {
    ids.iter().all(|id| !id.contains(['\t', '\n', '\r']))
}

/// The fleet's side: queues entries, never blocks.
pub struct Journal {
    entries: Option<mpsc::UnboundedSender<Entry>>,
}

/// The writer's side: appends what is queued until the journal is closed.
pub struct JournalWriter {
    path: PathBuf,
    entries: mpsc::UnboundedReceiver<Entry>,
}

impl Journal {
    /// Reads the journal in `state_dir` (creating the directory), rewrites it with only the
    /// executions still open, and returns them with the journal to keep writing.
    /// Blocking: call it before the runtime is busy, or off its threads.
    pub fn open(state_dir: &Path) -> io::Result<(Self, JournalWriter, Recovered)> {
        fs::create_dir_all(state_dir)?;
        let path = state_dir.join(FILE_NAME);
        let contents = match fs::read_to_string(&path) {
            Ok(contents) => contents,
            Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(error),
        };
        let mut open: Recovered = HashMap::new();
        for line in contents.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields.as_slice() {
                ["G", task_id, execution_id, node_id] => {
                    open.insert(
                        ((*task_id).to_owned(), (*execution_id).to_owned()),
                        Arc::from(*node_id),
                    );
                }
                ["S", task_id, execution_id] => {
                    open.remove(&((*task_id).to_owned(), (*execution_id).to_owned()));
                }
                // A line torn by a crash mid-write: everything before it is intact.
                _ => {}
            }
        }
        // Compact: only what is still open, written whole before it replaces the old file.
        let mut compacted = tempfile::NamedTempFile::new_in(state_dir)?;
        for ((task_id, execution_id), node_id) in &open {
            compacted.write_all(
                Entry::Given {
                    task_id: task_id.clone(),
                    execution_id: execution_id.clone(),
                    node_id: node_id.clone(),
                }
                .line()
                .as_bytes(),
            )?;
        }
        compacted.as_file().sync_all()?;
        compacted.persist(&path).map_err(|error| error.error)?;
        fs::File::open(state_dir)?.sync_all()?;
        let (sender, receiver) = mpsc::unbounded_channel();
        Ok((
            Self {
                entries: Some(sender),
            },
            JournalWriter {
                path,
                entries: receiver,
            },
            open,
        ))
    }

    /// A journal that records nothing (no state dir).
    pub fn disabled() -> Self {
        Self { entries: None }
    }

    /// Whether entries are kept (a state dir is in use).
    pub fn is_enabled(&self) -> bool {
        self.entries.is_some()
    }

    pub fn given(&self, task_id: &str, execution_id: &str, node_id: &Arc<str>) {
        if writable(&[task_id, execution_id, node_id])
            && let Some(entries) = &self.entries
        {
            let _ = entries.send(Entry::Given {
                task_id: task_id.to_owned(),
                execution_id: execution_id.to_owned(),
                node_id: node_id.clone(),
            });
        }
    }

    pub fn settled(&self, task_id: &str, execution_id: &str) {
        if writable(&[task_id, execution_id])
            && let Some(entries) = &self.entries
        {
            let _ = entries.send(Entry::Settled {
                task_id: task_id.to_owned(),
                execution_id: execution_id.to_owned(),
            });
        }
    }

    /// No more entries: the writer finishes what is queued and ends.
    pub fn close(&mut self) {
        self.entries = None;
    }
}

impl JournalWriter {
    /// Appends entries as they come, one fsync per batch, until the journal is closed.
    /// Blocking: run it on the blocking pool.
    pub fn run(mut self) -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)?;
        while let Some(first) = self.entries.blocking_recv() {
            let mut batch = first.line();
            while let Ok(next) = self.entries.try_recv() {
                batch.push_str(&next.line());
            }
            file.write_all(batch.as_bytes())?;
            file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_executions_survive_a_restart_and_settled_ones_do_not() {
        let state = tempfile::tempdir().unwrap();
        let (mut journal, writer, recovered) = Journal::open(state.path()).unwrap();
        assert!(recovered.is_empty());
        let node_a: Arc<str> = Arc::from("node-a");
        let node_b: Arc<str> = Arc::from("node-b");
        journal.given("run-1", "exec-1", &node_a);
        journal.given("run-2", "exec-2", &node_a);
        // Offered to a, then placed on b: b has it.
        journal.given("run-2", "exec-2", &node_b);
        journal.given("run-3", "exec-3", &node_a);
        journal.settled("run-3", "exec-3");
        journal.given("bad\tid", "exec", &node_a);
        journal.close();
        writer.run().unwrap();
        // A crash mid-line leaves a torn last line.
        fs::OpenOptions::new()
            .append(true)
            .open(state.path().join(FILE_NAME))
            .unwrap()
            .write_all(b"G\trun-9\tex")
            .unwrap();

        let (_journal, _writer, recovered) = Journal::open(state.path()).unwrap();
        assert_eq!(recovered.len(), 2);
        assert_eq!(
            recovered[&("run-1".to_owned(), "exec-1".to_owned())],
            node_a
        );
        assert_eq!(
            recovered[&("run-2".to_owned(), "exec-2".to_owned())],
            node_b
        );
        // Compacted: only the open executions are left in the file.
        let contents = fs::read_to_string(state.path().join(FILE_NAME)).unwrap();
        assert_eq!(contents.lines().count(), 2, "{contents}");
    }
}
