//! The report both start-up benchmarks print: our time to a running task against the
//! platform's own CLI doing the same, as medians, p90s and their ratios.

use std::time::Duration;

/// Runs per side: `OZFLEET_BENCH_ITERATIONS`, default 10.
pub fn iterations() -> usize {
    std::env::var("OZFLEET_BENCH_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(10)
}

/// Prints the medians, p90s and the ratio ours/cli (target ≤ 1.0).
pub fn report(ours: &[Duration], cli: &[Duration]) {
    let (ours_median, ours_p90) = (percentile(ours, 50), percentile(ours, 90));
    let (cli_median, cli_p90) = (percentile(cli, 50), percentile(cli, 90));
    println!(
        "  ours: median {:>7.1} ms  p90 {:>7.1} ms",
        ms(ours_median),
        ms(ours_p90)
    );
    println!(
        "  cli:  median {:>7.1} ms  p90 {:>7.1} ms",
        ms(cli_median),
        ms(cli_p90)
    );
    println!(
        "  ratio ours/cli: median {:.2}  p90 {:.2}  (target ≤ 1.0)",
        ours_median.as_secs_f64() / cli_median.as_secs_f64(),
        ours_p90.as_secs_f64() / cli_p90.as_secs_f64()
    );
}

/// Nearest-rank percentile.
fn percentile(samples: &[Duration], percent: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
