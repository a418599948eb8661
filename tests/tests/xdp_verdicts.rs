//! The compiled XDP program under BPF_PROG_TEST_RUN: verdicts and counter
//! deltas for crafted frames of every header layout, and every truncation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use edgegate::{
    allowlist::Allowlist,
    config::{Scope, TunnelProtocol, Tunnels},
};
use edgegate_tests::{
    Lcg,
    harness::{XDP_DROP, XDP_PASS, XdpHarness, run},
    packet::{
        ETHERTYPE_IPV4, ETHERTYPE_IPV6, Extension, Fragment, Frame, TPID_QINQ, TPID_VLAN,
        Transport, arp, ethernet, ipv4, ipv6,
    },
};
use proxy_common::Framing;

const PORT: u16 = 443;
const LIST: &str = "\
203.0.113.0/24
deny 203.0.113.66/32
deny 198.51.100.0/24
198.51.100.7/32
2001:db8::/32
deny 2001:db8::66/128
";

const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const DENIED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
const UNLISTED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const ALLOWED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const DENIED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x66);
const UNLISTED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb9, 0, 0, 0, 0, 0, 1);

const TCP: Transport = Transport::Tcp { dst_port: PORT };

fn v4(src: Ipv4Addr, transport: Transport) -> Frame {
    ethernet(&[], ETHERTYPE_IPV4, ipv4(src, transport, &[], Fragment::default()))
}

fn v6(src: Ipv6Addr, extensions: &[Extension], transport: Transport) -> Frame {
    ethernet(&[], ETHERTYPE_IPV6, ipv6(src, extensions, transport))
}

/// Runs `frame` and asserts the verdict and that exactly the (family,
/// reason) counter moved, by one packet.
#[track_caller]
fn expect(harness: &XdpHarness, frame: &[u8], verdict: u32, family: &str, reason: &str) {
    expect_framed(harness, Framing::Ethernet, frame, verdict, family, reason);
}

/// As [`expect`], through the program for `framing`.
#[track_caller]
fn expect_framed(
    harness: &XdpHarness,
    framing: Framing,
    frame: &[u8],
    verdict: u32,
    family: &str,
    reason: &str,
) {
    let before = harness.counters();
    assert_eq!(
        harness.run_framed(framing, frame),
        verdict,
        "verdict for {family}/{reason}, {framing:?} frame {frame:02x?}"
    );
    let after = harness.counters();
    for (((slot, old), (_, new)), _) in before.iter().zip(&after).zip(0..) {
        let expected = u64::from(slot.0 == family && slot.1 == reason);
        assert_eq!(new - old, expected, "counter {slot:?} (expected {family}/{reason})");
    }
}

/// Audit mode: every frame is judged as in enforcing mode, passed, and a
/// would-be drop is counted apart, as would_drop with its reason.
#[track_caller]
fn expect_audited(harness: &XdpHarness, frame: &[u8], family: &str, reason: &str, drops: bool) {
    let (before, audited_before) = (harness.counters(), harness.would_drop_counters());
    assert_eq!(harness.run(frame), XDP_PASS, "audit verdict for {family}/{reason}");
    let (after, audited_after) = (harness.counters(), harness.would_drop_counters());
    let moved = |before: &[((String, String), u64)], after: &[((String, String), u64)]| {
        before
            .iter()
            .zip(after)
            .filter(|(old, new)| new.1 != old.1)
            .map(|(old, new)| (old.0.clone(), new.1 - old.1))
            .collect::<Vec<_>>()
    };
    let slot = vec![((family.to_owned(), reason.to_owned()), 1)];
    let (enforced, audited) = if drops { (vec![], slot) } else { (slot, vec![]) };
    assert_eq!(moved(&before, &after), enforced, "pass counters for {family}/{reason}");
    assert_eq!(moved(&audited_before, &audited_after), audited, "would_drop for {family}/{reason}");
}

#[test]
fn audit_mode_passes_everything_and_counts_would_be_drops_by_reason() {
    let mut h = ports_scope();
    h.filter.set_audit(true).expect("audit on");
    expect_audited(&h, &v4(ALLOWED_V4, TCP).bytes, "ipv4", "allowed", false);
    expect_audited(&h, &v4(DENIED_V4, TCP).bytes, "ipv4", "denied", true);
    expect_audited(&h, &v4(UNLISTED_V4, TCP).bytes, "ipv4", "unlisted", true);
    expect_audited(&h, &v6(UNLISTED_V6, &[], TCP).bytes, "ipv6", "unlisted", true);
    expect_audited(&h, &v6(DENIED_V6, &[], TCP).bytes, "ipv6", "denied", true);
    let mut broken = v4(ALLOWED_V4, TCP);
    broken.bytes[14] = 0x43; // IHL 3: shorter than the minimal header
    expect_audited(&h, &broken.bytes, "ipv4", "malformed", true);
    let unprotected = Transport::Tcp { dst_port: PORT + 1 };
    expect_audited(&h, &v4(UNLISTED_V4, unprotected).bytes, "ipv4", "out_of_scope", false);
    // And back: the same frames are dropped again.
    h.filter.set_audit(false).expect("audit off");
    expect(&h, &v4(UNLISTED_V4, TCP).bytes, XDP_DROP, "ipv4", "unlisted");
    expect(&h, &v4(DENIED_V4, TCP).bytes, XDP_DROP, "ipv4", "denied");
}

