//! The reconnect policy shared by both dialers: the gateway dialing Oz and node agents
//! dialing the gateway.

use std::time::Duration;

use rand::Rng;

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

#[cfg(test)]
mod tests {
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
}
