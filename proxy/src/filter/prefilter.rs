//! The prefilters in front of the rule lookup (see
//! [`proxy_common::PREFILTER_LEVELS`]): per family, which 24-bit source
//! prefixes any rule overlaps, and which 20- and 16-bit ones. They are written
//! through a shared mapping, and only ever as a superset of what the rules in
//! the maps need: a bit set too many sends a packet on to the full lookup,
//! a bit missing would drop a listed source.

use std::{net::IpAddr, sync::atomic::Ordering};

use ipnet::IpNet;
use proxy_common::{PREFILTER_LEVELS, PREFILTER_WORDS, prefilter_level_offset};

use super::sys::MappedWords;

/// Bits of the prefilter the rules in `cidrs` of one family (`ipv6` or not)
/// need: for each rule, every 24-bit prefix it overlaps and, on each
/// coarser level, the prefixes those are in.
pub(super) fn bits<'a>(cidrs: impl IntoIterator<Item = &'a IpNet>, ipv6: bool) -> Vec<u64> {
    let mut words = vec![0u64; PREFILTER_WORDS as usize];
    for cidr in cidrs.into_iter().filter(|cidr| cidr.network().is_ipv6() == ipv6) {
        let (top, len) = (top_24_bits(cidr.network()), cidr.prefix_len());
        // A rule as long as a 24-bit prefix or longer lies within one; a
        // shorter one covers 2^(24 - len) of them, aligned.
        let count = 1u32 << 24u8.saturating_sub(len);
        for (level, bits) in PREFILTER_LEVELS.into_iter().enumerate() {
            let shift = 24 - bits;
            let start = prefilter_level_offset(level) as usize;
            let end = prefilter_level_offset(level + 1) as usize;
            set_bits(&mut words[start..end], top >> shift, (count >> shift).max(1));
        }
    }
    words
}

/// The 24-bit prefix the program indexes the prefilter by.
fn top_24_bits(address: IpAddr) -> u32 {
    match address {
        IpAddr::V4(a) => u32::from(a) >> 8,
        IpAddr::V6(a) => (u128::from(a) >> 104) as u32,
    }
}

/// Sets `count` bits from bit `first` on.
fn set_bits(words: &mut [u64], first: u32, count: u32) {
    let (first, end) = (first as usize, first as usize + count as usize);
    let mut bit = first;
    while bit < end {
        let offset = bit % 64;
        let run = (64 - offset).min(end - bit);
        let mask = if run == 64 { u64::MAX } else { ((1u64 << run) - 1) << offset };
        words[bit / 64] |= mask;
        bit += run;
    }
}

/// One family's prefilter map.
pub(super) struct Prefilter {
    mapped: MappedWords,
}

impl Prefilter {
    pub(super) fn new(mapped: MappedWords) -> Self {
        Self { mapped }
    }

    /// Makes the map hold `bits`: each word that differs is stored whole (an
    /// aligned store, so the program sees the old word or the new one).
    pub(super) fn write(&self, bits: &[u64]) {
        for (word, &wanted) in self.mapped.words().iter().zip(bits) {
            if word.load(Ordering::Relaxed) != wanted {
                word.store(wanted, Ordering::Release);
            }
        }
        // The rule map updates that follow are system calls: the stores are
        // visible to the program before any of them.
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `bits` let `source` on to the full lookup, as the program reads them.
    pub(super) fn passes(bits: &[u64], source: IpAddr) -> bool {
        let top = top_24_bits(source);
        PREFILTER_LEVELS.into_iter().enumerate().all(|(level, length)| {
            let bit = top >> (24 - length);
            let word = prefilter_level_offset(level) + bit / 64;
            bits[word as usize] & (1 << (bit % 64)) != 0
        })
    }

    fn cidrs(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|c| c.parse().expect("CIDR")).collect()
    }