fn ports_scope() -> XdpHarness {
    XdpHarness::new(LIST, Scope::Ports, &[PORT])
}

#[test]
fn allowed_denied_and_unlisted_sources_ipv4() {
    let h = ports_scope();
    expect(&h, &v4(ALLOWED_V4, TCP).bytes, XDP_PASS, "ipv4", "allowed");
    expect(&h, &v4(DENIED_V4, TCP).bytes, XDP_DROP, "ipv4", "denied");
    expect(&h, &v4(UNLISTED_V4, TCP).bytes, XDP_DROP, "ipv4", "unlisted");
    expect(
        &h,
        &v4(ALLOWED_V4, Transport::Udp { dst_port: PORT }).bytes,
        XDP_PASS,
        "ipv4",
        "allowed",
    );
    expect(
        &h,
        &v4(UNLISTED_V4, Transport::Udp { dst_port: PORT }).bytes,
        XDP_DROP,
        "ipv4",
        "unlisted",
    );
}

#[test]
fn allowed_denied_and_unlisted_sources_ipv6() {
    let h = ports_scope();
    expect(&h, &v6(ALLOWED_V6, &[], TCP).bytes, XDP_PASS, "ipv6", "allowed");
    expect(&h, &v6(DENIED_V6, &[], TCP).bytes, XDP_DROP, "ipv6", "denied");
    expect(&h, &v6(UNLISTED_V6, &[], TCP).bytes, XDP_DROP, "ipv6", "unlisted");
}

#[test]
fn longest_prefix_wins_both_ways() {
    let h = ports_scope();
    // allow /24 with a deny /32 inside it
    expect(&h, &v4(Ipv4Addr::new(203, 0, 113, 65), TCP).bytes, XDP_PASS, "ipv4", "allowed");
    expect(&h, &v4(DENIED_V4, TCP).bytes, XDP_DROP, "ipv4", "denied");
    // deny /24 with an allow /32 inside it
    expect(&h, &v4(Ipv4Addr::new(198, 51, 100, 7), TCP).bytes, XDP_PASS, "ipv4", "allowed");
    expect(&h, &v4(Ipv4Addr::new(198, 51, 100, 8), TCP).bytes, XDP_DROP, "ipv4", "denied");
}

#[test]
fn rule_hits_are_counted_per_rule() {
    let h = ports_scope();
    for _ in 0..3 {
        h.run(&v4(DENIED_V4, TCP).bytes);
    }
    h.run(&v4(ALLOWED_V4, TCP).bytes);
    let hits = h.filter.rule_hits(10).expect("rule hits");
    assert_eq!(hits[0].cidr.to_string(), "203.0.113.66/32");
    assert_eq!(hits[0].hits, 3);
    assert_eq!(hits[1].cidr.to_string(), "203.0.113.0/24");
    assert_eq!(hits[1].hits, 1);
    assert_eq!(hits.len(), 2, "rules that matched nothing are not listed");
}

#[test]
fn vlan_and_qinq_tags_are_looked_through() {
    let h = ports_scope();
    for tags in [&[TPID_VLAN][..], &[TPID_QINQ, TPID_VLAN], &[TPID_VLAN, TPID_VLAN]] {
        let inner = ipv4(ALLOWED_V4, TCP, &[], Fragment::default());
        expect(&h, &ethernet(tags, ETHERTYPE_IPV4, inner).bytes, XDP_PASS, "ipv4", "allowed");
        let inner = ipv4(UNLISTED_V4, TCP, &[], Fragment::default());
        expect(&h, &ethernet(tags, ETHERTYPE_IPV4, inner).bytes, XDP_DROP, "ipv4", "unlisted");
        let inner = ipv6(DENIED_V6, &[], TCP);
        expect(&h, &ethernet(tags, ETHERTYPE_IPV6, inner).bytes, XDP_DROP, "ipv6", "denied");
    }
}

/// Behind more tags than the parser walks there may be IP the list never
/// judged: such frames are dropped as malformed in both scopes, whatever they
/// carry (an allowed source included: the program cannot know it).
#[test]
fn more_vlan_tags_than_walked_are_dropped_as_malformed() {
    let host = XdpHarness::new(LIST, Scope::Host, &[PORT]);
    for h in [&ports_scope(), &host] {
        for tags in [
            &[TPID_QINQ, TPID_VLAN, TPID_VLAN][..],
            &[TPID_VLAN, TPID_VLAN, TPID_VLAN],
            &[TPID_QINQ, TPID_QINQ, TPID_VLAN, TPID_VLAN],
            &[TPID_VLAN, TPID_VLAN, TPID_VLAN, TPID_VLAN],
        ] {
            for source in [ALLOWED_V4, UNLISTED_V4] {
                let inner = ipv4(source, TCP, &[], Fragment::default());
                let frame = ethernet(tags, ETHERTYPE_IPV4, inner);
                expect(h, &frame.bytes, XDP_DROP, "other", "malformed");
            }
            for source in [ALLOWED_V6, UNLISTED_V6] {
                let frame = ethernet(tags, ETHERTYPE_IPV6, ipv6(source, &[], TCP));
                expect(h, &frame.bytes, XDP_DROP, "other", "malformed");
            }
        }
    }
}

