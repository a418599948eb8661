//! The sample of dropped sources: which addresses the `denied` and
//! `unlisted` verdicts hit, with (estimated) packet counts.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use nix::time::{ClockId, clock_gettime};
use proxy_common::{DroppedSource, Reason, SourceKey, map};

use super::{Filter, FilterError, map_error};
use crate::status::DroppedSourceStatus;

impl Filter {
    /// The `limit` sources with the most dropped packets, most first.
    pub fn dropped_sources(&self, limit: usize) -> Result<Vec<DroppedSourceStatus>, FilterError> {
        if limit == 0 {
            // Walking the map is a system call per entry: only when asked.
            return Ok(Vec::new());
        }
        let clock = Clock::now();
        let mut sources = Vec::new();
        for entry in self.dropped.iter() {
            // An entry evicted between the key walk and its read is skipped.
            let Ok((key, seen)) = entry else { continue };
            sources.push(DroppedSourceStatus {
                source: source_addr(key),
                reason: Reason::from_raw(seen.reason).unwrap_or(Reason::Unlisted),
                packets: seen.packets,
                first_seen_ms: clock.unix_ms(seen.first_seen_ns),
                last_seen_ms: clock.unix_ms(seen.last_seen_ns),
            });
        }
        sources.sort_by(|a, b| b.packets.cmp(&a.packets).then(a.source.cmp(&b.source)));
        sources.truncate(limit);
        Ok(sources)
    }

    /// Whether `addr` is in the sample, and what it holds.
    pub fn dropped_source(&self, addr: IpAddr) -> Option<DroppedSource> {
        self.dropped.get(&source_key(addr), 0).ok()
    }

    /// Takes `addr` out of the sample (after a probe put it there).
    pub fn forget_dropped_source(&mut self, addr: IpAddr) -> Result<(), FilterError> {
        super::rules::ignore_missing(self.dropped.remove(&source_key(addr)))
            .map_err(map_error(map::DROPPED))
    }
}

/// The program keeps IPv4 sources as IPv4-mapped IPv6 addresses.
fn source_key(addr: IpAddr) -> SourceKey {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn source_addr(key: SourceKey) -> IpAddr {
    let v6 = Ipv6Addr::from(key);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// Converts the program's `CLOCK_MONOTONIC` stamps to wall-clock time.
struct Clock {
    monotonic_ns: u64,
    unix_ms: u64,
}

impl Clock {
    fn now() -> Self {
        let monotonic =
            clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(Duration::ZERO, Duration::from);
        Self {
            monotonic_ns: u64::try_from(monotonic.as_nanos()).unwrap_or(u64::MAX),
            unix_ms: crate::clock::unix_ms(),
        }
    }

    fn unix_ms(&self, monotonic_ns: u64) -> u64 {
        self.unix_ms.saturating_sub(self.monotonic_ns.saturating_sub(monotonic_ns) / 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_round_trip_through_the_programs_keys() {
        for addr in ["192.0.2.7", "2001:db8::7", "::ffff:0:1", "::"] {
            let addr: IpAddr = addr.parse().unwrap();
            let back = source_addr(source_key(addr));
            // `::ffff:0:1` is an IPv4-mapped address: it comes back as IPv4.
            assert_eq!(back.to_canonical(), addr.to_canonical(), "{addr}");
        }
        assert_eq!(source_key("192.0.2.7".parse().unwrap())[10..], [0xff, 0xff, 192, 0, 2, 7]);
    }

    #[test]
    fn monotonic_stamps_become_wall_clock_time() {
        let clock = Clock { monotonic_ns: 10_000_000_000, unix_ms: 1_000_000 };
        assert_eq!(clock.unix_ms(10_000_000_000), 1_000_000);
        assert_eq!(clock.unix_ms(7_000_000_000), 997_000);
        // A stamp taken after the clock was read is "now", not the future.
        assert_eq!(clock.unix_ms(11_000_000_000), 1_000_000);
    }
}
