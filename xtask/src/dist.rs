//! `cargo xtask dist`: a `.deb` and a tarball of the release binary (which
//! embeds the XDP program), the systemd unit and an example config, under
//! `target/dist/`. With `--check`, the package is then installed into an
//! empty root and the installed binary is exercised.
//!
//! The `.deb` is assembled with `dpkg-deb` from a staging tree rather than by
//! cargo-deb: the package is five files and two scripts, and this way a fresh
//! machine needs nothing beyond Debian's own tools.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Install the package into an empty root and test the installed binary.
    #[arg(long)]
    pub check: bool,
}

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

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure()?;
    let binary = exec::build_release_binary()?;
    let root = exec::workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let dist = root.join("target/dist");
    let stage = dist.join(format!("edgegate_{version}_amd64"));
    let _ = fs::remove_dir_all(&stage);

    let files: [(&Path, &str, u32); 5] = [
        (&binary, "usr/bin/edgegate", 0o755),
        (&root.join("proxy/dist/edgegate.service"), "lib/systemd/system/edgegate.service", 0o644),
        (&root.join("proxy/dist/edgegate.toml"), "etc/edgegate/edgegate.toml", 0o640),
        (&root.join("README.md"), "usr/share/doc/edgegate/README.md", 0o644),
        (&root.join("proxy/dist/allowlist.empty"), "usr/share/edgegate/allowlist.empty", 0o644),
    ];
    for (from, to, mode) in files {
        install(from, &stage.join(to), mode)?;
    }
    let installed_kib = dir_size(&stage)? / 1024;
    let control = format!(
        "Package: edgegate\nVersion: {version}\nArchitecture: amd64\nMaintainer: edgegate developers\n\
         Section: net\nPriority: optional\nDepends: libc6 (>= 2.34)\nInstalled-Size: {installed_kib}\n\
         Description: XDP source-address allowlist and mutual-TLS gate\n \
         Drops packets from sources not on the allowlist at the NIC (XDP), and terminates\n \
         mutual TLS for the connections that get through. Managed with `edgegate`.\n"
    );
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    fs::write(debian.join("control"), control)?;
    fs::write(debian.join("conffiles"), "/etc/edgegate/edgegate.toml\n")?;
    write_script(&debian.join("postinst"), POSTINST)?;
    write_script(&debian.join("prerm"), PRERM)?;

    let deb = dist.join(format!("edgegate_{version}_amd64.deb"));
    exec::run(
        Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&stage).arg(&deb),
    )?;
    let tarball = dist.join(format!("edgegate-{version}-x86_64-linux.tar.gz"));
    exec::run(
        Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .args(["--owner=0", "--group=0", "-C"])
            .arg(&stage)
            .args(["usr", "lib", "etc"]),
    )?;
    println!("{}\n{}", deb.display(), tarball.display());
    if options.check {
        check(&deb, &dist)?;
    }
    Ok(())
}

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(to.parent().expect("a file in a directory"))?;
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write_script(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            dir_size(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

/// Installs `deb` with dpkg into an empty root (no Rust, no build tree in
/// it), then runs the installed binary: `--version`, `check` of the shipped
/// example config, the unit through `systemd-analyze verify`, and `demo`.
fn check(deb: &Path, dist: &Path) -> anyhow::Result<()> {
    exec::require_root("cargo xtask dist --check")?;
    let root = dist.join("install-root");
    let _ = fs::remove_dir_all(&root);
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::write(root.join("var/lib/dpkg/status"), "")?;
    exec::run(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--force-depends", "--install"])
            .arg(deb),
    )?;
    let installed = root.join("usr/bin/edgegate");
    let allowlist = root.join("var/lib/edgegate/allowlist");
    if !allowlist.exists() {
        bail!("postinst did not create {}", allowlist.display());
    }
    exec::run(Command::new(&installed).arg("--version"))?;
    // The example config as shipped, but for its user (dpkg did not run
    // useradd in this root: postinst skips it under DPKG_ROOT) and its
    // interface (`check` refuses one this host does not have).
    let example = fs::read_to_string(root.join("etc/edgegate/edgegate.toml"))?;
    let config = dist.join("example-here.toml");
    let here = example
        .replace("user = \"edgegate\"", "user = \"nobody\"")
        .replace("interfaces = [\"ens5\"]", "interfaces = [\"lo\"]");
    fs::write(&config, here)?;
    exec::run(
        Command::new(&installed)
            .arg("--state-dir")
            .arg(root.join("var/lib/edgegate"))
            .args(["check", "--config"])
            .arg(&config),
    )?;
    // systemd-analyze checks that the unit's commands exist: point them at
    // the installed binary, on this host.
    let unit = fs::read_to_string(root.join("lib/systemd/system/edgegate.service"))?;
    let probe = dist.join("unit-check/edgegate.service");
    fs::create_dir_all(probe.parent().expect("a directory"))?;
    fs::write(&probe, unit.replace("/usr/bin/edgegate", &installed.display().to_string()))?;
    exec::run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&probe))?;
    exec::run(Command::new(&installed).args(["demo", "--duration", "5s"]))?;
    println!("package check passed: {}", deb.display());
    Ok(())
}
