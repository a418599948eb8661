//! The system calls aya does not wrap: every `unsafe` of the filter module
//! is here, each with the reason it is sound.

use std::{ffi::CString, io, os::fd::OwnedFd, path::Path};

use super::FilterError;

/// Opens a pinned BPF object (BPF_OBJ_GET). aya opens pins too, but does not
/// hand out the descriptor, which [`link_ifindex`] needs.
pub(super) fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
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
/// The MTU of interface `name` in the caller's network namespace, if it exists.
pub fn interface_mtu(name: &str) -> Option<u32> {
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
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads `ifr_name` (NUL-terminated: the name is shorter
    // than the zeroed array) and writes `ifr_ifru.ifru_mtu` of a request we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &raw mut request) } != 0 {
        return None;
    }
    // SAFETY: the ioctl succeeded, so it wrote the MTU member of the union.
    u32::try_from(unsafe { request.ifr_ifru.ifru_mtu }).ok()
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
