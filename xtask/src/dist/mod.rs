//! `cargo xtask dist`: for x86_64 and aarch64 (Graviton), a `.deb`, an RPM
//! and a tarball of the release binary (which embeds the XDP program), the
//! systemd unit and an example config, under `target/dist/`. With `--check`,
//! the packages are then installed into empty roots and the installed
//! binaries are exercised: natively for x86_64, under qemu-user for aarch64.
//!
//! The packages are assembled with `dpkg-deb` and `rpmbuild` from staging
//! trees rather than by cargo-deb or cargo-generate-rpm: each package is six
//! files and a few scripts, and this way a fresh machine needs nothing beyond
//! Debian's own tools.

mod deb;
mod rpm;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cross, exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Install the packages into empty roots and test the installed binaries.
    #[arg(long)]
    pub check: bool,
}

/// One architecture the packages are built for, as Rust, Debian and RPM
/// (and tarball names, which follow `uname -m` like RPM) call it.
pub struct Arch {
    target: &'static str,
    deb: &'static str,
    rpm: &'static str,
    /// An objdump that reads this architecture's ELF files (Debian's plain
    /// `objdump` only knows the host's).
    objdump: &'static str,
}

const X86_64: Arch =
    Arch { target: "x86_64-unknown-linux-gnu", deb: "amd64", rpm: "x86_64", objdump: "objdump" };
const AARCH64: Arch = Arch {
    target: cross::TARGET,
    deb: "arm64",
    rpm: "aarch64",
    objdump: "aarch64-linux-gnu-objdump",
};

/// Commands `dist` runs, and the Debian packages they come from: the
/// packagers and the host's objdump for the glibc floor (the aarch64 one
/// comes with the cross toolchain).
const TOOLS: [(&str, &str); 3] =
    [("dpkg-deb", "dpkg"), ("rpmbuild", "rpm"), ("objdump", "binutils")];

/// What one architecture's build produced.
pub struct Built {
    arch: &'static Arch,
    glibc: String,
    deb: PathBuf,
    rpm: PathBuf,
    tarball: PathBuf,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure()?;
    exec::install_missing("dist", &TOOLS)?;
    cross::prepare("dist")?;
    if std::env::consts::ARCH != "x86_64" {
        // The host build is the x86_64 package's binary (and the one `demo`
        // and `bench` reuse); elsewhere it would be packaged as the wrong arch.
        bail!("cargo xtask dist builds on x86_64 hosts only (this is {})", std::env::consts::ARCH);
    }
    let root = exec::workspace_root();
    let dist = root.join("target/dist");
    let binaries = [(&X86_64, exec::build_release_binary()?), (&AARCH64, build_aarch64()?)];
    let mut built = Vec::new();
    for (arch, binary) in binaries {
        built.push(package(arch, &binary, &dist)?);
    }
    for b in &built {
        println!("{}: glibc >= {}", b.arch.rpm, b.glibc);
        for file in [&b.deb, &b.rpm, &b.tarball] {
            println!("  {}", file.display());
        }
    }
    if options.check {
        exec::require_root("cargo xtask dist --check")?;
        exec::install_missing("dist --check", &[("qemu-aarch64", "qemu-user")])?;
        let [x86_64, aarch64] = &built[..] else { unreachable!("two architectures") };
        deb::check(x86_64, &dist)?;
        deb::check_foreign(aarch64, &dist)?;
        rpm::check(x86_64, aarch64, &dist)?;
        println!("package checks passed");
    }
    Ok(())
}

/// Cross-builds the release binary for aarch64. The XDP object it embeds
/// is built by `proxy/build.rs` for the BPF target, the same whatever the
/// host or target.
fn build_aarch64() -> anyhow::Result<PathBuf> {
    exec::run(
        cross::cargo()
            .args(["build", "--release", "--package", "edgegate", "--bin", "edgegate"])
            .args(["--target", cross::TARGET]),
    )?;
    Ok(exec::workspace_root().join("target").join(cross::TARGET).join("release/edgegate"))
}

