//! `cargo xtask dist`: for x86_64 and aarch64 (Graviton), a `.deb`, an RPM
//! and a tarball of the release binary (which embeds the XDP program), the
//! systemd unit, an example config, shell completions and man pages, under
//! `target/dist/`; beside them each binary's debug info, which the packaged
//! binary is stripped of. With `--check`, the packages are then installed
//! into empty roots and the installed binaries are exercised: natively for
//! x86_64, under qemu-user for aarch64.
//!
//! The packages are assembled with `dpkg-deb` and `rpmbuild` from staging
//! trees rather than by cargo-deb or cargo-generate-rpm: each package is a
//! binary, some small files and a few scripts, and this way a fresh machine needs nothing beyond
//! Debian's own tools.

mod deb;
mod rpm;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    arch::{AARCH64, Arch, X86_64},
    cross, exec, setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// Install the packages into empty roots and test the installed binaries.
    #[arg(long)]
    pub check: bool,
}

/// Where Debian and the RPM distributions keep what the packages install,
/// where they differ.
struct Layout {
    /// systemd units: Debian keeps them in /lib; RPM distributions in /usr/lib.
    units: &'static str,
    /// The completion scripts: the shell, and the file in the directory its
    /// package reads other packages' completions from (loaded on first use).
    completions: [(&'static str, &'static str); 3],
}

const DEBIAN: Layout = Layout {
    units: "lib/systemd/system",
    completions: [
        ("bash", "usr/share/bash-completion/completions/edgegate"),
        ("zsh", "usr/share/zsh/vendor-completions/_edgegate"),
        ("fish", "usr/share/fish/vendor_completions.d/edgegate.fish"),
    ],
};
const RPM: Layout = Layout {
    units: "usr/lib/systemd/system",
    completions: [
        ("bash", "usr/share/bash-completion/completions/edgegate"),
        ("zsh", "usr/share/zsh/site-functions/_edgegate"),
        ("fish", "usr/share/fish/vendor_completions.d/edgegate.fish"),
    ],
};

/// Where in `target/dist` `generate` writes the completions and man pages.
const GENERATED: &str = "generated";

/// Where both install the man pages (`edgegate.1.gz`, `edgegate-allow.1.gz`, …).
const MAN_PAGES: &str = "usr/share/man/man1";

/// Commands `dist` runs, and the Debian packages they come from: the
/// packagers, and the host's objdump and objcopy for the glibc floor and
/// stripping (the aarch64 ones come with the cross toolchain).
const TOOLS: [(&str, &str); 4] =
    [("dpkg-deb", "dpkg"), ("rpmbuild", "rpm"), ("objdump", "binutils"), ("objcopy", "binutils")];

/// What `dist --check` runs besides: qemu-user for the aarch64 binaries, the
/// shells to parse their completion scripts, and man to render the pages.
const CHECK_TOOLS: [(&str, &str); 4] =
    [("qemu-aarch64", "qemu-user"), ("zsh", "zsh"), ("fish", "fish"), ("man", "man-db")];

/// What one architecture's build produced.
pub struct Built {
    arch: &'static Arch,
    glibc: String,
    deb: PathBuf,
    rpm: PathBuf,
    tarball: PathBuf,
    /// The binary's size as cargo built it (with line tables) and as packaged.
    built_size: u64,
    packaged_size: u64,
    /// The debug info the packaged binary was stripped of, beside the packages.
    debug: PathBuf,
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
    let host = exec::build_release_binary(exec::Hooks::Off)?;
    // Completions and man pages are the same for every architecture: the
    // host's binary generates them once.
    let generated = dist.join(GENERATED);
    generate(&host, &generated)?;
    let binaries = [(&X86_64, host), (&AARCH64, build_aarch64()?)];
    let mut built = Vec::new();
    for (arch, binary) in binaries {
        built.push(package(arch, &binary, &generated, &dist)?);
    }
    for b in &built {
        println!("{}: glibc >= {}", b.arch.name, b.glibc);
        println!(
            "  edgegate {}: {} as built, {} packaged (stripped)",
            b.arch.name,
            size(b.built_size),
            size(b.packaged_size)
        );
        for file in [&b.deb, &b.rpm, &b.tarball, &b.debug] {
            println!("  {} ({})", file.display(), size(fs::metadata(file)?.len()));
        }
    }
    if options.check {
        exec::require_root("cargo xtask dist --check")?;
        exec::install_missing("dist --check", &CHECK_TOOLS)?;
        let [x86_64, aarch64] = &built[..] else { unreachable!("two architectures") };
        deb::check(x86_64, &dist)?;
        deb::check_foreign(aarch64, &dist)?;
        rpm::check(x86_64, aarch64, &dist)?;
        println!("package checks passed");
    }
    Ok(())
}

