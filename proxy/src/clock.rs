//! Wall-clock time as Unix time, for what crosses hosts, files and
//! certificates: fleet commit and apply times in etcd, when a source was
//! seen, certificate and CRL lifetimes, ticket ages. Intervals within one
//! process are measured with `Instant`, which the wall clock cannot move.
//!
//! A clock set before 1970 reads as the epoch itself, and a time too large
//! for the unit as its maximum: no caller has a better answer than "long
//! ago" or "far ahead", and none may panic on a wrong clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, as the time since the Unix epoch.
pub fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    millis(since_epoch())
}

/// Now, in Unix seconds (the unit of certificate lifetimes).
pub fn unix_seconds() -> i64 {
    seconds(since_epoch())
}

fn millis(since: Duration) -> u64 {
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn seconds(since: Duration) -> i64 {
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_units_agree() {
        let before = since_epoch();
        let (ms, s) = (unix_ms(), unix_seconds());
        let after = since_epoch();
        assert!(millis(before) <= ms && ms <= millis(after));
        assert!(seconds(before) <= s && s <= seconds(after));
        // 2020-01-01: a clock that reads earlier is not the system's.
        assert!(s > 1_577_836_800, "{s}");
    }

    /// Times too large for the unit saturate instead of wrapping.
    #[test]
    fn conversions_saturate() {
        assert_eq!(millis(Duration::from_millis(1_234)), 1_234);
        assert_eq!(seconds(Duration::from_millis(1_999)), 1);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(seconds(Duration::MAX), i64::MAX);
    }
}
