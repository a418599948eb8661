//! One synthetic packet through the loaded program (BPF_PROG_TEST_RUN): the
//! kernel's own answer that `allow explain` sets beside the list's.

use std::net::{IpAddr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use proxy_common::{Framing, Verdict};

use super::{Filter, FilterError};

/// `XDP_PASS`, the program's return value for a passed packet.
const XDP_PASS: u32 = 2;

impl Filter {
    /// What the loaded program does with a TCP SYN from `source` to `port`:
    /// pass or drop (in audit mode, pass). To the program the probe is a
    /// packet like any other: it is counted and hits its rule. A drop it
    /// adds to the sample is taken out again, so the sample shows traffic only.
    pub fn probe(&mut self, source: IpAddr, port: u16) -> Result<Verdict, FilterError> {
        let sampled_before = self.dropped_source(source).is_some();
        let frame = tcp_syn(source, port);
        let mut options = TestRunOptions::new();
        options.data_in = Some(&frame);
        let action = self
            .program(Framing::Ethernet)
            .test_run(options)
            .map_err(FilterError::Probe)?
            .return_value;
        if !sampled_before {
            self.forget_dropped_source(source)?;
        }
        Ok(if action == XDP_PASS { Verdict::Pass } else { Verdict::Drop })
    }
}

/// An Ethernet frame holding a TCP SYN from `source` to `port` (the
/// destination address is never looked at).
fn tcp_syn(source: IpAddr, port: u16) -> Vec<u8> {
    const TCP_HEADER: usize = 20;
    let mut frame = vec![0u8; 12];
    let ip = match source {
        IpAddr::V4(source) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + TCP_HEADER) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&source.octets());
            ip[16..20].copy_from_slice(&[192, 0, 2, 1]);
            ip
        }
        IpAddr::V6(source) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(TCP_HEADER as u16).to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&source.octets());
            ip[24..40].copy_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
            ip
        }
    };
    frame.extend_from_slice(&ip);
    let mut tcp = [0u8; TCP_HEADER];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    frame.extend_from_slice(&tcp);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_well_formed_syns_for_both_families() {
        let v4 = tcp_syn("198.51.100.7".parse().unwrap(), 8443);
        assert_eq!(v4.len(), 14 + 20 + 20);
        assert_eq!(v4[12..14], [0x08, 0x00]);
        assert_eq!(v4[14 + 12..14 + 16], [198, 51, 100, 7]);
        assert_eq!(v4[14 + 20 + 2..14 + 20 + 4], 8443u16.to_be_bytes());
        let v6 = tcp_syn("2001:db8::7".parse().unwrap(), 443);
        assert_eq!(v6.len(), 14 + 40 + 20);
        assert_eq!(v6[12..14], [0x86, 0xdd]);
        assert_eq!(v6[14 + 6], 6, "next header: TCP");
        assert_eq!(v6[14 + 40 + 2..14 + 40 + 4], 443u16.to_be_bytes());
        assert_eq!(v6[14 + 40 + 13], 0x02, "SYN");
    }
}
