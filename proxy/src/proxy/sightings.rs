//! Clients that authenticated from an address the allowlist does not allow
//! (only audit mode lets them that far): the worker's half of `edgegate
//! allow suggest`. Kept until the gate's next report request takes them,
//! and bounded: once [`MAX_SIGHTINGS`] distinct (address, name) pairs wait,
//! further new pairs are dropped until then; known pairs still count.

use std::{collections::HashMap, net::IpAddr, sync::Mutex};

use crate::{
    privsep::protocol::{MAX_NAME_BYTES, MAX_NAMES, MAX_SIGHTINGS, Sighting},
    tls::ClientName,
};

#[derive(Default)]
pub(super) struct Sightings {
    waiting: Mutex<HashMap<(IpAddr, ClientName), Seen>>,
}

struct Seen {
    connections: u64,
    first_seen: u64,
    last_seen: u64,
}

impl Sightings {
    /// Counts one authenticated connection of `name` from `address`.
    pub(super) fn record(&self, address: IpAddr, name: ClientName) {
        let now = u64::try_from(crate::clock::unix_seconds()).unwrap_or(0);
        let mut waiting = self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = waiting.len() >= MAX_SIGHTINGS;
        let key = (address, within_bounds(name));
        match waiting.get_mut(&key) {
            Some(seen) => {
                seen.connections += 1;
                seen.last_seen = now;
            }
            None if full => {}
            None => {
                waiting.insert(key, Seen { connections: 1, first_seen: now, last_seen: now });
            }
        }
    }

    /// Everything recorded since the last call, for `listener`'s report.
    pub(super) fn take(&self, listener: &str) -> Vec<Sighting> {
        let mut waiting = self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        waiting
            .drain()
            .map(|((address, name), seen)| Sighting {
                listener: listener.to_owned(),
                address,
                name,
                connections: seen.connections,
                first_seen: seen.first_seen,
                last_seen: seen.last_seen,
            })
            .collect()
    }
}

/// The name cut to what the gate accepts in a report: a certificate with
/// more or longer names than that is still a partner worth suggesting.
fn within_bounds(mut name: ClientName) -> ClientName {
    let cut = |name: &mut String| {
        if name.len() > MAX_NAME_BYTES {
            let end = (0..=MAX_NAME_BYTES).rev().find(|&i| name.is_char_boundary(i)).unwrap_or(0);
            name.truncate(end);
        }
    };
    name.common_name.iter_mut().for_each(cut);
    name.dns.iter_mut().for_each(cut);
    name.uris.iter_mut().for_each(cut);
    let room = MAX_NAMES - usize::from(name.common_name.is_some());
    name.dns.truncate(room);
    name.uris.truncate(room - name.dns.len());
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(cn: &str) -> ClientName {
        ClientName { common_name: Some(cn.into()), ..ClientName::default() }
    }

    #[test]
    fn repeated_clients_are_counted_once_and_taken_once() {
        let sightings = Sightings::default();
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        sightings.record(a, name("partner-a"));
        sightings.record(a, name("partner-a"));
        sightings.record(a, name("partner-b"));
        let mut taken = sightings.take("edge");
        taken.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(taken.len(), 2);
        assert_eq!((taken[0].connections, taken[1].connections), (2, 1));
        assert!(taken.iter().all(|s| s.listener == "edge" && s.address == a));
        assert!(sightings.take("edge").is_empty());
    }

    #[test]
    fn new_pairs_beyond_the_bound_are_dropped_known_ones_still_count() {
        let sightings = Sightings::default();
        let first: IpAddr = "10.0.0.0".parse().unwrap();
        for i in 0..MAX_SIGHTINGS as u32 + 10 {
            sightings.record(IpAddr::V4((0x0a00_0000 + i).into()), name("p"));
        }
        sightings.record(first, name("p"));
        let taken = sightings.take("edge");
        assert_eq!(taken.len(), MAX_SIGHTINGS);
        assert_eq!(taken.iter().find(|s| s.address == first).map(|s| s.connections), Some(2));
    }

    #[test]
    fn names_are_cut_to_the_reports_bounds() {
        let long = "é".repeat(MAX_NAME_BYTES);
        let cut = within_bounds(ClientName {
            common_name: Some(long.clone()),
            dns: vec![long.clone(); MAX_NAMES],
            uris: vec![long],
        });
        assert_eq!(cut.names().count(), MAX_NAMES);
        assert!(cut.names().all(|n| n.len() <= MAX_NAME_BYTES && !n.is_empty()));
        assert!(cut.uris.is_empty());
    }
}