#[test]
fn ipv4_options_are_skipped() {
    let h = ports_scope();
    for words in 1..=10 {
        let options = vec![1u8; words * 4]; // NOP options
        let frame =
            ethernet(&[], ETHERTYPE_IPV4, ipv4(ALLOWED_V4, TCP, &options, Fragment::default()));
        expect(&h, &frame.bytes, XDP_PASS, "ipv4", "allowed");
        let frame =
            ethernet(&[], ETHERTYPE_IPV4, ipv4(UNLISTED_V4, TCP, &options, Fragment::default()));
        expect(&h, &frame.bytes, XDP_DROP, "ipv4", "unlisted");
    }
}

#[test]
fn ipv4_header_length_below_minimum_is_malformed() {
    let h = ports_scope();
    let mut frame = v4(ALLOWED_V4, TCP).bytes;
    for ihl in 0..5u8 {
        frame[14] = 0x40 | ihl;
        expect(&h, &frame, XDP_DROP, "ipv4", "malformed");
    }
    frame[14] = 0x65; // version 6 in an IPv4 ethertype
    expect(&h, &frame, XDP_DROP, "ipv4", "malformed");
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let h = ports_scope();
    let chains: [&[Extension]; 6] = [
        &[Extension::HopByHop],
        &[Extension::Routing],
        &[Extension::DestinationOptions],
        &[Extension::Authentication],
        &[Extension::Fragment { offset: 0, more: true }],
        &[
            Extension::HopByHop,
            Extension::DestinationOptions,
            Extension::Routing,
            Extension::Fragment { offset: 0, more: true },
            Extension::Authentication,
            Extension::DestinationOptions,
        ],
    ];
    for chain in chains {
        expect(&h, &v6(ALLOWED_V6, chain, TCP).bytes, XDP_PASS, "ipv6", "allowed");
        expect(&h, &v6(UNLISTED_V6, chain, TCP).bytes, XDP_DROP, "ipv6", "unlisted");
        // The port behind the chain is read: an unprotected one is out of scope.
        let other_port = Transport::Tcp { dst_port: 80 };
        expect(&h, &v6(UNLISTED_V6, chain, other_port).bytes, XDP_PASS, "ipv6", "out_of_scope");
    }
}

#[test]
fn ipv6_extension_chain_beyond_the_walk_limit_is_malformed() {
    let h = ports_scope();
    let chain = [Extension::DestinationOptions; proxy_common::MAX_IPV6_EXT_HEADERS + 1];
    expect(&h, &v6(ALLOWED_V6, &chain, TCP).bytes, XDP_DROP, "ipv6", "malformed");
    let chain = [Extension::DestinationOptions; proxy_common::MAX_IPV6_EXT_HEADERS];
    expect(&h, &v6(ALLOWED_V6, &chain, TCP).bytes, XDP_PASS, "ipv6", "allowed");
}

#[test]
fn fragments_never_bypass_the_list_in_ports_scope() {
    let h = ports_scope();
    let first = Fragment { offset: 0, more: true };
    let later = Fragment { offset: 185, more: true };
    let frame = |src, fragment| ethernet(&[], ETHERTYPE_IPV4, ipv4(src, TCP, &[], fragment));
    // The first fragment carries the port.
    expect(&h, &frame(ALLOWED_V4, first).bytes, XDP_PASS, "ipv4", "allowed");
    expect(&h, &frame(UNLISTED_V4, first).bytes, XDP_DROP, "ipv4", "unlisted");
    // Later fragments carry none: judged by source alone, even though the
    // port field's bytes (here the TCP header's) say something else.
    let unprotected = |src| {
        let transport = Transport::Tcp { dst_port: 80 };
        ethernet(&[], ETHERTYPE_IPV4, ipv4(src, transport, &[], later))
    };
    expect(&h, &unprotected(ALLOWED_V4).bytes, XDP_PASS, "ipv4", "allowed");
    expect(&h, &unprotected(UNLISTED_V4).bytes, XDP_DROP, "ipv4", "unlisted");
    expect(&h, &unprotected(DENIED_V4).bytes, XDP_DROP, "ipv4", "denied");

    let later6 = [Extension::Fragment { offset: 185, more: false }];
    let other_port = Transport::Tcp { dst_port: 80 };
    expect(&h, &v6(ALLOWED_V6, &later6, other_port).bytes, XDP_PASS, "ipv6", "allowed");
    expect(&h, &v6(UNLISTED_V6, &later6, other_port).bytes, XDP_DROP, "ipv6", "unlisted");
    let first6 = [Extension::Fragment { offset: 0, more: true }];
    expect(&h, &v6(UNLISTED_V6, &first6, other_port).bytes, XDP_PASS, "ipv6", "out_of_scope");
}

