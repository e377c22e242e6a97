//! The reconnect policy shared by both dialers, the gateway dialing Oz and node agents
//! dialing the gateway: [`Backoff`] and the loop that applies it, [`reconnect_loop`].

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Exponential backoff with jitter. Jitter keeps a fleet of dialers from reconnecting
/// in lockstep after a shared outage.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The reference worker's policy: 1 s doubling to 60 s.
    pub fn upstream() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// The nominal delay before the next attempt, without jitter.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Returns how long to wait before the next attempt and doubles the nominal delay.
    /// The wait is drawn uniformly from [delay/2, delay].
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = nominal / 2;
        half + rand::rng().random_range(Duration::ZERO..=nominal - half)
    }

    /// Called after a connection proved stable.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// What follows the end of a connection that proved stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStable {
    /// Dial again at once: the reference worker's rule for its one connection to Oz.
    Immediately,
    /// Wait the jittered initial delay, so a fleet of dialers that lost a shared peer at
    /// the same moment does not come back in lockstep.
    AfterInitialDelay,
}

/// Keeps a connection up until `stop`: calls `connect_and_serve`, which dials, serves the
/// connection until it ends and returns when it came up (`None` when it never did); then,
/// unless `stop` fired, waits the jittered backoff delay and calls it again. A connection
/// that stayed up for `stable_after` resets the backoff first, and the next attempt comes
/// as `after_stable` says. Shorter-lived connections count as failures, so a peer that
/// accepts and closes at once is not hammered.
///
/// `connect_and_serve` is never cancelled by this loop: it watches `stop` itself, so it
/// can end its connection cleanly. Time is tokio's, so paused-time tests drive it.
pub async fn reconnect_loop<F, Fut>(
    mut backoff: Backoff,
    stable_after: Duration,
    after_stable: AfterStable,
    stop: &CancellationToken,
    mut connect_and_serve: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<Instant>>,
{
    while !stop.is_cancelled() {
        let connected_at = connect_and_serve().await;
        if stop.is_cancelled() {
            break;
        }
        if connected_at.is_some_and(|at| at.elapsed() >= stable_after) {
            backoff.reset();
            if after_stable == AfterStable::Immediately {
                continue;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = stop.cancelled() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_range() {
        let mut backoff = Backoff::upstream();
        let mut nominals = Vec::new();
        for _ in 0..9 {
            let nominal = backoff.current();
            let delay = backoff.next_delay();
            assert!(
                delay >= nominal / 2 && delay <= nominal,
                "{delay:?} vs {nominal:?}"
            );
            nominals.push(nominal.as_secs());
        }
        assert_eq!(nominals, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        backoff.reset();
        assert_eq!(backoff.current(), Duration::from_secs(1));
    }

    /// Records when each attempt starts; `up_for` says how long each attempt stays
    /// connected (`None`: the dial fails).
    async fn attempts(after_stable: AfterStable, up_for: Vec<Option<Duration>>) -> Vec<Duration> {
        let stop = CancellationToken::new();
        let start = Instant::now();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let plan = Arc::new(Mutex::new(up_for.into_iter()));
        reconnect_loop(
            Backoff::new(Duration::from_secs(1), Duration::from_secs(8)),
            Duration::from_secs(10),
            after_stable,
            &stop,
            || {
                let (stop, starts, plan) = (stop.clone(), starts.clone(), plan.clone());
                async move {
                    starts.lock().unwrap().push(start.elapsed());
                    let Some(next) = plan.lock().unwrap().next() else {
                        stop.cancel();
                        return None;
                    };
                    let up_for = next?;
                    let connected_at = Instant::now();
                    tokio::time::sleep(up_for).await;
                    Some(connected_at)
                }
            },
        )
        .await;
        Arc::try_unwrap(starts).unwrap().into_inner().unwrap()
    }

    fn assert_within(gap: Duration, nominal_secs: f64) {
        let nominal = Duration::from_secs_f64(nominal_secs);
        assert!(
            gap >= nominal / 2 && gap <= nominal,
            "{gap:?} not in [{:?}, {nominal:?}]",
            nominal / 2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_a_stable_connection_resets_the_delay() {
        let starts = attempts(
            AfterStable::AfterInitialDelay,
            vec![None, None, None, Some(Duration::from_secs(30)), None],
        )
        .await;
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps.len(), 5, "{gaps:?}");
        assert_within(gaps[0], 1.0);
        assert_within(gaps[1], 2.0);
        assert_within(gaps[2], 4.0);
        // Up for 30 s (stable): the delay is back to the initial one.
        assert_within(gaps[3] - Duration::from_secs(30), 1.0);
        assert_within(gaps[4], 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_stable_connection_the_upstream_rule_redials_at_once() {
        let starts = attempts(
            AfterStable::Immediately,
            vec![None, Some(Duration::from_secs(30)), None],
        )
        .await;
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_within(gaps[0], 1.0);
        assert_eq!(
            gaps[1],
            Duration::from_secs(30),
            "no wait after a stable connection"
        );
        assert_within(gaps[2], 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_connection_keeps_backing_off() {
        let starts = attempts(
            AfterStable::Immediately,
            vec![None, Some(Duration::from_secs(2)), None],
        )
        .await;
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_within(gaps[0], 1.0);
        assert_within(gaps[1] - Duration::from_secs(2), 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_wait_at_once() {
        let stop = CancellationToken::new();
        let started = Instant::now();
        let mut calls = 0;
        let reconnecting = reconnect_loop(
            Backoff::new(Duration::from_secs(60), Duration::from_secs(60)),
            Duration::from_secs(10),
            AfterStable::Immediately,
            &stop,
            || {
                calls += 1;
                async { None }
            },
        );
        let stopping = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.cancel();
        };
        tokio::join!(reconnecting, stopping);
        assert_eq!(calls, 1);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
