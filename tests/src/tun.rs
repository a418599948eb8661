//! A TUN device in a test namespace: a layer-3 interface (`link/none`, no
//! Ethernet header, as WireGuard's) whose "wire" is a file descriptor the
//! test writes IP packets into and reads the host's replies from.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::{
    netns::Netns,
    packet::{SYN_SOURCE_PORT as CLIENT_PORT, tcp_syn},
};

pub struct Tun {
    pub name: String,
    file: File,
}

impl Tun {
    /// Creates TUN device `name` in `netns` (without the packet-information
    /// prefix: the descriptor carries bare IP packets), up, with `addresses`
    /// (CIDR notation) on it. The device goes when this value is dropped.
    pub fn create(netns: &Netns, name: &str, addresses: &[&str]) -> Self {
        Self::create_with_link_type(netns, name, None, addresses)
    }

    /// As [`Self::create`], the device reporting link type `link_type`
    /// (`ARPHRD_*`) instead of `none` where given: how a test meets a link
    /// type it has no driver for.
    pub fn create_with_link_type(
        netns: &Netns,
        name: &str,
        link_type: Option<u16>,
        addresses: &[&str],
    ) -> Self {
        const IFF_TUN: libc::c_short = 0x0001;
        const IFF_NO_PI: libc::c_short = 0x1000;
        const TUNSETIFF: libc::Ioctl = 0x4004_54ca;
        let file = netns.run(|| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun");
            // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
            let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
            assert!(name.len() < libc::IFNAMSIZ, "interface name too long");
            for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
                *to = from as libc::c_char;
            }
            request.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
            // SAFETY: TUNSETIFF reads the name and flags of a request we own.
            let created = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut request) };
            assert_eq!(created, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            if let Some(link_type) = link_type {
                const TUNSETLINK: libc::Ioctl = 0x4004_54cd;
                // SAFETY: TUNSETLINK takes its argument by value.
                let set = unsafe {
                    libc::ioctl(file.as_raw_fd(), TUNSETLINK, libc::c_ulong::from(link_type))
                };
                assert_eq!(set, 0, "TUNSETLINK: {}", std::io::Error::last_os_error());
            }
            file
        });
        for address in addresses {
            let mut args = vec!["addr", "add", address, "dev", name];
            if address.contains(':') {
                args.push("nodad");
            }
            netns.ip(&args);
        }
        netns.ip(&["link", "set", name, "up"]);
        let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_RDWR;
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags)).expect("non-blocking");
        Self { name: name.to_owned(), file }
    }

    /// Whether a TCP SYN from `source` to `destination:port`, sent into the
    /// host through this device, gets a SYN-ACK back within `timeout`.
    pub fn syn_is_answered(
        &mut self,
        source: IpAddr,
        destination: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> bool {
        self.drain();
        let syn = tcp_syn(source, destination, port);
        self.file.write_all(&syn).expect("write into the TUN device");
        let deadline = Instant::now() + timeout;
        let mut packet = [0u8; 2048];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let millis = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(millis)).expect("poll") == 0 {
                return false;
            }
            let Ok(len) = self.file.read(&mut packet) else { continue };
            if is_syn_ack(&packet[..len], source, port) {
                return true;
            }
        }
        false
    }

    /// Discards what the host sent before (router solicitations, earlier replies).
    fn drain(&mut self) {
        let mut packet = [0u8; 2048];
        while self.file.read(&mut packet).is_ok_and(|len| len > 0) {}
    }
}

/// Whether `packet` is the SYN-ACK from `port` to [`tcp_syn`]'s SYN from `client`.
fn is_syn_ack(packet: &[u8], client: IpAddr, port: u16) -> bool {
    let (destination, tcp): (IpAddr, &[u8]) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 40 && packet[9] == 6 => {
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            (destination.into(), packet.get(header_len..).unwrap_or_default())
        }
        Some(6) if packet.len() >= 60 && packet[6] == 6 => {
            let octets: [u8; 16] = packet[24..40].try_into().expect("16 bytes");
            (Ipv6Addr::from(octets).into(), &packet[40..])
        }
        _ => return false,
    };
    destination == client
        && tcp.len() >= 14
        && tcp[0..2] == port.to_be_bytes()
        && tcp[2..4] == CLIENT_PORT.to_be_bytes()
        && tcp[13] & 0x12 == 0x12
}
