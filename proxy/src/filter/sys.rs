//! The system calls aya does not wrap: every `unsafe` of the filter module
//! is here, each with the reason it is sound.

use std::{ffi::CString, io, os::fd::OwnedFd, path::Path};

use super::FilterError;

/// Opens a pinned BPF object (BPF_OBJ_GET). aya opens pins too, but does not
/// hand out the descriptor, which [`link_ifindex`] needs. The worker's
/// `bpf-obj-get` escape attempt (test hooks) makes this very call.
pub(crate) fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    /// `union bpf_attr` for BPF_OBJ_GET.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attribute whose path outlives the call.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &raw const attr, size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
}

/// The interface an XDP link is bound to (0 once detached), from
/// BPF_OBJ_GET_INFO_BY_FD: aya's `LinkInfo` does not expose it.
pub(super) fn link_ifindex(link: &OwnedFd) -> io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    /// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // `struct bpf_link_info`: type, id, prog_id, then an 8-byte aligned union
    // whose `xdp.ifindex` is its first u32: the fifth u32.
    let mut info = [0u32; 16];
    let attr = GetInfo {
        bpf_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        info_len: u32::try_from(size_of_val(&info)).expect("small"),
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points at `info`, a writable buffer of the length given.
    let result = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw const attr, size_of::<GetInfo>())
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[4])
}

pub(super) fn if_index(name: &str) -> Result<u32, FilterError> {
    let unknown = || FilterError::UnknownInterface { name: name.to_owned() };
    let c_name = CString::new(name).map_err(|_| unknown())?;
    // SAFETY: `c_name` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(unknown()),
        index => Ok(index),
    }
}
/// Runs an interface ioctl (`SIOCGIF*`, `SIOCETHTOOL`) for `name` in the
/// caller's network namespace; `None` if the name is too long or the call
/// fails (no such interface, a driver without that operation).
///
/// # Safety
/// `request` must be an ioctl that reads `ifr_name` and at most reads or
/// writes through the union as `fill` prepared it (for `SIOCETHTOOL`: a
/// pointer to a live, writable command buffer of the size the command uses).
unsafe fn ifreq_ioctl(
    name: &str,
    request: libc::Ioctl,
    fill: impl FnOnce(&mut libc::ifreq),
) -> Option<libc::ifreq> {
    use std::os::fd::AsRawFd as _;
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in ifreq.ifr_name.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    fill(&mut ifreq);
    // SAFETY: `ifr_name` is NUL-terminated (the name is shorter than the
    // zeroed array); the caller vouches for the rest of the request.
    (unsafe { libc::ioctl(socket.as_raw_fd(), request, &raw mut ifreq) } == 0).then_some(ifreq)
}

/// The MTU of interface `name` in the caller's network namespace, if it exists.
pub fn interface_mtu(name: &str) -> Option<u32> {
    // SAFETY: SIOCGIFMTU writes `ifr_ifru.ifru_mtu` of the request.
    let ifreq = unsafe { ifreq_ioctl(name, libc::SIOCGIFMTU, |_| {}) }?;
    // SAFETY: the ioctl succeeded, so it wrote the MTU member of the union.
    u32::try_from(unsafe { ifreq.ifr_ifru.ifru_mtu }).ok()
}

/// The link type (`ARPHRD_*`) of interface `name`, from its hardware address.
pub fn interface_link_type(name: &str) -> Option<u16> {
    // SAFETY: SIOCGIFHWADDR writes `ifr_ifru.ifru_hwaddr` of the request.
    let ifreq = unsafe { ifreq_ioctl(name, libc::SIOCGIFHWADDR, |_| {}) }?;
    // SAFETY: the ioctl succeeded, so it wrote the hardware address member.
    Some(unsafe { ifreq.ifr_ifru.ifru_hwaddr.sa_family })
}

const SIOCETHTOOL: libc::Ioctl = 0x8946;

