//! The process's log writer: lines are appended to a bounded in-memory batch that a
//! dedicated thread writes out, so the code that logs (often holding the fleet lock)
//! never waits for a terminal, a pipe or a disk.
//!
//! Unlike a channel with one wake-up per line (`tracing-appender`'s), the writer thread
//! is woken once per batch: by the first line after a quiet spell, after which it lets
//! lines gather for [`GATHER`] and writes them with one `write(2)`. At thousands of lines
//! a second that is a few hundred wake-ups instead of thousands, each of which cost a
//! futex call and a context switch (measured: a fifth of the gateway's CPU at 5,000
//! tasks/s). Nothing is dropped: when [`BATCH_LIMIT`] bytes wait, logging waits for the
//! writer (a stuck stderr eventually stalls the process, as it would with a direct write).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long the writer thread lets lines gather after the first one wakes it.
const GATHER: Duration = Duration::from_millis(5);
/// Bytes of lines that may wait for the writer before logging waits.
const BATCH_LIMIT: usize = 1024 * 1024;
/// A batch buffer larger than this after a burst is given back.
const KEPT_CAPACITY: usize = 64 * 1024;

#[derive(Default)]
struct Batch {
    lines: Vec<u8>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    batch: Mutex<Batch>,
    /// The writer thread waits here for a first line.
    pending: Condvar,
    /// Loggers wait here while the batch is full.
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Batch> {
        // A panic while appending leaves whole lines or a partial one: still writable.
        self.batch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A handle loggers write through (`tracing_subscriber`'s `MakeWriter`). Each `write` is
/// appended whole, so lines from several threads never interleave as long as a line is
/// written with one call (tracing's fmt layer writes each event with one `write_all`).
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Writes out what is left and stops the writer thread when dropped: keep it for the
/// life of the process.
#[must_use = "dropping the guard stops logging; keep it until the process ends"]
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the writer thread writing to `out`.
pub fn batched<W: Write + Send + 'static>(out: W) -> std::io::Result<(BatchedWriter, WriterGuard)> {
    let shared = Arc::new(Shared::default());
    let thread = std::thread::Builder::new()
        .name("ozfleet-log".into())
        .spawn({
            let shared = shared.clone();
            move || write_batches(&shared, out)
        })?;
    Ok((
        BatchedWriter {
            shared: shared.clone(),
        },
        WriterGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    loop {
        let mut batch = shared.lock();
        while batch.lines.is_empty() && !batch.closed {
            batch = shared
                .pending
                .wait(batch)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if batch.lines.is_empty() {
            return; // closed, and everything written
        }
        if !batch.closed {
            drop(batch);
            std::thread::sleep(GATHER);
            batch = shared.lock();
        }
        let mut lines = std::mem::replace(&mut batch.lines, std::mem::take(&mut spare));
        drop(batch);
        shared.drained.notify_all();
        // Nowhere to report a failing stderr; the lines are dropped, logging goes on.
        let _ = out.write_all(&lines).and_then(|()| out.flush());
        lines.clear();
        lines.shrink_to(KEPT_CAPACITY);
        spare = lines;
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut batch = self.shared.lock();
        while !batch.lines.is_empty() && batch.lines.len() + line.len() > BATCH_LIMIT {
            batch = self
                .shared
                .drained
                .wait(batch)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let first = batch.lines.is_empty();
        batch.lines.extend_from_slice(line);
        drop(batch);
        if first {
            self.shared.pending.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.pending.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `out` the test can read back, that can be made to block.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.written.lock().unwrap().extend_from_slice(bytes);
            *self.writes.lock().unwrap() += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_and_lines_are_batched() {
        let sink = Sink::default();
        let (writer, guard) = batched(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let mut writer = writer.clone();
                std::thread::Builder::new()
                    .spawn(move || {
                        for line in 0..5_000 {
                            // One call per line, like tracing's fmt layer.
                            let line = format!("thread {thread} line {line}\n");
                            writer.write_all(line.as_bytes()).unwrap();
                        }
                    })
                    .unwrap()
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let written = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        for thread in 0..4 {
            let lines: Vec<usize> = written
                .lines()
                .filter_map(|line| line.strip_prefix(&format!("thread {thread} line ")))
                .map(|number| number.parse().unwrap())
                .collect();
            assert_eq!(lines, (0..5_000).collect::<Vec<_>>(), "thread {thread}");
        }
        let writes = *sink.writes.lock().unwrap();
        assert!(writes < 20_000, "{writes} writes for 20,000 lines");
    }

    #[test]
    fn a_full_batch_makes_logging_wait_for_the_writer_instead_of_dropping_lines() {
        // The writer thread blocks in its first write until the test lets it go.
        #[derive(Clone)]
        struct Gate {
            open: Arc<(Mutex<bool>, Condvar)>,
            sink: Sink,
        }
        impl Write for Gate {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                let (open, changed) = &*self.open;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = changed.wait(open).unwrap();
                }
                self.sink.write(bytes)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Gate {
            open: Arc::default(),
            sink: Sink::default(),
        };
        let (writer, guard) = batched(gate.clone()).unwrap();
        let line = vec![b'x'; 1023];
        let logger = std::thread::Builder::new()
            .spawn({
                let mut writer = writer.clone();
                let line = line.clone();
                move || {
                    // Three batch limits' worth while the writer is stuck.
                    for _ in 0..3 * 1024 {
                        writer.write_all(&line).unwrap();
                        writer.write_all(b"\n").unwrap();
                    }
                }
            })
            .unwrap();
        // The logger fills the batch and then waits: what is queued stays bounded.
        let waiting = || {
            let batch = writer.shared.lock();
            batch.lines.len() + line.len() + 1 > BATCH_LIMIT
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !waiting() {
            assert!(
                std::time::Instant::now() < deadline,
                "the logger never filled the batch"
            );
            std::thread::yield_now();
        }
        assert!(!logger.is_finished());
        assert!(writer.shared.lock().lines.len() <= BATCH_LIMIT);
        let (open, changed) = &*gate.open;
        *open.lock().unwrap() = true;
        changed.notify_all();
        logger.join().unwrap();
        drop(guard);
        assert_eq!(gate.sink.written.lock().unwrap().len(), 3 * 1024 * 1024);
    }
}
