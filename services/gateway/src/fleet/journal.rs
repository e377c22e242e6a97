//! The gateway's journal of what it handed out: which node was given which execution, and
//! when the gateway was done with it. Written in the background (appended, fsync'd in
//! batches), read once at start: a restarted gateway then knows which executions its
//! nodes may still run, trusts a node's word about exactly those, and holds Oz's re-offers
//! of them until their node is back instead of starting them a second time elsewhere.
//!
//! Write-ahead: the outbox holds every message to Oz until each journal entry made before
//! it is on disk ([`Durability`]), so Oz never hears of a claim or an outcome that a
//! crash right after could make the gateway forget. The fleet itself never waits for the
//! disk; the journal's queue is bounded by the outbox's, which stops reading Oz when full.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};

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
    /// Entries queued so far (the writer counts the same entries in the same order).
    queued: Arc<AtomicU64>,
    durable: watch::Receiver<u64>,
}

/// The writer's side: appends what is queued until the journal is closed.
pub struct JournalWriter {
    path: PathBuf,
    entries: mpsc::UnboundedReceiver<Entry>,
    /// Entries on disk so far.
    durable: watch::Sender<u64>,
}

/// How far the journal is on disk, for holding messages until what led to them is.
#[derive(Clone)]
pub struct Durability {
    queued: Arc<AtomicU64>,
    durable: watch::Receiver<u64>,
}

impl Durability {
    /// The mark of a message created now: every entry queued so far must be on disk
    /// before it is sent.
    pub fn mark(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    /// Entries known to be on disk; everything once the writer has stopped (closed at
    /// shutdown, or failed on a disk error, which it logged: nothing more would ever be
    /// written, and holding Oz's messages forever would lose them instead).
    pub fn durable_through(&self) -> u64 {
        match self.durable.has_changed() {
            Err(_) => u64::MAX,
            Ok(_) => *self.durable.borrow(),
        }
    }

    /// Waits until entries up to `mark` are on disk (or the writer stopped).
    pub async fn wait_for(&self, mark: u64) {
        let mut durable = self.durable.clone();
        // An error means the writer stopped; see `durable_through`.
        let _ = durable.wait_for(|durable| *durable >= mark).await;
    }

    /// A durability to drive by hand: entries queued, entries on disk.
    #[cfg(test)]
    pub(crate) fn for_test() -> (Self, Arc<AtomicU64>, watch::Sender<u64>) {
        let (sender, durable) = watch::channel(0);
        let queued = Arc::new(AtomicU64::new(0));
        (
            Self {
                queued: queued.clone(),
                durable,
            },
            queued,
            sender,
        )
    }
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
        let (durable_sender, durable) = watch::channel(0);
        Ok((
            Self {
                entries: Some(sender),
                queued: Arc::new(AtomicU64::new(0)),
                durable,
            },
            JournalWriter {
                path,
                entries: receiver,
                durable: durable_sender,
            },
            open,
        ))
    }

    /// A journal that records nothing (no state dir).
    pub fn disabled() -> Self {
        let (_, durable) = watch::channel(0);
        Self {
            entries: None,
            queued: Arc::new(AtomicU64::new(0)),
            durable,
        }
    }

    /// The mark of a message created now (see [`Durability::mark`]).
    pub fn mark(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    /// How far this journal is on disk (see [`Durability`]).
    pub fn durability(&self) -> Durability {
        Durability {
            queued: self.queued.clone(),
            durable: self.durable.clone(),
        }
    }

    fn queue(&self, entry: Entry) {
        if let Some(entries) = &self.entries
            && entries.send(entry).is_ok()
        {
            self.queued.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether entries are kept (a state dir is in use).
    pub fn is_enabled(&self) -> bool {
        self.entries.is_some()
    }

    pub fn given(&self, task_id: &str, execution_id: &str, node_id: &Arc<str>) {
        if writable(&[task_id, execution_id, node_id]) && self.is_enabled() {
            self.queue(Entry::Given {
                task_id: task_id.to_owned(),
                execution_id: execution_id.to_owned(),
                node_id: node_id.clone(),
            });
        }
    }

    pub fn settled(&self, task_id: &str, execution_id: &str) {
        if writable(&[task_id, execution_id]) && self.is_enabled() {
            self.queue(Entry::Settled {
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
    /// Appends entries as they come, one fsync per batch (what queued up during the last
    /// one), and publishes how many are on disk, until the journal is closed.
    /// Blocking: run it on the blocking pool.
    pub fn run(mut self) -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)?;
        let mut written = 0;
        while let Some(first) = self.entries.blocking_recv() {
            let mut batch = first.line();
            let mut entries = 1;
            while let Ok(next) = self.entries.try_recv() {
                batch.push_str(&next.line());
                entries += 1;
            }
            file.write_all(batch.as_bytes())?;
            file.sync_data()?;
            written += entries;
            self.durable.send_replace(written);
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
        let durability = journal.durability();
        // Five entries queued (the one with a tab is not journaled), none on disk yet.
        assert_eq!(durability.mark(), 5);
        assert_eq!(durability.durable_through(), 0);
        let mut watching = durability.durable.clone();
        journal.close();
        writer.run().unwrap();
        assert_eq!(*watching.borrow_and_update(), 5, "all five on disk");
        // The writer has stopped: nothing is held for it any more.
        assert_eq!(durability.durable_through(), u64::MAX);
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
