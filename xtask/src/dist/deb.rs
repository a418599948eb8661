//! The `.deb`: built with `dpkg-deb` from a staging tree, checked by
//! installing it with dpkg into an empty root.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

use super::Built;
use crate::arch::Arch;
use crate::exec;

const POSTINST: &str = "#!/bin/sh
# The allowlist is state the daemon owns: create it once, never overwrite it.
set -e
if [ \"$1\" = configure ]; then
    # The unprivileged user the daemon becomes after start-up (`daemon.user`).
    if [ -z \"$DPKG_ROOT\" ] && ! getent passwd edgegate >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /var/lib/edgegate \\
            --shell /usr/sbin/nologin edgegate
    fi
    mkdir -p \"$DPKG_ROOT/var/lib/edgegate\"
    chmod 0700 \"$DPKG_ROOT/var/lib/edgegate\"
    [ -e \"$DPKG_ROOT/var/lib/edgegate/allowlist\" ] || \\
        install -m 0600 \"$DPKG_ROOT/usr/share/edgegate/allowlist.empty\" \"$DPKG_ROOT/var/lib/edgegate/allowlist\"
    if [ -z \"$DPKG_ROOT\" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # An upgrade restarts a running gate with the new binary: the
        # listening sockets are handed over, no connection is refused.
        if [ -n \"$2\" ]; then systemctl try-restart edgegate || true; fi
    fi
fi
";

const PRERM: &str = "#!/bin/sh
# Removing the package stops the daemon and removes the filter: an
# uninstalled edgegate must not leave packets dropped by a program nobody owns.
set -e
if [ \"$1\" = remove ] && [ -z \"$DPKG_ROOT\" ]; then
    if [ -d /run/systemd/system ]; then systemctl stop edgegate || true; fi
    /usr/bin/edgegate detach || true
fi
";

/// Adds the control files to `stage` (see `super::stage_files`) and builds
/// the `.deb` from it into `dist`.
pub fn build(arch: &Arch, stage: &Path, glibc: &str, dist: &Path) -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let installed_kib = super::dir_size(stage)? / 1024;
    let control = format!(
        "Package: edgegate\nVersion: {version}\nArchitecture: {}\nMaintainer: edgegate developers\n\
         Section: net\nPriority: optional\nDepends: libc6 (>= {glibc})\nInstalled-Size: {installed_kib}\n\
         Description: XDP source-address allowlist and mutual-TLS gate\n \
         Drops packets from sources not on the allowlist at the NIC (XDP), and terminates\n \
         mutual TLS for the connections that get through. Managed with `edgegate`.\n",
        arch.debian
    );
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    fs::write(debian.join("control"), control)?;
    fs::write(debian.join("conffiles"), "/etc/edgegate/edgegate.toml\n")?;
    super::write_script(&debian.join("postinst"), POSTINST)?;
    super::write_script(&debian.join("prerm"), PRERM)?;

    let deb = dist.join(format!("edgegate_{version}_{}.deb", arch.debian));
    // xz at level 1, not dpkg-deb's default 6: on the stripped binary
    // (~20 MiB) level 6 takes four times as long, ~12 s per package on a CI
    // core, for 12% less. xz, not zstd, so that every dpkg and repository
    // tool reads it.
    exec::run(
        Command::new("dpkg-deb")
            .args(["-Zxz", "-z1", "--root-owner-group", "--build"])
            .arg(stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// Installs the host's `.deb` with dpkg into an empty root (no Rust, no
/// build tree in it), checks the stripped binary, completions and man pages
/// (`super::check_extras`), then runs the installed binary: `--version`,
/// `check` of the shipped example config, the unit through `systemd-analyze
/// verify`, and `demo`.
pub fn check(built: &Built, dist: &Path) -> anyhow::Result<()> {
    let root = install(built, &dist.join("install-root"), &[])?;
    super::check_extras(built, &root, &super::DEBIAN, dist)?;
    super::version_and_check(built, &root, dist)?;
    // systemd-analyze checks that the unit's commands exist: point them at
    // the installed binary, on this host.
    let installed = root.join("usr/bin/edgegate");
    let unit = fs::read_to_string(root.join("lib/systemd/system/edgegate.service"))?;
    let probe = dist.join("unit-check/edgegate.service");
    fs::create_dir_all(probe.parent().expect("a directory"))?;
    fs::write(&probe, unit.replace("/usr/bin/edgegate", &installed.display().to_string()))?;
    exec::run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&probe))?;
    exec::run(Command::new(&installed).args(["demo", "--duration", "5s"]))?;
    println!("package check passed: {}", built.deb.display());
    Ok(())
}

/// Installs another architecture's `.deb` the same way (dpkg must be told
/// the architecture is not the root's), checks what it installed as for the
/// host's, and runs the installed binary under qemu-user: `--version` and
/// `check`. XDP and network namespaces are not emulated, so no demo.
pub fn check_foreign(built: &Built, dist: &Path) -> anyhow::Result<()> {
    let root = dist.join(format!("install-root-{}", built.arch.debian));
    let root = install(built, &root, &["--force-architecture"])?;
    super::check_extras(built, &root, &super::DEBIAN, dist)?;
    super::version_and_check(built, &root, dist)?;
    println!("package check passed (qemu-user): {}", built.deb.display());
    Ok(())
}

/// Installs `built.deb` into a fresh dpkg database at `root`; postinst runs
/// on this host with `DPKG_ROOT` set, and must create the allowlist.
fn install(built: &Built, root: &Path, force: &[&str]) -> anyhow::Result<PathBuf> {
    let _ = fs::remove_dir_all(root);
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::write(root.join("var/lib/dpkg/status"), "")?;
    exec::run(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(force)
            .arg("--install")
            .arg(&built.deb),
    )?;
    let allowlist = root.join("var/lib/edgegate/allowlist");
    if !allowlist.exists() {
        bail!("postinst did not create {}", allowlist.display());
    }
    Ok(root.to_owned())
}