#[test]
fn fragments_in_host_scope_are_judged_by_source() {
    let h = XdpHarness::new(LIST, Scope::Host, &[PORT]);
    let later = Fragment { offset: 8, more: false };
    let frame = |src| ethernet(&[], ETHERTYPE_IPV4, ipv4(src, Transport::Icmp, &[], later));
    expect(&h, &frame(ALLOWED_V4).bytes, XDP_PASS, "ipv4", "allowed");
    expect(&h, &frame(UNLISTED_V4).bytes, XDP_DROP, "ipv4", "unlisted");
}

#[test]
fn non_ip_passes() {
    let h = ports_scope();
    expect(&h, &arp().bytes, XDP_PASS, "other", "not_ip");
    let h = XdpHarness::new(LIST, Scope::Host, &[PORT]);
    expect(&h, &arp().bytes, XDP_PASS, "other", "not_ip");
}

#[test]
fn ports_scope_only_protects_listed_ports() {
    let h = XdpHarness::new(LIST, Scope::Ports, &[PORT, 8443]);
    for port in [22, 80, 444, 8442, 65535] {
        let tcp = Transport::Tcp { dst_port: port };
        expect(&h, &v4(UNLISTED_V4, tcp).bytes, XDP_PASS, "ipv4", "out_of_scope");
        expect(&h, &v6(UNLISTED_V6, &[], tcp).bytes, XDP_PASS, "ipv6", "out_of_scope");
    }
    let tcp = Transport::Tcp { dst_port: 8443 };
    expect(&h, &v4(UNLISTED_V4, tcp).bytes, XDP_DROP, "ipv4", "unlisted");
    // Protocols without ports are out of scope.
    expect(&h, &v4(UNLISTED_V4, Transport::Icmp).bytes, XDP_PASS, "ipv4", "out_of_scope");
    let echo = Transport::Icmpv6 { kind: 128 };
    expect(&h, &v6(UNLISTED_V6, &[], echo).bytes, XDP_PASS, "ipv6", "out_of_scope");
}

#[test]
fn host_scope_filters_everything_but_neighbour_discovery_and_replies() {
    let h = XdpHarness::new(LIST, Scope::Host, &[PORT]);
    let (first, last) = ephemeral_range();
    for port in [22, 80, PORT] {
        let tcp = Transport::Tcp { dst_port: port };
        expect(&h, &v4(UNLISTED_V4, tcp).bytes, XDP_DROP, "ipv4", "unlisted");
        expect(&h, &v4(ALLOWED_V4, tcp).bytes, XDP_PASS, "ipv4", "allowed");
    }
    expect(&h, &v4(UNLISTED_V4, Transport::Icmp).bytes, XDP_DROP, "ipv4", "unlisted");
    for port in [first, last] {
        let reply = Transport::Udp { dst_port: port };
        expect(&h, &v4(UNLISTED_V4, reply).bytes, XDP_PASS, "ipv4", "ephemeral_port");
        expect(&h, &v6(UNLISTED_V6, &[], reply).bytes, XDP_PASS, "ipv6", "ephemeral_port");
    }
    let below = Transport::Tcp { dst_port: first - 1 };
    expect(&h, &v4(UNLISTED_V4, below).bytes, XDP_DROP, "ipv4", "unlisted");
    for kind in 133..=137 {
        let nd = Transport::Icmpv6 { kind };
        expect(&h, &v6(UNLISTED_V6, &[], nd).bytes, XDP_PASS, "ipv6", "neighbor_discovery");
    }
    let echo = Transport::Icmpv6 { kind: 128 };
    expect(&h, &v6(UNLISTED_V6, &[], echo).bytes, XDP_DROP, "ipv6", "unlisted");
    expect(&h, &v6(DENIED_V6, &[], echo).bytes, XDP_DROP, "ipv6", "denied");
}

#[test]
fn protected_port_inside_the_ephemeral_range_stays_protected_in_host_scope() {
    let (first, _) = ephemeral_range();
    let h = XdpHarness::new(LIST, Scope::Host, &[first]);
    let tcp = Transport::Tcp { dst_port: first };
    expect(&h, &v4(UNLISTED_V4, tcp).bytes, XDP_DROP, "ipv4", "unlisted");
}

fn ephemeral_range() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("range");
    let mut ports = text.split_whitespace().map(|p| p.parse().expect("port"));
    (ports.next().expect("first"), ports.next().expect("last"))
}

