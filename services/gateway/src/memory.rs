//! Hands memory freed after a burst of work back to the system.
//!
//! glibc's malloc keeps what a burst freed in its per-thread arenas: after 60,000 tasks at
//! 5,000/s the gateway's RSS stayed 10–40 % above where it started (BENCHMARKS.md). Once
//! the fleet has been idle for a while after being busy, the gateway asks malloc to
//! return its free pages (`malloc_trim`), once per quiet spell. Never while busy: the trim
//! takes each arena's lock in turn, which would stall allocations on the dispatch path.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;

/// How long the fleet must see no transition before memory is trimmed.
const QUIET_BEFORE_TRIM: Duration = Duration::from_millis(500);

/// Checks the fleet every [`QUIET_BEFORE_TRIM`]; trims once after each busy spell.
pub async fn trim_when_idle(fleet: Arc<Fleet>, stop: CancellationToken) {
    after_each_busy_spell(fleet, stop, trim).await;
}

/// Runs `action` (off the runtime's threads) once the fleet, after changing, has seen no
/// transition for [`QUIET_BEFORE_TRIM`].
async fn after_each_busy_spell(
    fleet: Arc<Fleet>,
    stop: CancellationToken,
    action: impl Fn() + Clone + Send + 'static,
) {
    let mut tick = tokio::time::interval(QUIET_BEFORE_TRIM);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = fleet.transitions();
    let mut trimmed_at = seen;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = fleet.transitions();
        let quiet = now == seen;
        seen = now;
        if quiet && now != trimmed_at {
            trimmed_at = now;
            // Walks the heap: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(action.clone()).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free memory; it takes malloc's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ozfleet_proto::v1::UpstreamSettings;

    use super::*;
    use crate::fleet::FleetTimings;
    use crate::outbox::Outbox;

    #[tokio::test(start_paused = true)]
    async fn memory_is_trimmed_once_after_each_busy_spell_and_never_while_busy() {
        let fleet = Fleet::new(
            Arc::new(Outbox::default()),
            UpstreamSettings::default(),
            FleetTimings::default(),
        );
        let trims = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let mut trimmer = tokio::task::JoinSet::new();
        trimmer.spawn(after_each_busy_spell(fleet.clone(), stop.clone(), {
            let trims = trims.clone();
            move || {
                trims.fetch_add(1, Ordering::SeqCst);
            }
        }));
        let count = || trims.load(Ordering::SeqCst);

        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(count(), 0, "nothing happened: nothing to give back");
        // Busy: a transition every 100 ms for 3 s.
        for step in 0..30 {
            fleet.set_upstream_connected(step % 2 == 0);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(count(), 0, "trimmed while busy");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count(), 1, "once quiet");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(count(), 1, "once per quiet spell");
        fleet.set_upstream_connected(true);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count(), 2, "after the next busy spell");
        stop.cancel();
        trimmer.join_next().await.unwrap().unwrap();
    }
}