/// Runs ethtool command `command` (whose buffer starts with its `cmd`).
///
/// # Safety
/// `T` must be the kernel's struct for the command in its `cmd`, or larger:
/// the kernel writes that many bytes into it.
unsafe fn ethtool<T>(name: &str, mut command: T) -> Option<T> {
    // SAFETY: SIOCETHTOOL reads and writes the command buffer `ifru_data`
    // points at, `command`, which lives across the call and is as large as
    // the kernel's struct for its command (the caller's promise).
    unsafe {
        ifreq_ioctl(name, SIOCETHTOOL, |ifreq| {
            ifreq.ifr_ifru.ifru_data = (&raw mut command).cast();
        })
    }?;
    Some(command)
}

/// The driver behind interface `name` (`ena`, `veth`, ...), by ETHTOOL_GDRVINFO.
pub fn interface_driver(name: &str) -> Option<String> {
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DriverInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 5 * 4],
    }
    const _: () = assert!(size_of::<DriverInfo>() == 196, "struct ethtool_drvinfo");
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    let command =
        DriverInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 32 * 4 + 12 + 5 * 4] };
    // SAFETY: `DriverInfo` is `struct ethtool_drvinfo`, the command's buffer.
    let info = unsafe { ethtool(name, command) }?;
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// Combined (RX and TX) queues of interface `name`: in use, and the most
/// its driver offers; by ETHTOOL_GCHANNELS.
pub fn interface_queues(name: &str) -> Option<super::Queues> {
    /// `struct ethtool_channels`.
    #[repr(C)]
    #[derive(Default)]
    struct Channels {
        cmd: u32,
        max_rx: u32,
        max_tx: u32,
        max_other: u32,
        max_combined: u32,
        rx_count: u32,
        tx_count: u32,
        other_count: u32,
        combined_count: u32,
    }
    const _: () = assert!(size_of::<Channels>() == 36, "struct ethtool_channels");
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    let command = Channels { cmd: ETHTOOL_GCHANNELS, ..Channels::default() };
    // SAFETY: `Channels` is `struct ethtool_channels`, the command's buffer.
    let channels = unsafe { ethtool(name, command) }?;
    Some(super::Queues { in_use: channels.combined_count, max: channels.max_combined })
}

/// Every interface in the caller's network namespace, by name.
pub fn interface_names() -> Vec<String> {
    let mut names: Vec<String> = nix::net::if_::if_nameindex()
        .map(|interfaces| {
            interfaces.iter().map(|i| i.name().to_string_lossy().into_owned()).collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Forwards the program's aya-log records into the daemon's log.
pub(super) fn spawn_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, keeps it open and
        // never swaps it while the AsyncFd holds the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("XDP program diagnostics will not be logged: {e}");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// A BPF array of `u64` created with BPF_F_MMAPABLE, mapped into this
/// process: its words are written as memory, with no system call each.
pub(super) struct MappedWords {
    words: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
    /// Keeps the map alive as long as the mapping (the mapping also holds
    /// its own reference; this one makes ownership plain).
    _map: aya::maps::MapData,
}

// SAFETY: the mapping belongs to this value alone, and every access to it
// goes through `AtomicU64`, which may be shared between threads.
unsafe impl Send for MappedWords {}
// SAFETY: as above.
unsafe impl Sync for MappedWords {}

impl MappedWords {
    /// Maps the first `len` words of `map`.
    pub(super) fn new(map: aya::maps::MapData, len: usize) -> io::Result<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of a descriptor we hold; the kernel
        // checks that the map is mmapable and at least this long.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * size_of::<u64>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let words = std::ptr::NonNull::new(address.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { words, len, _map: map })
    }

    pub(super) fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: `len` words, page-aligned, mapped until `drop`; the XDP
        // program reads them concurrently, which atomics allow.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no reference from
        // `words` outlives `self`.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * size_of::<u64>()) };
    }
}