/// Every cut of a frame shorter than what the filter must read is dropped
/// as malformed (in scope) and counted once; longer cuts decide as the whole frame.
#[test]
fn every_truncation_of_every_header_is_malformed() {
    let ports = ports_scope();
    let host = XdpHarness::new(LIST, Scope::Host, &[PORT]);
    let plain = Fragment::default();
    // (name, harness, family, link-layer length, frame)
    let cases: Vec<(&str, &XdpHarness, &str, usize, Frame)> = vec![
        ("ipv4/tcp", &ports, "ipv4", 14, v4(ALLOWED_V4, TCP)),
        ("ipv4/udp", &ports, "ipv4", 14, v4(ALLOWED_V4, Transport::Udp { dst_port: PORT })),
        (
            "ipv4+options/tcp",
            &ports,
            "ipv4",
            14,
            ethernet(&[], ETHERTYPE_IPV4, ipv4(ALLOWED_V4, TCP, &[1; 12], plain)),
        ),
        (
            "qinq/ipv4/tcp",
            &ports,
            "ipv4",
            22,
            ethernet(&[TPID_QINQ, TPID_VLAN], ETHERTYPE_IPV4, ipv4(ALLOWED_V4, TCP, &[], plain)),
        ),
        ("ipv6/tcp", &ports, "ipv6", 14, v6(ALLOWED_V6, &[], TCP)),
        (
            "ipv6+hbh+routing+fragment+ah+dstopts/udp",
            &ports,
            "ipv6",
            14,
            v6(
                ALLOWED_V6,
                &[
                    Extension::HopByHop,
                    Extension::Routing,
                    Extension::Fragment { offset: 0, more: true },
                    Extension::Authentication,
                    Extension::DestinationOptions,
                ],
                Transport::Udp { dst_port: PORT },
            ),
        ),
        (
            "ipv6 later fragment",
            &ports,
            "ipv6",
            14,
            v6(ALLOWED_V6, &[Extension::Fragment { offset: 3, more: false }], TCP),
        ),
        (
            "vlan/ipv6/icmpv6 (host scope)",
            &host,
            "ipv6",
            18,
            ethernet(
                &[TPID_VLAN],
                ETHERTYPE_IPV6,
                ipv6(ALLOWED_V6, &[], Transport::Icmpv6 { kind: 128 }),
            ),
        ),
    ];
    for (name, harness, family, link_len, frame) in cases {
        assert_eq!(harness.run(&frame.bytes), XDP_PASS, "{name}: the whole frame passes");
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        for cut in 14..frame.bytes.len() {
            let bytes = &frame.bytes[..cut];
            if cut < frame.needed {
                // Cuts inside the VLAN tags cannot tell the family.
                let family = if cut < link_len { "other" } else { family };
                expect(harness, bytes, XDP_DROP, family, "malformed");
            } else {
                assert_eq!(harness.run(bytes), XDP_PASS, "{name} cut at {cut}");
            }
        }
    }
}

/// Layer-3 devices (TUN, WireGuard, ipip, GRE, PPP) hand the program the IP
/// header first: the same packets get the same verdicts as over Ethernet.
#[test]
fn layer_three_frames_are_read_from_the_ip_header() {
    let h = ports_scope();
    let plain = Fragment::default();
    let ip = Framing::Ip;
    for (source, verdict, reason) in [
        (ALLOWED_V4, XDP_PASS, "allowed"),
        (DENIED_V4, XDP_DROP, "denied"),
        (UNLISTED_V4, XDP_DROP, "unlisted"),
    ] {
        let packet = ipv4(source, TCP, &[], plain);
        expect_framed(&h, ip, &packet.bytes, verdict, "ipv4", reason);
        let options = ipv4(source, Transport::Udp { dst_port: PORT }, &[1; 8], plain);
        expect_framed(&h, ip, &options.bytes, verdict, "ipv4", reason);
    }
    for (source, verdict, reason) in [
        (ALLOWED_V6, XDP_PASS, "allowed"),
        (DENIED_V6, XDP_DROP, "denied"),
        (UNLISTED_V6, XDP_DROP, "unlisted"),
    ] {
        let packet = ipv6(source, &[Extension::HopByHop], TCP);
        expect_framed(&h, ip, &packet.bytes, verdict, "ipv6", reason);
    }
    let other_port = Transport::Tcp { dst_port: 22 };
    let packet = ipv4(UNLISTED_V4, other_port, &[], plain);
    expect_framed(&h, ip, &packet.bytes, XDP_PASS, "ipv4", "out_of_scope");
    let later = ipv4(UNLISTED_V4, TCP, &[], Fragment { offset: 8, more: false });
    expect_framed(&h, ip, &later.bytes, XDP_DROP, "ipv4", "unlisted");
    let host = XdpHarness::new(LIST, Scope::Host, &[PORT]);
    let echo = ipv4(UNLISTED_V4, Transport::Icmp, &[], plain);
    expect_framed(&host, ip, &echo.bytes, XDP_DROP, "ipv4", "unlisted");
    let solicitation = ipv6(UNLISTED_V6, &[], Transport::Icmpv6 { kind: 135 });
    expect_framed(&host, ip, &solicitation.bytes, XDP_PASS, "ipv6", "neighbor_discovery");
}