/// Writes the completion scripts (`completions/<shell>`) and the man pages
/// (`man/*.1.gz`) into a fresh `dir`, as `binary` generates them from its
/// command-line definition.
fn generate(binary: &Path, dir: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(dir);
    let completions = dir.join("completions");
    fs::create_dir_all(&completions)?;
    // The same shells in both layouts.
    for (shell, _) in DEBIAN.completions {
        let script = fs::File::create(completions.join(shell))?;
        exec::run(Command::new(binary).args(["completions", shell]).stdout(script))?;
    }
    let man = dir.join("man");
    exec::run(Command::new(binary).arg("man").arg("--out-dir").arg(&man))?;
    let pages = files_ending(&man, ".1")?;
    if !pages.contains(&man.join("edgegate.1")) {
        bail!("`{} man` wrote no edgegate.1 into {}", binary.display(), man.display());
    }
    // -n: no name or time stamp in the header, so that the same page
    // compresses to the same bytes (what Debian policy asks for).
    exec::run(Command::new("gzip").arg("-9n").args(pages))
}

/// The files in `dir` whose names end in `suffix`, sorted.
fn files_ending(dir: &Path, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.file_name().is_some_and(|name| name.to_string_lossy().ends_with(suffix)) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Splits `binary`'s debug info off into `edgegate-<version>-<arch>.debug`
/// in `dist`, compressed, and returns a stripped copy to package (cargo's
/// stays as it is: `demo` and `bench` reuse it). The copy names the file in
/// `.gnu_debuglink`, with its CRC: gdb and perf find it beside the binary
/// or in /usr/lib/debug/usr/bin, and by build ID under
/// /usr/lib/debug/.build-id. The symbol table stays (a few MB): a
/// `RUST_BACKTRACE` backtrace or `perf` on a gate host names functions
/// without the debug file.
fn strip(arch: &Arch, binary: &Path, dist: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let version = env!("CARGO_PKG_VERSION");
    let debug = dist.join(format!("edgegate-{version}-{}.debug", arch.name));
    exec::run(
        Command::new(arch.objcopy)
            .args(["--only-keep-debug", "--compress-debug-sections=zlib"])
            .arg(binary)
            .arg(&debug),
    )?;
    let stripped = dist.join("stripped").join(arch.name).join("edgegate");
    fs::create_dir_all(stripped.parent().expect("a file in a directory"))?;
    let mut debuglink = std::ffi::OsString::from("--add-gnu-debuglink=");
    debuglink.push(&debug);
    exec::run(
        Command::new(arch.objcopy).arg("--strip-debug").arg(debuglink).arg(binary).arg(&stripped),
    )?;
    Ok((stripped, debug))
}

/// `bytes` in KiB or, from 1 MiB on, in MiB.
fn size(bytes: u64) -> String {
    let (unit, name) = if bytes < 1 << 20 { (1 << 10, "KiB") } else { (1 << 20, "MiB") };
    format!("{:.1} {name}", bytes as f64 / f64::from(unit))
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

/// Strips, stages, packages and archives one architecture's binary, with
/// the completions and man pages `generate` wrote into `generated`.
fn package(
    arch: &'static Arch,
    binary: &Path,
    generated: &Path,
    dist: &Path,
) -> anyhow::Result<Built> {
    let version = env!("CARGO_PKG_VERSION");
    let (stripped, debug) = strip(arch, binary, dist)?;
    let glibc = glibc_floor(arch, &stripped)?;
    let stage = dist.join(format!("edgegate_{version}_{}", arch.debian));
    stage_files(&stripped, generated, &stage, &DEBIAN)?;
    let deb = deb::build(arch, &stage, &glibc, dist)?;
    let tarball = dist.join(format!("edgegate-{version}-{}-linux.tar.gz", arch.name));
    exec::run(
        Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .args(["--owner=0", "--group=0", "-C"])
            .arg(&stage)
            .args(["usr", "lib", "etc"]),
    )?;
    let rpm_stage = dist.join(format!("edgegate-{version}.{}-root", arch.name));
    stage_files(&stripped, generated, &rpm_stage, &RPM)?;
    let rpm = rpm::build(arch, &rpm_stage, &glibc, dist)?;
    let built_size = fs::metadata(binary)?.len();
    let packaged_size = fs::metadata(&stripped)?.len();
    Ok(Built { arch, glibc, deb, rpm, tarball, built_size, packaged_size, debug })
}

/// The packaged files, in a fresh tree at `stage` laid out as `layout`
/// says, with their modes.
fn stage_files(
    binary: &Path,
    generated: &Path,
    stage: &Path,
    layout: &Layout,
) -> anyhow::Result<()> {
    let root = exec::workspace_root();
    let _ = fs::remove_dir_all(stage);
    let unit = format!("{}/edgegate.service", layout.units);
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
    for (shell, path) in layout.completions {
        install(&generated.join("completions").join(shell), &stage.join(path), 0o644)?;
    }
    for page in files_ending(&generated.join("man"), ".1.gz")? {
        let name = page.file_name().expect("a file");
        install(&page, &stage.join(MAN_PAGES).join(name), 0o644)?;
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
    if built.arch.is_host() {
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
    no_test_hooks(built, root)?;
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

/// The shipped binary has none of the test hooks: each flag is refused as
/// unknown, and the escape attempts' code is not in the binary.
fn no_test_hooks(built: &Built, root: &Path) -> anyhow::Result<()> {
    for hook in [
        &["run", "--worker-escape", "exec-shell"][..],
        &["run", "--keys-in-worker"],
        &["worker", "--channel-fd", "3", "--escape", "exec-shell"],
    ] {
        let output = exec::output(installed(built, root).args(hook))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() != Some(2) || !stderr.contains("unexpected argument") {
            bail!(
                "the packaged binary does not refuse `edgegate {}` as unknown ({}): {stderr}",
                hook.join(" "),
                output.status
            );
        }
    }
    let binary = fs::read(root.join("usr/bin/edgegate"))?;
    let text = b"escape attempt";
    if binary.windows(text.len()).any(|window| window == text) {
        bail!("the packaged binary holds the escape attempts' code (\"escape attempt\")");
    }
    println!(
        "dist: {}: no test hooks (--worker-escape, --keys-in-worker refused)",
        built.arch.rust_target
    );
    Ok(())
}

/// Shows and checks, as installed into `root`, what `dist` adds to cargo's
/// binary, each with its size: the binary stripped of its debug info and
/// linked to it; every completion script, parsed by its shell; every man
/// page `generate` wrote, titled for its file and rendered by man without a
/// warning.
fn check_extras(built: &Built, root: &Path, layout: &Layout, dist: &Path) -> anyhow::Result<()> {
    println!("installed into {}:", root.display());
    let binary = root.join("usr/bin/edgegate");
    let binary_len =
        fs::metadata(&binary).with_context(|| format!("cannot read {}", binary.display()))?.len();
    let packaged = sections(built.arch, &binary)?;
    // Not `.debug_gdb_scripts`, which is no debug info but loaded data (it
    // names the Rust pretty-printers for gdb).
    let debug_info: Vec<_> = packaged
        .iter()
        .filter(|name| name.starts_with(".debug_") && *name != ".debug_gdb_scripts")
        .collect();
    if !debug_info.is_empty() {
        bail!("{} still holds debug info: {debug_info:?}", binary.display());
    }
    if !packaged.iter().any(|name| name == ".gnu_debuglink") {
        bail!("{} does not name its debug info file (.gnu_debuglink)", binary.display());
    }
    if !sections(built.arch, &built.debug)?.iter().any(|name| name == ".debug_line") {
        bail!("{} holds no line tables", built.debug.display());
    }
    let debug = built.debug.file_name().expect("a file").to_string_lossy();
    println!("  /usr/bin/edgegate: {} (stripped; debug info in {debug})", size(binary_len));

    for (shell, path) in layout.completions {
        let script = root.join(path);
        let parse_only = if shell == "fish" { "--no-execute" } else { "-n" };
        exec::run(Command::new(shell).arg(parse_only).arg(&script))?;
        show(root, &script)?;
    }

    let pages = files_ending(&root.join(MAN_PAGES), ".1.gz")?;
    let names = |pages: &[PathBuf]| -> Vec<_> {
        pages.iter().filter_map(|page| page.file_name().map(ToOwned::to_owned)).collect()
    };
    // All of them, edgegate.1 among them (`generate` makes sure).
    let generated = files_ending(&dist.join(GENERATED).join("man"), ".1.gz")?;
    if names(&pages) != names(&generated) {
        bail!(
            "{} holds {:?}, not the pages generated: {:?}",
            MAN_PAGES,
            names(&pages),
            names(&generated)
        );
    }
    for page in &pages {
        let name = page.file_name().expect("a file").to_string_lossy();
        let title = format!(".TH {} 1 ", name.trim_end_matches(".1.gz"));
        let roff = exec::output(Command::new("gzip").arg("-dc").arg(page))?;
        if !roff.status.success() || !String::from_utf8_lossy(&roff.stdout).contains(&title) {
            bail!("{} is no man page (no `{}` line)", page.display(), title.trim_end());
        }
        // As lintian renders pages: groff's warnings go to stderr, the
        // exit status says nothing of them.
        let rendered = exec::output(
            Command::new("man")
                .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
                .arg(page)
                .envs([("LC_ALL", "C.UTF-8"), ("MANROFFSEQ", ""), ("MANWIDTH", "80")]),
        )?;
        if !rendered.status.success() || !rendered.stderr.is_empty() {
            bail!(
                "man cannot render {} cleanly ({}): {}",
                page.display(),
                rendered.status,
                String::from_utf8_lossy(&rendered.stderr)
            );
        }
    }
    let total: u64 =
        pages.iter().map(|page| Ok(fs::metadata(page)?.len())).sum::<anyhow::Result<_>>()?;
    println!(
        "  /{MAN_PAGES}: {} pages, {} in all, rendered without warnings",
        pages.len(),
        size(total)
    );
    Ok(())
}

/// The names of `file`'s sections, as `arch`'s objdump reads them.
fn sections(arch: &Arch, file: &Path) -> anyhow::Result<Vec<String>> {
    let output = exec::output(Command::new(arch.objdump).arg("-h").arg(file))?;
    if !output.status.success() {
        bail!("{} -h {} failed: {}", arch.objdump, file.display(), output.status);
    }
    // Each section's line: its index, its name, then sizes and addresses.
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.next()?.parse::<u32>().ok()?;
            words.next().map(str::to_owned)
        })
        .collect())
}

/// Prints the path of a file installed into `root`, and its size.
fn show(root: &Path, file: &Path) -> anyhow::Result<()> {
    let len = fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?.len();
    let installed = file.strip_prefix(root).expect("a file in the root");
    println!("  /{}: {}", installed.display(), size(len));
    Ok(())
}
