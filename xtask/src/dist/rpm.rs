//! The RPM (Amazon Linux 2023, RHEL and the like): built with Debian's
//! `rpmbuild` from a staging tree and a spec generated into `target/dist`,
//! checked by installing it with rpm into an empty root.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::Built;
use crate::arch::Arch;
use crate::exec;

/// rpmbuild's post-processing assumes it builds for the host: strip with the
/// host's strip (which cannot read an aarch64 binary), split off debuginfo
/// packages, add /usr/lib/.build-id links, compress man pages. `dist` has
/// done what of that the package needs: the binary comes stripped (its
/// debug info a file beside the packages), the man pages gzipped.
/// The payload is zstd, as the distributions the glibc floor admits (AL2023,
/// RHEL 9, Fedora) compress their own, at a level that takes ~2 s, not the
/// ~15 s of Debian rpm's default gzip -9.
const SPEC_HEADER: &str = "\
%global debug_package %{nil}
%global __strip /bin/true
%global __os_install_post %{nil}
%global _build_id_links none
%global _binary_payload w6.zstdio
";

/// Scriptlets run as `/bin/sh`, with `$1` the number of versions installed
/// after the operation. Under `rpm --root` rpm chroots into the root for
/// them (unlike dpkg's `--force-script-chrootless`), so plain paths are the
/// root's; the package is not relocatable, so `$RPM_INSTALL_PREFIX` plays no
/// part.
const SCRIPTLETS: [(&str, &str); 3] = [
    (
        "pre",
        "# The unprivileged user the daemon becomes after start-up (`daemon.user`).
getent passwd edgegate >/dev/null || \\
    useradd --system --user-group --no-create-home --home-dir /var/lib/edgegate \\
        --shell /usr/sbin/nologin edgegate
",
    ),
    (
        "post",
        "# The allowlist is state the daemon owns: create it once, never overwrite it.
set -e
mkdir -p /var/lib/edgegate
chmod 0700 /var/lib/edgegate
[ -e /var/lib/edgegate/allowlist ] || \\
    install -m 0600 /usr/share/edgegate/allowlist.empty /var/lib/edgegate/allowlist
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
",
    ),
    (
        "preun",
        "# Erasing the package stops the daemon and removes the filter: an
# uninstalled edgegate must not leave packets dropped by a program nobody owns.
# Not in a chroot (`rpm --root`), whose filter would be the host's: there
# /proc/1/root is not / (or /proc is not mounted).
if [ \"$1\" -eq 0 ] && [ \"$(stat -Lc %d:%i /proc/1/root 2>/dev/null)\" = \"$(stat -Lc %d:%i /)\" ]; then
    if [ -d /run/systemd/system ]; then systemctl stop edgegate || true; fi
    /usr/bin/edgegate detach || true
fi
",
    ),
];

/// The files, as `super::stage_files` lays them out for RPM distributions
/// (`super::RPM`); directories only where the package is their one owner:
/// the completion and man page directories are the shells', man's or the
/// filesystem package's.
const FILES: &str = "\
%defattr(-,root,root,0755)
/usr/bin/edgegate
/usr/lib/systemd/system/edgegate.service
/usr/share/bash-completion/completions/edgegate
/usr/share/zsh/site-functions/_edgegate
/usr/share/fish/vendor_completions.d/edgegate.fish
/usr/share/man/man1/edgegate*.1.gz
%dir /etc/edgegate
%config(noreplace) /etc/edgegate/edgegate.toml
%dir /usr/share/doc/edgegate
%doc /usr/share/doc/edgegate/README.md
%dir /usr/share/doc/edgegate/docs
%doc /usr/share/doc/edgegate/docs/*.md
%dir /usr/share/edgegate
/usr/share/edgegate/allowlist.empty
";

/// Builds the RPM of `stage` for `arch` into `dist`.
pub fn build(arch: &Arch, stage: &Path, glibc: &str, dist: &Path) -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let topdir = dist.join("rpmbuild");
    let scripts = topdir.join("scriptlets");
    fs::create_dir_all(&scripts)?;
    let mut spec = format!(
        "{SPEC_HEADER}
Name: edgegate
Version: {version}
Release: 1
Summary: XDP source-address allowlist and mutual-TLS gate
License: Apache-2.0
Requires: glibc >= {glibc}
Requires(pre): shadow-utils

%description
Drops packets from sources not on the allowlist at the NIC (XDP), and terminates
mutual TLS for the connections that get through. Managed with `edgegate`.

%install
mkdir -p %{{buildroot}}
cp -a '{stage}/.' %{{buildroot}}/

%files
{FILES}",
        stage = stage.display(),
    );
    for (name, body) in SCRIPTLETS {
        // rpmbuild copies scriptlets verbatim: catch a shell syntax error
        // here rather than on a customer's host.
        let file = scripts.join(format!("{name}.sh"));
        fs::write(&file, body)?;
        exec::run(Command::new("sh").arg("-n").arg(&file))?;
        spec.push_str(&format!("\n%{name}\n{body}"));
    }
    let spec_file = dist.join(format!("edgegate-{}.spec", arch.name));
    fs::write(&spec_file, spec)?;
    exec::run(
        Command::new("rpmbuild")
            .args(["-bb", "--quiet", "--target", arch.name])
            .arg("--define")
            .arg(format!("_topdir {}", topdir.display()))
            .arg(&spec_file),
    )?;
    let name = format!("edgegate-{version}-1.{}.rpm", arch.name);
    let rpm = dist.join(&name);
    let built = topdir.join("RPMS").join(arch.name).join(&name);
    fs::rename(&built, &rpm)
        .with_context(|| format!("move {} to {}", built.display(), rpm.display()))?;
    Ok(rpm)
}

/// Installs the host's RPM with rpm into an empty root, checks the stripped
/// binary, completions and man pages (`super::check_extras`) and runs the
/// installed binary: `--version`, `check` of the example config, `demo`.
/// Then compares the other architecture's RPM with it, file by file.
///
/// The install runs no scriptlets (`--noscripts`): rpm would run them
/// chrooted into the root, which has no /bin/sh, getent or useradd, and a
/// root furnished with a static shell would test that shell, not the
/// distribution's tools. The scriptlets are syntax-checked at build time;
/// here the state directory is made as `%post` makes it.
pub fn check(built: &Built, other: &Built, dist: &Path) -> anyhow::Result<()> {
    let root = dist.join("install-root-rpm");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    // The database where the target distributions keep it, whatever
    // Debian's rpm defaults to.
    let rpm = || {
        let mut command = Command::new("rpm");
        command.arg("--root").arg(&root).args(["--dbpath", "/var/lib/rpm"]);
        command
    };
    exec::run(rpm().arg("--initdb"))?;
    // --force-debian: else Debian's rpm warns that packages are for alien.
    exec::run(rpm().args(["--force-debian", "--nodeps", "--noscripts", "-i"]).arg(&built.rpm))?;
    let state = root.join("var/lib/edgegate");
    super::install(
        &root.join("usr/share/edgegate/allowlist.empty"),
        &state.join("allowlist"),
        0o600,
    )?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700))?;
    }
    super::check_extras(built, &root, &super::RPM, dist)?;
    super::version_and_check(built, &root, dist)?;
    exec::run(super::installed(built, &root).args(["demo", "--duration", "5s"]))?;

    let listing = |package: &Path| -> anyhow::Result<String> {
        let output = exec::output(
            Command::new("rpm")
                .args([
                    "-qp",
                    "--queryformat",
                    "[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILENAMES}\n]",
                ])
                .arg(package),
        )?;
        if !output.status.success() {
            bail!("rpm -qp {} failed: {}", package.display(), output.status);
        }
        Ok(String::from_utf8(output.stdout)?)
    };
    let files = listing(&built.rpm)?;
    if !files.lines().any(|line| line.starts_with("cn ") && line.ends_with("/edgegate.toml")) {
        bail!("{} does not mark the config %config(noreplace):\n{files}", built.rpm.display());
    }
    if listing(&other.rpm)? != files {
        bail!("{} and {} hold different files", other.rpm.display(), built.rpm.display());
    }
    println!("package check passed: {} (and {}'s file list)", built.rpm.display(), other.arch.name);
    Ok(())
}
