//! Go `time.ParseDuration`, reproduced byte for byte so that every duration an
//! oz-agent-worker config accepts is accepted here, and everything it rejects
//! is rejected with the same message.

use std::time::Duration;

use crate::quote::time_quote;

/// Why a string is not a Go duration. Display matches Go's `time` errors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Malformed number, empty input or overflow of Go's int64 nanoseconds.
    #[error("time: invalid duration {}", time_quote(.0))]
    Invalid(String),
    /// A number without a unit (only a bare `0` may omit it).
    #[error("time: missing unit in duration {}", time_quote(.0))]
    MissingUnit(String),
    /// A suffix that is none of `ns us µs μs ms s m h`.
    #[error("time: unknown unit {} in duration {}", time_quote(.unit), time_quote(.input))]
    UnknownUnit {
        /// The offending suffix.
        unit: String,
        /// The whole input.
        input: String,
    },
}

/// Go durations are int64 nanoseconds; 2^63 itself is only reachable as a
/// negative value.
const LIMIT: u64 = 1 << 63;

/// Parses Go duration syntax (`30s`, `2m`, `1h30m`, `1.5h`, `500ms`, `0`).
///
/// Go also accepts negative durations. Every setting that takes one treats a
/// non-positive value as "off / use the default", so a negative input is
/// returned as [`Duration::ZERO`] rather than rejected: a config that relies
/// on `-1s` keeps working the way it did under the reference worker.
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(input.to_owned());

    let mut s = input;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(invalid());
    }

    let mut total: u64 = 0;
    while !s.is_empty() {
        if !s.starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
            return Err(invalid());
        }

        let (mut value, rest) = leading_int(s).ok_or_else(invalid)?;
        let had_integer = rest.len() != s.len();
        s = rest;

        let mut fraction = 0;
        let mut scale = 1.0;
        let mut had_fraction = false;
        if let Some(rest) = s.strip_prefix('.') {
            let (f, sc, after) = leading_fraction(rest);
            had_fraction = after.len() != rest.len();
            (fraction, scale, s) = (f, sc, after);
        }
        if !had_integer && !had_fraction {
            return Err(invalid());
        }

        // The unit runs up to the next number; both delimiters are ASCII, so
        // the split is always on a char boundary.
        let unit_len = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if unit_len == 0 {
            return Err(DurationError::MissingUnit(input.to_owned()));
        }
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        let unit_nanos = unit_nanos(unit).ok_or_else(|| DurationError::UnknownUnit {
            unit: unit.to_owned(),
            input: input.to_owned(),
        })?;

        if value > LIMIT / unit_nanos {
            return Err(invalid());
        }
        value *= unit_nanos;
        if fraction > 0 {
            // Same float arithmetic as Go, so rounding of e.g. `1.1ns` agrees.
            value += (fraction as f64 * (unit_nanos as f64 / scale)) as u64;
            if value > LIMIT {
                return Err(invalid());
            }
        }
        total = total
            .checked_add(value)
            .filter(|t| *t <= LIMIT)
            .ok_or_else(invalid)?;
    }

    if negative {
        return Ok(Duration::ZERO);
    }
    if total > LIMIT - 1 {
        return Err(invalid());
    }
    Ok(Duration::from_nanos(total))
}

fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        // U+00B5 (micro sign) and U+03BC (Greek mu) are both accepted by Go.
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return None,
    })
}

/// Consumes leading ASCII digits; `None` when the number exceeds 2^63.
fn leading_int(s: &str) -> Option<(u64, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let mut x: u64 = 0;
    for b in s[..digits].bytes() {
        if x > LIMIT / 10 {
            return None;
        }
        x = x * 10 + u64::from(b - b'0');
        if x > LIMIT {
            return None;
        }
    }
    Some((x, &s[digits..]))
}

/// Consumes the digits after a `.`, returning the digits as an integer and the
/// power of ten they are scaled by. Digits beyond int64 precision are consumed
/// but ignored, as in Go.
fn leading_fraction(s: &str) -> (u64, f64, &str) {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let mut x: u64 = 0;
    let mut scale = 1.0;
    for b in s[..digits].bytes() {
        if x > (LIMIT - 1) / 10 {
            break;
        }
        let y = x * 10 + u64::from(b - b'0');
        if y > LIMIT {
            break;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, &s[digits..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse_go_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        parse_go_duration(s).unwrap_err().to_string()
    }

    #[test]
    fn accepts_go_syntax() {
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("+0"), Duration::ZERO);
        assert_eq!(ok("+5s"), Duration::from_secs(5));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("1.s"), Duration::from_secs(1));
        assert_eq!(ok("3ns"), Duration::from_nanos(3));
        assert_eq!(ok("7us"), Duration::from_micros(7));
        assert_eq!(ok("7\u{b5}s"), Duration::from_micros(7));
        assert_eq!(ok("7\u{3bc}s"), Duration::from_micros(7));
        assert_eq!(ok("1h2m3s4ms"), Duration::from_millis(3_723_004));
        assert_eq!(ok("2562047h"), Duration::from_secs(2_562_047 * 3600));
    }

    #[test]
    fn negative_durations_clamp_to_zero() {
        assert_eq!(ok("-1s"), Duration::ZERO);
        assert_eq!(ok("-0"), Duration::ZERO);
    }

    #[test]
    fn rejects_with_go_messages() {
        assert_eq!(err("nope"), r#"time: invalid duration "nope""#);
        assert_eq!(err(""), r#"time: invalid duration """#);
        assert_eq!(err("-"), r#"time: invalid duration "-""#);
        assert_eq!(err("."), r#"time: invalid duration ".""#);
        assert_eq!(err("1"), r#"time: missing unit in duration "1""#);
        assert_eq!(err("30"), r#"time: missing unit in duration "30""#);
        assert_eq!(err("1x"), r#"time: unknown unit "x" in duration "1x""#);
        assert_eq!(
            err("1h 30m"),
            r#"time: unknown unit "h " in duration "1h 30m""#
        );
        assert_eq!(err("1S"), r#"time: unknown unit "S" in duration "1S""#);
        assert_eq!(err(" 1s"), r#"time: invalid duration " 1s""#);
        assert_eq!(err("2562048h"), r#"time: invalid duration "2562048h""#);
        assert_eq!(
            err("99999999999999999999s"),
            r#"time: invalid duration "99999999999999999999s""#
        );
    }
}