/// A layer-3 device carries only IP: a frame whose first nibble is not 4
/// or 6 is dropped as malformed, never passed as "not IP" (which is how the
/// Ethernet program would misread an unlisted source's SYN).
#[test]
fn layer_three_frames_that_are_not_ip_are_malformed() {
    let h = ports_scope();
    let syn = ipv4(UNLISTED_V4, TCP, &[], Fragment::default()).bytes;
    for version in [0u8, 1, 5, 7, 0xf] {
        let mut frame = syn.clone();
        frame[0] = version << 4 | 5;
        expect_framed(&h, Framing::Ip, &frame, XDP_DROP, "other", "malformed");
    }
    // A version-4 nibble in front of an IPv6 header, and the reverse.
    let mut v6_as_v4 = ipv6(UNLISTED_V6, &[], TCP).bytes;
    v6_as_v4[0] = 0x45;
    expect_framed(&h, Framing::Ip, &v6_as_v4, XDP_DROP, "ipv4", "unlisted");
    let mut v4_as_v6 = syn.clone();
    v4_as_v6[0] = 0x65;
    expect_framed(&h, Framing::Ip, &v4_as_v6, XDP_DROP, "ipv6", "malformed");
    expect_framed(&h, Framing::Ip, &arp().bytes[14..], XDP_DROP, "other", "malformed");
}

#[test]
fn every_truncation_of_a_layer_three_frame_is_malformed() {
    let h = ports_scope();
    let cases = [
        ("ipv4/tcp", "ipv4", ipv4(ALLOWED_V4, TCP, &[], Fragment::default())),
        (
            "ipv4+options/udp",
            "ipv4",
            ipv4(ALLOWED_V4, Transport::Udp { dst_port: PORT }, &[1; 16], Fragment::default()),
        ),
        ("ipv6/tcp", "ipv6", ipv6(ALLOWED_V6, &[], TCP)),
        (
            "ipv6+hbh+fragment/udp",
            "ipv6",
            ipv6(
                ALLOWED_V6,
                &[Extension::HopByHop, Extension::Fragment { offset: 0, more: true }],
                Transport::Udp { dst_port: PORT },
            ),
        ),
    ];
    for (name, family, frame) in cases {
        assert_eq!(h.run_framed(Framing::Ip, &frame.bytes), XDP_PASS, "{name}: whole");
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        for cut in 14..frame.bytes.len() {
            let bytes = &frame.bytes[..cut];
            if cut < frame.needed {
                expect_framed(&h, Framing::Ip, bytes, XDP_DROP, family, "malformed");
            } else {
                assert_eq!(h.run_framed(Framing::Ip, bytes), XDP_PASS, "{name} cut at {cut}");
            }
        }
    }
}

/// Everything on the per-packet path is inlined into each entry point: a
/// function the two share becomes a BPF subprogram, and the program pays a
/// call, spills and a run-time framing on every packet (`bench xdp` once
/// caught that costing half as much again). Only the cold diagnostics and
/// the compiler's memory builtins may stay out of line.
#[test]
fn the_per_packet_path_is_one_function_per_entry_point() {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
    let file = object::File::parse(edgegate::filter::PROGRAM_OBJECT).expect("an ELF object");
    let mut outlined: Vec<String> = file
        .symbols()
        .filter(|symbol| symbol.kind() == SymbolKind::Text)
        .filter(|symbol| {
            let section = symbol.section_index().and_then(|i| file.section_by_index(i).ok());
            section.and_then(|s| s.name().ok().map(str::to_owned)).as_deref() == Some(".text")
        })
        .filter_map(|symbol| symbol.name().ok().map(str::to_owned))
        .filter(|name| !["memcpy", "memmove", "memset", "memcmp", "bcmp"].contains(&name.as_str()))
        .collect();
    outlined.sort();
    assert!(
        outlined.len() == 1 && outlined[0].ends_with("log_malformed"),
        "functions out of line: {outlined:?}"
    );
    let entry_points: Vec<&str> = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text)
        .filter_map(|s| s.name().ok())
        .collect();
    for framing in Framing::ALL {
        assert!(entry_points.contains(&framing.program_name()), "{entry_points:?}");
    }
}

/// Ports scope judges tunnels by their outer source: the host decapsulates
/// them, and the inner packet may be bound for a protected port.
#[test]
fn tunnels_are_judged_by_their_outer_source_in_ports_scope() {
    let h = ports_scope();
    let plain = Fragment::default();
    let tunnels = [
        Transport::Tunnel { protocol: 4 },
        Transport::Tunnel { protocol: 41 },
        Transport::Tunnel { protocol: 47 },
        Transport::Udp { dst_port: 4789 },
        Transport::Udp { dst_port: 6081 },
    ];
    for tunnel in tunnels {
        expect(&h, &v4(ALLOWED_V4, tunnel).bytes, XDP_PASS, "ipv4", "allowed");
        expect(&h, &v4(DENIED_V4, tunnel).bytes, XDP_DROP, "ipv4", "denied");
        expect(&h, &v4(UNLISTED_V4, tunnel).bytes, XDP_DROP, "ipv4", "unlisted");
        expect(&h, &v6(ALLOWED_V6, &[], tunnel).bytes, XDP_PASS, "ipv6", "allowed");
        let behind_extension = v6(UNLISTED_V6, &[Extension::DestinationOptions], tunnel);
        expect(&h, &behind_extension.bytes, XDP_DROP, "ipv6", "unlisted");
        let over_layer3 = ipv4(UNLISTED_V4, tunnel, &[], plain);
        expect_framed(&h, Framing::Ip, &over_layer3.bytes, XDP_DROP, "ipv4", "unlisted");
    }
    // Only UDP carries the tunnel ports; other IP protocols are not tunnels.
    for other in [
        Transport::Tcp { dst_port: 4789 },
        Transport::Udp { dst_port: 4790 },
        Transport::Tunnel { protocol: 50 },
        Transport::Tunnel { protocol: 94 },
    ] {
        expect(&h, &v4(UNLISTED_V4, other).bytes, XDP_PASS, "ipv4", "out_of_scope");
    }
}