/// Stages, packages and archives one architecture's binary.
fn package(arch: &'static Arch, binary: &Path, dist: &Path) -> anyhow::Result<Built> {
    let version = env!("CARGO_PKG_VERSION");
    let glibc = glibc_floor(arch, binary)?;
    let stage = dist.join(format!("edgegate_{version}_{}", arch.deb));
    // Debian keeps units in /lib; RPM distributions in /usr/lib.
    stage_files(binary, &stage, "lib/systemd/system")?;
    let deb = deb::build(arch, &stage, &glibc, dist)?;
    let tarball = dist.join(format!("edgegate-{version}-{}-linux.tar.gz", arch.rpm));
    exec::run(
        Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .args(["--owner=0", "--group=0", "-C"])
            .arg(&stage)
            .args(["usr", "lib", "etc"]),
    )?;
    let rpm_stage = dist.join(format!("edgegate-{version}.{}-root", arch.rpm));
    stage_files(binary, &rpm_stage, "usr/lib/systemd/system")?;
    let rpm = rpm::build(arch, &rpm_stage, &glibc, dist)?;
    Ok(Built { arch, glibc, deb, rpm, tarball })
}

/// The packaged files, in a fresh tree at `stage`, with their modes.
fn stage_files(binary: &Path, stage: &Path, unit_dir: &str) -> anyhow::Result<()> {
    let root = exec::workspace_root();
    let _ = fs::remove_dir_all(stage);
    let unit = format!("{unit_dir}/edgegate.service");
    let files: [(&Path, &str, u32); 5] = [
        (binary, "usr/bin/edgegate", 0o755),
        (&root.join("proxy/dist/edgegate.service"), &unit, 0o644),
        (&root.join("proxy/dist/edgegate.toml"), "etc/edgegate/edgegate.toml", 0o640),
        (&root.join("README.md"), "usr/share/doc/edgegate/README.md", 0o644),
        (&root.join("proxy/dist/allowlist.empty"), "usr/share/edgegate/allowlist.empty", 0o644),
    ];
    for (from, to, mode) in files {
        install(from, &stage.join(to), mode)?;
    }
    // The README links to the pages under docs/: shipped at the same
    // relative place, every one of them.
    for page in fs::read_dir(root.join("docs"))? {
        let page = page?.path();
        if let Some(name) = page.file_name().filter(|_| page.extension() == Some("md".as_ref())) {
            install(&page, &stage.join("usr/share/doc/edgegate/docs").join(name), 0o644)?;
        }
    }
    Ok(())
}

/// The newest glibc symbol version `binary` uses, which is the oldest glibc
/// it runs on: what the packages must depend on (Debian 12 builds against
/// 2.36, but the binary only needs what its symbols say).
fn glibc_floor(arch: &Arch, binary: &Path) -> anyhow::Result<String> {
    let output = exec::output(Command::new(arch.objdump).arg("-T").arg(binary))?;
    if !output.status.success() {
        bail!("{} -T {} failed: {}", arch.objdump, binary.display(), output.status);
    }
    String::from_utf8_lossy(&output.stdout)
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|version| {
            version.split('.').map(str::parse::<u32>).collect::<Result<Vec<_>, _>>().ok()
        })
        .max()
        .map(|newest| newest.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
        .with_context(|| format!("{} uses no versioned glibc symbols", binary.display()))
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

/// The installed binary of `built`, run natively or, for aarch64, under
/// qemu-user with Debian's cross libc as its root.
fn installed(built: &Built, root: &Path) -> Command {
    let binary = root.join("usr/bin/edgegate");
    if built.arch.target == X86_64.target {
        return Command::new(binary);
    }
    let mut command = Command::new("qemu-aarch64");
    command.args(["-L", cross::SYSROOT]).arg(binary);
    command
}

/// Runs the binary installed into `root`: `--version`, then `check` of the
/// example config as shipped, but for its user (no package script ran
/// useradd in this root: the worker gets a transient uid instead) and its
/// interface (`check` refuses one this host does not have).
fn version_and_check(built: &Built, root: &Path, dist: &Path) -> anyhow::Result<()> {
    exec::run(installed(built, root).arg("--version"))?;
    let example = fs::read_to_string(root.join("etc/edgegate/edgegate.toml"))?;
    let config = dist.join("example-here.toml");
    let here = example
        .replace("\nuser = \"edgegate\"", "\n# user = \"edgegate\"")
        .replace("interfaces = [\"ens5\"]", "interfaces = [\"lo\"]");
    fs::write(&config, here)?;
    exec::run(
        installed(built, root)
            .arg("--state-dir")
            .arg(root.join("var/lib/edgegate"))
            .args(["check", "--config"])
            .arg(&config),
    )
}