    #[test]
    fn a_source_passes_exactly_when_a_rule_overlaps_its_24_bit_prefix() {
        let rules = cidrs(&["203.0.113.7/32", "198.18.0.0/15", "10.1.2.0/23", "2001:db8::/32"]);
        let v4 = bits(&rules, false);
        let v6 = bits(&rules, true);
        let cases: &[(&str, bool)] = &[
            ("203.0.113.7", true),
            ("203.0.113.200", true), // same /24: the full lookup decides
            ("203.0.112.7", false),
            ("198.18.0.1", true),
            ("198.19.255.255", true),
            ("198.20.0.0", false),
            ("198.17.255.255", false),
            ("10.1.2.9", true),
            ("10.1.3.9", true),
            ("10.1.4.9", false),
            ("10.1.16.9", false), // same /16, another /20
            ("10.1.1.9", false),
            ("192.0.2.1", false),
        ];
        for (source, expected) in cases {
            let source: IpAddr = source.parse().expect("address");
            assert_eq!(passes(&v4, source), *expected, "{source}");
        }
        for (source, expected) in
            [("2001:db8::1", true), ("2001:db9::1", true), ("2001:eb8::1", false)]
        {
            let source: IpAddr = source.parse().expect("address");
            assert_eq!(passes(&v6, source), expected, "{source}");
        }
    }

    #[test]
    fn short_prefixes_fill_whole_words_and_the_default_route_fills_everything() {
        let everything = bits(&cidrs(&["0.0.0.0/0"]), false);
        assert!(everything.iter().all(|&w| w == u64::MAX));
        let none = bits(&cidrs(&["0.0.0.0/0"]), true);
        assert!(none.iter().all(|&w| w == 0), "an IPv4 rule sets no IPv6 bit");
        let eight = bits(&cidrs(&["10.0.0.0/8"]), false);
        let set: u32 = eight.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set, (1 << 16) + (1 << 12) + (1 << 8), "65536 /24s, 4096 /20s, 256 /16s");
        // One /24 sets one bit on each level, in the level's own words.
        let one = bits(&cidrs(&["10.1.2.0/24"]), false);
        let at = |level: usize| {
            let (start, end) = (prefilter_level_offset(level), prefilter_level_offset(level + 1));
            one[start as usize..end as usize].iter().map(|w| w.count_ones()).sum::<u32>()
        };
        assert_eq!([at(0), at(1), at(2)], [1, 1, 1]);
    }

    #[test]
    fn set_bits_covers_runs_across_word_boundaries() {
        let mut words = vec![0u64; 4];
        set_bits(&mut words, 60, 70);
        assert_eq!(words[0], 0xf << 60);
        assert_eq!(words[1], u64::MAX);
        assert_eq!(words[2], (1 << 2) - 1);
        assert_eq!(words[3], 0);
    }
}

#[cfg(test)]
mod property {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// A small deterministic generator (no dependency for one test).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 11
        }
    }

    #[test]
    fn every_address_a_rule_holds_passes() {
        let mut random = Lcg(7);
        for _ in 0..50 {
            let rules: Vec<IpNet> = (0..8)
                .map(|_| {
                    if random.next().is_multiple_of(2) {
                        let address = Ipv4Addr::from(random.next() as u32);
                        IpNet::new(IpAddr::V4(address), (random.next() % 33) as u8)
                    } else {
                        let address = Ipv6Addr::from(u128::from(random.next()) << 64);
                        IpNet::new(IpAddr::V6(address), (random.next() % 65) as u8)
                    }
                    .expect("prefix length in range")
                    .trunc()
                })
                .collect();
            let (v4, v6) = (bits(&rules, false), bits(&rules, true));
            for rule in &rules {
                for address in [rule.network(), rule.broadcast()] {
                    let bits = if address.is_ipv4() { &v4 } else { &v6 };
                    assert!(super::tests::passes(bits, address), "{address} in {rule}");
                }
            }
        }
    }
}