/// A fragmented tunnel packet: the first fragment carries the protocol (or
/// the port), later ones are judged by their source anyway.
#[test]
fn fragmented_tunnels_are_judged_too() {
    let h = ports_scope();
    let first = Extension::Fragment { offset: 0, more: true };
    let gre = Transport::Tunnel { protocol: 47 };
    expect(&h, &v6(UNLISTED_V6, &[first], gre).bytes, XDP_DROP, "ipv6", "unlisted");
    let later = Fragment { offset: 64, more: false };
    let vxlan = Transport::Udp { dst_port: 4789 };
    let tail = ethernet(&[], ETHERTYPE_IPV4, ipv4(UNLISTED_V4, vxlan, &[], later));
    expect(&h, &tail.bytes, XDP_DROP, "ipv4", "unlisted");
}

/// Host scope passes replies to the host's own connections by their
/// ephemeral destination port; a tunnel port in that range stays a tunnel.
#[test]
fn a_tunnel_port_inside_the_ephemeral_range_is_judged_in_host_scope() {
    let (first, _) = ephemeral_range();
    let tunnel_port = first + 5;
    let tunnels = Tunnels { protocols: Default::default(), udp_ports: [tunnel_port].into() };
    let h = XdpHarness::with_tunnels(LIST, Scope::Host, &[PORT], tunnels);
    let tunnel = Transport::Udp { dst_port: tunnel_port };
    expect(&h, &v4(UNLISTED_V4, tunnel).bytes, XDP_DROP, "ipv4", "unlisted");
    let reply = Transport::Udp { dst_port: first + 6 };
    expect(&h, &v4(UNLISTED_V4, reply).bytes, XDP_PASS, "ipv4", "ephemeral_port");
}

#[test]
fn tunnels_left_out_of_the_config_stay_out_of_scope() {
    let none = XdpHarness::with_tunnels(LIST, Scope::Ports, &[PORT], Tunnels::default());
    for tunnel in [Transport::Tunnel { protocol: 4 }, Transport::Udp { dst_port: 4789 }] {
        expect(&none, &v4(UNLISTED_V4, tunnel).bytes, XDP_PASS, "ipv4", "out_of_scope");
    }
    let gre_and_vxlan =
        Tunnels { protocols: [TunnelProtocol::Gre].into(), udp_ports: [4789].into() };
    let some = XdpHarness::with_tunnels(LIST, Scope::Ports, &[PORT], gre_and_vxlan);
    for (tunnel, verdict, reason) in [
        (Transport::Tunnel { protocol: 47 }, XDP_DROP, "unlisted"),
        (Transport::Udp { dst_port: 4789 }, XDP_DROP, "unlisted"),
        (Transport::Tunnel { protocol: 4 }, XDP_PASS, "out_of_scope"),
        (Transport::Tunnel { protocol: 41 }, XDP_PASS, "out_of_scope"),
        (Transport::Udp { dst_port: 6081 }, XDP_PASS, "out_of_scope"),
    ] {
        expect(&some, &v4(UNLISTED_V4, tunnel).bytes, verdict, "ipv4", reason);
    }
}

/// ICMPv6 is out of scope in ports scope: even a truncated one is not ours to judge.
#[test]
fn truncated_icmpv6_is_out_of_scope_in_ports_scope() {
    let h = ports_scope();
    let frame = v6(UNLISTED_V6, &[], Transport::Icmpv6 { kind: 135 });
    expect(&h, &frame.bytes[..frame.bytes.len() - 6], XDP_PASS, "ipv6", "out_of_scope");
}

/// Both lookup strategies (per prefix length, and the trie used once many
/// lengths are in play) agree with the list's own longest-prefix model.
#[test]
fn lookups_agree_with_the_model_for_random_lists() {
    let mut rng = Lcg::new(0x5eed);
    for distinct_lengths in [1, 3, 6, 7, 20] {
        let lengths: Vec<u8> =
            (0..distinct_lengths).map(|i| 8 + (i * 24 / distinct_lengths) as u8).collect();
        let mut text = String::new();
        for i in 0..300 {
            let len = lengths[i % lengths.len()];
            let addr = Ipv4Addr::from(0xcb00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff));
            let net = ipnet::Ipv4Net::new(addr, len).expect("len").trunc();
            let action = if rng.next_u64().is_multiple_of(4) { "deny " } else { "" };
            text.push_str(&format!("{action}{net}\n"));
        }
        let Ok(list) = Allowlist::parse(&text) else {
            continue; // a random clash of allow and deny on one CIDR; other seeds cover it
        };
        let h = XdpHarness::new(&list.render(), Scope::Ports, &[PORT]);
        let mut checked = 0;
        for _ in 0..2000 {
            let src = Ipv4Addr::from(0xcb00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff));
            let expected = match list.verdict(IpAddr::V4(src)) {
                Some(edgegate::allowlist::Action::Allow) => XDP_PASS,
                _ => XDP_DROP,
            };
            assert_eq!(
                h.run(&v4(src, TCP).bytes),
                expected,
                "{src} with {distinct_lengths} lengths"
            );
            checked += 1;
        }
        assert_eq!(checked, 2000);
    }
}

