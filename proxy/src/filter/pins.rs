//! The pin layout under the bpffs directory, and attaching, adopting,
//! releasing and detaching the per-interface XDP links.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    ProgramError, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use proxy_common::{Framing, map};

use super::{FilterError, interface::ena_obstacles};
use crate::{
    config::AttachMode,
    files::{IoContext as _, IoError},
    status::{AttachedMode, Attachment},
};

/// aya's name for a mode.
fn xdp_mode(mode: AttachedMode) -> XdpMode {
    match mode {
        AttachedMode::Native => XdpMode::Driver,
        AttachedMode::Skb => XdpMode::Skb,
    }
}

pub(super) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `dir`'s parent is a bpffs, mounting the standard one if needed.
pub(super) fn prepare_bpffs(dir: &Path) -> Result<(), FilterError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        tracing::info!("mounting bpffs on /sys/fs/bpf");
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(FilterError::MountBpffs)?;
        if is_bpffs(parent) {
            return Ok(());
        }
    }
    Err(FilterError::BpffsNotMounted { dir: dir.to_owned() })
}

pub(super) fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// A pin name for an interface: bpffs refuses names with dots, which
/// interface names (`eth0.100`) may contain.
pub(super) fn link_pin_name(mode: AttachedMode, interface: &str) -> String {
    let escaped = interface.replace('%', "%25").replace('.', "%2e");
    format!("{}-{escaped}", mode.name())
}

pub(super) fn parse_link_pin_name(name: &str) -> Option<(AttachedMode, String)> {
    let (mode, escaped) = name.split_once('-')?;
    let mode = AttachedMode::ALL.into_iter().find(|m| m.name() == mode)?;
    Some((mode, escaped.replace("%2e", ".").replace("%25", "%")))
}

/// Attaches `program`, which reads `framing`, to `interface`, or takes over
/// the link an earlier daemon pinned for it.
pub(super) fn attach(
    program: &mut Xdp,
    framing: Framing,
    links_dir: &Path,
    interface: &str,
    if_index: u32,
    wanted: AttachMode,
) -> Result<Attachment, FilterError> {
    for mode in AttachedMode::ALL {
        let pin = links_dir.join(link_pin_name(mode, interface));
        if !pin.exists() {
            continue;
        }
        let mismatch = matches!(
            (wanted, mode),
            (AttachMode::Native, AttachedMode::Skb) | (AttachMode::Skb, AttachedMode::Native)
        );
        if mismatch {
            tracing::warn!(
                "`{interface}` keeps its pinned {mode} attachment although mode = {wanted:?}: the \
                 kernel cannot run both modes at once, so switching needs a gap in filtering; run \
                 `edgegate detach --interface {interface}` and restart to switch"
            );
        }
        let adopt = |source| FilterError::Adopt { path: pin.clone(), source };
        let link = PinnedLink::from_pin(&pin).map_err(adopt)?;
        let link = XdpLink::try_from(FdLink::from(link)).map_err(adopt)?;
        program.attach_to_link(link).map_err(|source| FilterError::Attach {
            interface: interface.to_owned(),
            mode,
            source,
        })?;
        tracing::info!("`{interface}`: took over the pinned {mode}-mode XDP link");
        return Ok(Attachment { interface: interface.to_owned(), mode, framing, adopted: true });
    }

    let modes: &[AttachedMode] = match (framing, wanted) {
        (Framing::Ethernet, AttachMode::Auto) => &[AttachedMode::Native, AttachedMode::Skb],
        (Framing::Ethernet, AttachMode::Native) => &[AttachedMode::Native],
        // Layer-3 drivers have no native XDP (TUN has it only in TAP mode):
        // go straight to generic mode, without a misleading fallback warning.
        (Framing::Ip, AttachMode::Native) => {
            return Err(FilterError::NativeOnLayer3 { interface: interface.to_owned() });
        }
        (Framing::Ip, AttachMode::Auto) | (_, AttachMode::Skb) => &[AttachedMode::Skb],
    };
    let mut last_error = None;
    for &mode in modes {
        match program.attach_to_if_index(if_index, xdp_mode(mode)) {
            Ok(link_id) => {
                let link = program.take_link(link_id).map_err(|source| FilterError::Attach {
                    interface: interface.to_owned(),
                    mode,
                    source,
                })?;
                let pin = links_dir.join(link_pin_name(mode, interface));
                let fd_link = FdLink::try_from(link)
                    .map_err(|_| FilterError::NoLinkSupport { interface: interface.to_owned() })?;
                let pinned = fd_link
                    .pin(&pin)
                    .map_err(|source| FilterError::Pin { path: pin.clone(), source })?;
                // The pin keeps the link (and so the attachment) alive; our fd can go.
                drop(pinned);
                // Falling back: the native attempt before this one failed.
                if let Some((AttachedMode::Native, refusal)) = &last_error {
                    let obstacles = ena_obstacles(interface);
                    let why = if obstacles.is_empty() {
                        let reason = if lacks_native_xdp(refusal) {
                            "the driver has no native XDP support".to_owned()
                        } else {
                            refusal.to_string()
                        };
                        format!("native XDP was refused ({reason})")
                    } else {
                        let obstacles: Vec<String> =
                            obstacles.iter().map(ToString::to_string).collect();
                        format!("native XDP was refused: {}", obstacles.join("; "))
                    };
                    tracing::warn!(
                        "`{interface}`: {why}; attached in skb (generic) mode, which filters \
                         after the kernel has allocated the packet"
                    );
                } else if framing == Framing::Ip {
                    tracing::info!(
                        "`{interface}`: a layer-3 device (frames start with the IP header)"
                    );
                }
                tracing::info!("`{interface}`: attached in {mode} mode");
                return Ok(Attachment {
                    interface: interface.to_owned(),
                    mode,
                    framing,
                    adopted: false,
                });
            }
            Err(source) => last_error = Some((mode, source)),
        }
    }
    let (mode, source) = last_error.expect("at least one mode was tried");
    let obstacles = if mode == AttachedMode::Native { ena_obstacles(interface) } else { vec![] };
    if !obstacles.is_empty() {
        return Err(FilterError::EnaNative { interface: interface.to_owned(), obstacles });
    }
    if mode == AttachedMode::Native && lacks_native_xdp(&source) {
        return Err(FilterError::NativeUnsupported { interface: interface.to_owned() });
    }
    Err(FilterError::Attach { interface: interface.to_owned(), mode, source })
}

/// Whether a native attachment failed because the driver has no native XDP.
fn lacks_native_xdp(error: &ProgramError) -> bool {
    matches!(error, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP))
}

/// Detaches interfaces that an earlier daemon attached but the config no longer names.
pub(super) fn release_unconfigured_links(
    links_dir: &Path,
    configured: &[String],
) -> Result<(), FilterError> {
    for (path, mode, interface) in pinned_links(links_dir)? {
        if !configured.contains(&interface) {
            tracing::info!(
                "`{interface}` is no longer configured: detaching its {mode}-mode XDP link"
            );
            remove_pin(&path)?;
        }
    }
    Ok(())
}

pub(super) fn pinned_links(
    links_dir: &Path,
) -> Result<Vec<(PathBuf, AttachedMode, String)>, FilterError> {
    let entries = match fs::read_dir(links_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(IoError::new("list", links_dir, source).into());
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let (mode, interface) = parse_link_pin_name(entry.file_name().to_str()?)?;
            Some((entry.path(), mode, interface))
        })
        .collect())
}

pub(super) fn remove_pin(path: &Path) -> Result<(), FilterError> {
    Ok(fs::remove_file(path).at("remove", path)?)
}
/// What `detach` removed.
#[derive(Debug, Default)]
pub struct Detached {
    pub interfaces: Vec<(String, AttachedMode)>,
    pub maps_removed: bool,
}

/// Removes the pinned links (of one interface, or all) and, when none is
/// left, the pinned maps and the directory. Must not run while a daemon
/// holds the program: its own link references would keep it attached.
pub fn detach_pinned(bpffs_dir: &Path, interface: Option<&str>) -> Result<Detached, FilterError> {
    let links_dir = bpffs_dir.join("links");
    let mut detached = Detached::default();
    for (path, mode, name) in pinned_links(&links_dir)? {
        if interface.is_none_or(|wanted| wanted == name) {
            remove_pin(&path)?;
            detached.interfaces.push((name, mode));
        }
    }
    if pinned_links(&links_dir)?.is_empty() {
        let maps_dir = bpffs_dir.join("maps");
        for name in map::PINNED {
            let path = maps_dir.join(name);
            if path.exists() {
                remove_pin(&path)?;
                detached.maps_removed = true;
            }
        }
        for dir in [&maps_dir, &links_dir, &bpffs_dir.to_path_buf()] {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(IoError::new("remove", dir.as_path(), source).into());
                }
            }
        }
    }
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip_dotted_interfaces() {
        for name in ["eth0", "eth0.100", "a%b.c", "veth-x"] {
            let pin = link_pin_name(AttachedMode::Skb, name);
            assert!(!pin.contains('.'), "{pin}");
            assert_eq!(parse_link_pin_name(&pin), Some((AttachedMode::Skb, name.to_owned())));
        }
    }
}