/// While a replacement is applied, a second copy of the program (sharing
/// the maps, as a restarted daemon's would) never drops a source that both
/// the old and the new list allow.
///
/// The lists are built so that a wrong update order opens a window: each
/// source is allowed by a long prefix inside a denied one on one side, and by
/// a short prefix on the other; thousands of /20 entries in between make the
/// window long enough for the prober to see it.
#[test]
fn replace_never_drops_a_source_allowed_before_and_after() {
    // 192.0.2.7: the prefilter's bit for its /24 is needed by a different
    // rule on each side.
    let mut old =
        String::from("10.0.0.0/8\ndeny 10.2.0.0/16\n10.2.3.0/24\n2001:db8:1::/48\n192.0.2.7/32\n");
    let mut new =
        String::from("10.0.0.0/8\ndeny 10.3.0.0/16\n10.3.3.0/24\n2001:db8:1::/64\n192.0.0.0/22\n");
    for i in 0..2000u32 {
        old.push_str(&format!("{}/20\n", Ipv4Addr::from(0xac00_0000 + (i << 12))));
        new.push_str(&format!("{}/20\n", Ipv4Addr::from(0xad00_0000 + (i << 12))));
    }
    let h = XdpHarness::new(&old, Scope::Ports, &[PORT]);
    let old_list = Allowlist::parse(&old).expect("old");
    let new_list = Allowlist::parse(&new).expect("new");
    let sources = [
        v4(Ipv4Addr::new(10, 2, 3, 4), TCP),
        v4(Ipv4Addr::new(10, 3, 3, 3), TCP),
        v6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5), &[], TCP),
        v4(Ipv4Addr::new(192, 0, 2, 7), TCP),
    ];
    for source in &sources {
        assert_eq!(h.run(&source.bytes), XDP_PASS);
    }
    let observer = h.reopen(&old_list);
    let mut filter = h.reopen(&old_list);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let probes = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let mut probes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for source in &sources {
                    assert_eq!(run(&observer, &source.bytes), XDP_PASS, "dropped during replace");
                    probes += 1;
                }
            }
            probes
        });
        for _ in 0..3 {
            filter.apply(&new_list).expect("replace");
            filter.apply(&old_list).expect("replace back");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        prober.join().expect("prober")
    });
    assert!(probes > 100, "the prober ran concurrently ({probes} probes)");
}

/// Maps pinned by an edgegate without the prefilter: a restart creates
/// the prefilter maps empty and fills them from the installed rules before
/// its program can run, so a listed source is never dropped by them.
#[test]
fn a_restart_over_maps_pinned_without_prefilters_fills_them_first() {
    restart_with_prefilter_pins(|pin| std::fs::remove_file(pin).expect("remove the pin"));
}

/// Prefilters pinned by an edgegate whose prefilter had two levels (16 and
/// 24 bits, 263,168 words): a restart replaces them with today's shape and
/// fills those, rather than failing to load against them.
#[test]
fn a_restart_over_prefilters_of_an_older_shape_replaces_and_fills_them() {
    restart_with_prefilter_pins(|pin| {
        std::fs::remove_file(pin).expect("remove the pin");
        let mmapable = 1 << 10;
        let older = aya::maps::Array::<aya::maps::MapData, u64>::create(263_168, mmapable)
            .expect("create a prefilter of the older shape");
        older.pin(pin).expect("pin it");
    });
}

/// Lets `replace` do what an older edgegate left at each prefilter's pin,
/// restarts over that, and checks listed sources pass and others drop.
fn restart_with_prefilter_pins(replace: impl Fn(&std::path::Path)) {
    let list = "192.0.2.0/24\n2001:db8::/32\n";
    let h = XdpHarness::new(list, Scope::Ports, &[PORT]);
    for name in [proxy_common::map::V4_PREFILTER, proxy_common::map::V6_PREFILTER] {
        replace(&h.bpffs_dir().join("maps").join(name));
    }
    // The same list: the rule maps need no change, so only the fill at load
    // can make the new prefilters right.
    let restarted = h.reopen(&Allowlist::parse(list).expect("list"));
    let listed = [
        v4(Ipv4Addr::new(192, 0, 2, 9), TCP),
        v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9), &[], TCP),
    ];
    for frame in &listed {
        assert_eq!(run(&restarted, &frame.bytes), XDP_PASS);
    }
    assert_eq!(run(&restarted, &v4(Ipv4Addr::new(198, 51, 100, 9), TCP).bytes), XDP_DROP);
}
