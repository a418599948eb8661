//! `cargo xtask integration-test --vm`: the integration suite on the kernels
//! EC2 images run, each booted with QEMU (KVM when available, else TCG), on
//! x86_64 and on aarch64 (Graviton), whose binaries are cross-built like the
//! packages.
//!
//! For each kernel: fetch Debian's cloud kernel package with `apt-get
//! download` (through a private apt configuration under `target/vm/`, so the
//! host's sources are not touched), pack the test binaries, the daemon, `ip`,
//! `nsenter` and their shared libraries with a busybox init into an
//! initramfs, boot it, stream the console, and judge the result lines. A run
//! fails if any test fails, the kernel panics, or no final line arrives.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use std::os::unix::fs::PermissionsExt as _;

use anyhow::{Context as _, bail};

use crate::{
    arch::{self, Arch},
    cross, exec,
};

/// Kernels tested by default: Debian 12's cloud kernel and the backports one.
pub const DEFAULT_KERNELS: [&str; 2] = ["6.1", "6.12"];

/// A guest: how QEMU runs an architecture, and what runs there.
pub struct Guest {
    pub arch: &'static Arch,
    /// The QEMU system emulator, and its Debian package.
    qemu: (&'static str, &'static str),
    /// QEMU's machine and CPU under TCG.
    tcg: &'static [&'static str],
    /// The serial console the kernel writes to.
    console: &'static str,
    /// The test suites run there.
    suites: &'static [&'static str],
}

pub const X86_64: Guest = Guest {
    arch: &arch::X86_64,
    qemu: ("qemu-system-x86_64", "qemu-system-x86"),
    // No cmpxchg16b under TCG: QEMU 7.2 (Debian 12) mis-emulates it and the
    // 6.12 kernel double-faults in the slab allocator; without the feature
    // the kernel takes its fallback path.
    tcg: &["-cpu", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,-cx16"],
    console: "ttyS0",
    suites: &["xdp_verdicts", "end_to_end", "worker"],
};

pub const AARCH64: Guest = Guest {
    arch: &arch::AARCH64,
    qemu: ("qemu-system-aarch64", "qemu-system-arm"),
    // Graviton 2's core, on QEMU's generic board (a PL011 console, which
    // Debian's arm64 cloud kernel drives).
    tcg: &["-M", "virt", "-cpu", "neoverse-n1"],
    console: "ttyAMA0",
    // The program's verdicts and attachment. Not the worker suite: under
    // this emulation a TLS handshake takes 5-10 s, past its bounds.
    suites: &["xdp_verdicts", "end_to_end"],
};

impl Guest {
    pub fn named(name: &str) -> Option<&'static Guest> {
        [&X86_64, &AARCH64].into_iter().find(|guest| guest.arch.name == name)
    }
}

/// The end-to-end tests that run in the VM: attach native and skb, allowed and
/// blocked TCP across namespaces, daemon stop/start with pins.
const END_TO_END: [&str; 5] = [
    "allowed_client_connects_and_unlisted_client_is_dropped_at_xdp",
    "a_layer_three_interface_is_filtered_by_source",
    "skb_mode_filters_as_well",
    "filtering_survives_kill_9_and_a_restart_adopts_the_same_list",
    "sigterm_leaves_the_filter_pinned_until_detach",
];

/// The one test the harness's self-test runs: it loads the program (which
/// every verifier must then reject); the rest of the suite would only fail
/// the same way, at length.
const SELF_TEST: [&str; 1] = ["allowed_denied_and_unlisted_sources_ipv4"];

/// The worker tests that run in the VM: its egress filter, which must hold on
/// kernels whose Landlock has no network rules (6.1).
const WORKER: [&str; 2] = [
    "the_worker_connects_to_its_backends_and_nowhere_else",
    "a_reload_that_moves_the_backend_moves_the_permission",
];

/// Commands every VM run uses, and the Debian packages they come from.
const TOOLS: [(&str, &str); 2] = [("cpio", "cpio"), ("xz", "xz-utils")];

/// What a guest of the host's architecture takes from the host: its init's
/// busybox and the tests' `ip` and `nsenter`.
const HOST_USERLAND: [(&str, &str); 3] =
    [("busybox", "busybox-static"), ("ip", "iproute2"), ("nsenter", "util-linux")];

/// A foreign guest's userland, from Debian 12 (whose glibc the cross
/// toolchain links against): busybox, `ip`, `nsenter`, and every library
/// they and the Rust binaries load. A library missing here fails the run
/// when the initramfs is packed, naming it.
const FOREIGN_USERLAND: [&str; 15] = [
    "busybox-static",
    "iproute2",
    "util-linux",
    "libc6",
    "libgcc-s1",
    "libbpf1",
    "libbsd0",
    "libmd0",
    "libcap2",
    "libelf1",
    "libmnl0",
    "libpcre2-8-0",
    "libselinux1",
    "zlib1g",
    "libzstd1",
];

/// The Debian suite a foreign guest's userland comes from.
const FOREIGN_USERLAND_SUITE: &str = "bookworm";

/// A whole VM run may take this long (TCG is slow; a hung kernel must not hang CI).
const VM_TIMEOUT: Duration = Duration::from_secs(900);

/// Set once KVM failed a boot in this process: every later boot goes
/// straight to TCG instead of waiting for KVM to fail again.
static KVM_UNUSABLE: AtomicBool = AtomicBool::new(false);

/// Where a kernel comes from.
enum KernelSource {
    /// A Debian suite whose cloud kernel (`linux-image-cloud-<arch>`) to use.
    Debian { suite: &'static str },
    /// A kernel package file, or a vmlinuz (with no modules: veth and tun built in).
    Path(PathBuf),
}

fn kernel_source(spec: &str) -> KernelSource {
    match spec {
        "6.1" => KernelSource::Debian { suite: "bookworm" },
        "6.12" => KernelSource::Debian { suite: "bookworm-backports" },
        path => KernelSource::Path(PathBuf::from(path)),
    }
}

/// A kernel ready to boot.
struct Kernel {
    name: String,
    vmlinuz: PathBuf,
    /// Plain (uncompressed) modules the init loads (in name order).
    modules: Vec<PathBuf>,
}

/// Modules the tests need that Debian builds as modules: veth pairs, and
/// the TUN device of the layer-3 end-to-end test.
const MODULES: [&str; 2] = ["veth", "tun"];

/// Builds the binaries for `arch` once, then runs the suite on each kernel.
/// With `broken_program`, the XDP program is built with an unchecked packet
/// read that every verifier rejects, and every run must fail: the
/// harness's self-test.
pub fn run(guest: &Guest, kernels: &[String], broken_program: bool) -> anyhow::Result<()> {
    let expect_failure = broken_program;
    exec::install_missing("vm", &TOOLS)?;
    exec::install_missing("vm", &[guest.qemu])?;
    let arch = guest.arch;
    let work = exec::workspace_root().join("target/vm");
    fs::create_dir_all(work.join("cache"))?;
    let userland = if arch.is_host() {
        exec::install_missing("vm", &HOST_USERLAND)?;
        Userland::Host
    } else {
        cross::prepare("vm")?;
        // qemu-user runs the guest's loader to list a binary's libraries.
        exec::install_missing("vm", &[("qemu-aarch64", "qemu-user")])?;
        Userland::unpack(&work, arch)?
    };
    let binaries = build_binaries(guest, broken_program)?;
    let mut guests = Vec::new();
    for spec in kernels {
        let kernel = fetch_kernel(&work, arch, spec)?;
        let initramfs = pack(&work, &kernel, &binaries, &userland)?;
        guests.push((kernel, initramfs));
    }
    // Under TCG a guest runs on one host thread: the kernels boot side by
    // side, as many at once as the host has cores (their consoles are
    // labelled with the kernel's name).
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut failures = Vec::new();
    for batch in guests.chunks(cores) {
        let outcomes: Vec<Result<(), Boot>> = std::thread::scope(|scope| {
            let runs: Vec<_> = batch
                .iter()
                .map(|(kernel, initramfs)| scope.spawn(move || boot_once(guest, kernel, initramfs)))
                .collect();
            runs.into_iter().map(|run| run.join().expect("a VM's thread panicked")).collect()
        });
        for ((kernel, _), outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok(()) => println!("vm: {}: all tests passed", kernel.name),
                // The self-test counts only failures caused by the verifier.
                Err(Boot::Failed { message, verifier_rejected })
                    if !expect_failure || verifier_rejected =>
                {
                    println!("vm: {}: {message}", kernel.name);
                    failures.push(kernel.name.clone());
                }
                Err(e) => println!("vm: {}: {e} (not a verifier rejection)", kernel.name),
            }
        }
    }
    match (expect_failure, failures.len()) {
        (false, 0) => Ok(()),
        (false, _) => bail!("VM tests failed on: {}", failures.join(", ")),
        (true, n) if n == kernels.len() => {
            println!("vm: the broken program failed every kernel, as it must");
            Ok(())
        }
        (true, _) => {
            bail!("the deliberately broken program passed a VM run: the harness cannot fail")
        }
    }
}

/// The binaries the initramfs carries.
struct Binaries {
    edgegate: PathBuf,
    tests: Vec<(String, PathBuf)>,
    /// Built with the program every verifier rejects: the self-test.
    broken_program: bool,
}

fn build_binaries(guest: &Guest, broken_program: bool) -> anyhow::Result<Binaries> {
    // The host's binaries are the ones the other tests use (no --target,
    // so they share target/debug). A foreign guest's are cross-built with
    // the release profile: translated instruction by instruction, debug
    // code (aws-lc's C is then built at -O0 too) takes over 10 s for a TLS
    // handshake, past the tests' bounds; and the daemon is then the one
    // the packages ship, built once for both.
    let target: &[&str] =
        if guest.arch.is_host() { &[] } else { &["--release", "--target", guest.arch.rust_target] };
    let cargo = |command: &[&str]| {
        let mut cargo = if guest.arch.is_host() { exec::cargo() } else { cross::cargo() };
        // proxy/build.rs passes these features to the XDP program's build.
        if broken_program {
            cargo.env("EDGEGATE_EBPF_FEATURES", "verifier-reject");
        } else {
            cargo.env_remove("EDGEGATE_EBPF_FEATURES");
        }
        cargo.args(command).args(target);
        cargo
    };
    // The host's daemon has the test hooks the worker suite uses; a foreign
    // guest's is the one the packages ship (its suites need none).
    let hooks = if guest.arch.is_host() { exec::Hooks::On } else { exec::Hooks::Off };
    let mut daemon = cargo(&["build", "--package", "edgegate", "--bin", "edgegate"]);
    exec::run(daemon.args(hooks.features()))?;
    // The self-test needs one suite that loads the program: the verdicts.
    let suites = if broken_program { &["xdp_verdicts"] } else { guest.suites };
    let mut build =
        cargo(&["test", "--no-run", "--package", "edgegate-tests", "--message-format=json"]);
    build.args(hooks.features());
    for suite in suites {
        build.args(["--test", suite]);
    }
    let output = exec::output(&mut build)?;
    if !output.status.success() {
        bail!("building the test binaries failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let mut tests = Vec::new();
    for line in String::from_utf8(output.stdout)?.lines() {
        let message: serde_json::Value = serde_json::from_str(line)?;
        if message["reason"] == "compiler-artifact"
            && message["target"]["kind"][0] == "test"
            && let Some(executable) = message["executable"].as_str()
        {
            let name = message["target"]["name"].as_str().unwrap_or_default().to_owned();
            tests.push((name, PathBuf::from(executable)));
        }
    }
    let target_dir = exec::workspace_root().join("target");
    let edgegate = if guest.arch.is_host() {
        target_dir.join("debug/edgegate")
    } else {
        target_dir.join(guest.arch.rust_target).join("release/edgegate")
    };
    Ok(Binaries { edgegate, tests, broken_program })
}

/// Where the guest's programs and shared libraries come from.
enum Userland {
    /// This host's own: the guest has the host's architecture.
    Host,
    /// Debian's packages for the guest's architecture, unpacked at `root`.
    Unpacked { root: PathBuf, loader: &'static str },
}

impl Userland {
    /// Downloads (once) and unpacks a foreign guest's packages.
    fn unpack(work: &Path, arch: &Arch) -> anyhow::Result<Userland> {
        let packages = download(work, FOREIGN_USERLAND_SUITE, arch, &FOREIGN_USERLAND)?;
        let root = work.join(format!("userland-{}", arch.debian));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        for package in packages {
            exec::run(Command::new("dpkg-deb").arg("-x").arg(package).arg(&root))?;
        }
        Ok(Userland::Unpacked { root, loader: arch.loader })
    }

    /// A program by name, as a path on this host.
    fn program(&self, name: &str) -> anyhow::Result<PathBuf> {
        match self {
            Userland::Host => {
                let output = exec::output(Command::new("which").arg(name))?;
                Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
            }
            Userland::Unpacked { root, .. } => ["bin", "sbin", "usr/bin", "usr/sbin"]
                .iter()
                .map(|dir| root.join(dir).join(name))
                .find(|path| path.exists())
                .with_context(|| {
                    format!("no {name} in the packages unpacked at {}", root.display())
                }),
        }
    }

    /// The guest paths of the shared libraries `binary` loads, its loader
    /// among them: `ldd`, or the guest's loader under qemu-user.
    fn libraries(&self, binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let output = match self {
            Userland::Host => exec::output(Command::new("ldd").arg(binary))?,
            Userland::Unpacked { root, loader } => exec::output(
                Command::new("qemu-aarch64")
                    .arg("-L")
                    .arg(root)
                    .arg(self.file(Path::new(loader)))
                    .arg("--list")
                    .arg(binary),
            )?,
        };
        let listing = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || listing.contains("not found") {
            bail!("the libraries of {} cannot all be found: {listing}", binary.display());
        }
        // `name => /guest/path (address)`, or `/loader/path ...` for the loader.
        Ok(listing
            .lines()
            .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')))
            .map(PathBuf::from)
            .collect())
    }

    /// Where a guest path is on this host.
    fn file(&self, guest: &Path) -> PathBuf {
        match self {
            Userland::Host => guest.to_owned(),
            Userland::Unpacked { root, .. } => root.join(guest.strip_prefix("/").unwrap_or(guest)),
        }
    }
}

/// Private apt state for one suite and architecture, under `work`.
fn apt(
    work: &Path,
    suite: &str,
    arch: &Arch,
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    let dir = work.join(format!("apt-{suite}-{}", arch.debian));
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::write(
        dir.join("sources.list"),
        format!("deb http://deb.debian.org/debian {suite} main\n"),
    )?;
    let mut command = Command::new(args[0]);
    command
        .arg(format!("-oDir::Etc::SourceList={}", dir.join("sources.list").display()))
        .arg("-oDir::Etc::SourceParts=/dev/null")
        .arg(format!("-oDir::State::Lists={}", dir.join("lists").display()))
        .arg(format!("-oAPT::Architecture={}", arch.debian))
        .arg(format!("-oAPT::Architectures={}", arch.debian))
        .args(&args[1..])
        .current_dir(work.join("cache"));
    exec::output(&mut command)
}

/// The package file of `package` for `arch` in the download cache.
fn cached(work: &Path, package: &str, arch: &Arch) -> anyhow::Result<Option<PathBuf>> {
    let (prefix, suffix) = (format!("{package}_"), format!("_{}.deb", arch.debian));
    Ok(fs::read_dir(work.join("cache"))?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with(&prefix) && n.ends_with(&suffix)
        })
    }))
}

/// The package files of `packages` for `arch` from `suite`, downloaded into
/// the cache where they are not there yet.
fn download(
    work: &Path,
    suite: &str,
    arch: &Arch,
    packages: &[&str],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    for package in packages {
        if cached(work, package, arch)?.is_none() {
            missing.push(*package);
        }
    }
    if !missing.is_empty() {
        let update = apt(work, suite, arch, &["apt-get", "-q", "update"])?;
        if !update.status.success() {
            bail!("apt-get update for {suite}: {}", String::from_utf8_lossy(&update.stderr));
        }
        println!("vm: downloading {} for {}", missing.join(" "), arch.debian);
        let mut args = vec!["apt-get", "-q", "download"];
        args.extend(&missing);
        let fetched = apt(work, suite, arch, &args)?;
        if !fetched.status.success() {
            bail!("apt-get download from {suite}: {}", String::from_utf8_lossy(&fetched.stderr));
        }
    }
    packages
        .iter()
        .map(|package| {
            cached(work, package, arch)?
                .with_context(|| format!("{package} is not in the download cache"))
        })
        .collect()
}

fn fetch_kernel(work: &Path, arch: &Arch, spec: &str) -> anyhow::Result<Kernel> {
    let package = match kernel_source(spec) {
        KernelSource::Path(path) if path.extension().is_some_and(|e| e == "deb") => path,
        KernelSource::Path(vmlinuz) => {
            let name =
                vmlinuz.file_name().map_or("kernel".into(), |n| n.to_string_lossy().into_owned());
            return Ok(Kernel { name, vmlinuz, modules: Vec::new() });
        }
        KernelSource::Debian { suite } => {
            let update = apt(work, suite, arch, &["apt-get", "-q", "update"])?;
            if !update.status.success() {
                bail!("apt-get update for {suite}: {}", String::from_utf8_lossy(&update.stderr));
            }
            // The metapackage names the current image package.
            let metapackage = format!("linux-image-cloud-{}", arch.debian);
            let depends = apt(work, suite, arch, &["apt-cache", "depends", &metapackage])?;
            let text = String::from_utf8(depends.stdout)?;
            let image = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("Depends: "))
                .filter(|p| p.starts_with("linux-image-"))
                .with_context(|| format!("no cloud kernel in {suite}: {text}"))?
                .to_owned();
            let [package] = &download(work, suite, arch, &[&image])?[..] else {
                unreachable!("one package asked for")
            };
            package.clone()
        }
    };
    let stem = package.file_stem().map_or("kernel".into(), |s| s.to_string_lossy().into_owned());
    let extracted = work.join("kernels").join(&stem);
    if !extracted.exists() {
        fs::create_dir_all(&extracted)?;
        exec::run(Command::new("dpkg-deb").arg("-x").arg(&package).arg(&extracted))?;
    }
    let boot = extracted.join("boot");
    let vmlinuz = fs::read_dir(&boot)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz")))
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let modules = extracted.join("lib/modules");
    let modules = MODULES
        .iter()
        .map(|module| plain_module(&modules, module))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let name = stem.split('_').next().unwrap_or(&stem).to_owned();
    Ok(Kernel { name, vmlinuz, modules })
}

/// Module `name` from the tree at `modules`, uncompressed (busybox insmod
/// wants it plain); `None` where the kernel builds it in.
fn plain_module(modules: &Path, name: &str) -> anyhow::Result<Option<PathBuf>> {
    if let Some(module) = find_file(modules, &format!("{name}.ko")) {
        return Ok(Some(module));
    }
    let Some(compressed) = find_file(modules, &format!("{name}.ko.xz")) else {
        return Ok(None);
    };
    let plain = compressed.with_extension("");
    let script = format!("xz -dc '{}' > '{}'", compressed.display(), plain.display());
    exec::run(Command::new("sh").arg("-c").arg(script))?;
    Ok(Some(plain))
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

/// The init: mount what the tests need, run them, print result lines, power off.
fn init_script(binaries: &Binaries) -> String {
    let mut script = String::from(
        "#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\nmount -t tmpfs run /run\nmount -t bpf bpf /sys/fs/bpf\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         for module in /modules/*.ko; do [ -f \"$module\" ] && insmod \"$module\"; done\n\
         echo \"EDGEGATE-VM-KERNEL $(cat /proc/sys/kernel/osrelease)\"\n\
         export EDGEGATE_BIN=/bin/edgegate PATH=/bin RUST_BACKTRACE=1\n",
    );
    for (name, _) in &binaries.tests {
        let filter = match name.as_str() {
            _ if binaries.broken_program => format!(" --exact {}", SELF_TEST.join(" ")),
            "end_to_end" => format!(" --exact {}", END_TO_END.join(" ")),
            "worker" => format!(" --exact {}", WORKER.join(" ")),
            _ => String::new(),
        };
        script.push_str(&format!(
            "/tests/{name} --test-threads=1{filter}; echo \"EDGEGATE-VM-RESULT {name} $?\"\n"
        ));
    }
    script.push_str("echo EDGEGATE-VM-DONE\npoweroff -f\n");
    script
}

fn pack(
    work: &Path,
    kernel: &Kernel,
    binaries: &Binaries,
    userland: &Userland,
) -> anyhow::Result<PathBuf> {
    let root = work.join("initramfs").join(&kernel.name);
    let _ = fs::remove_dir_all(&root);
    for dir in ["bin", "proc", "sys", "dev", "tmp", "run", "tests", "modules", "etc"] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::copy(userland.program("busybox")?, root.join("bin/busybox"))?;
    for applet in
        ["sh", "mount", "insmod", "poweroff", "cat", "echo", "mkdir", "sleep", "ls", "true"]
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    let mut dynamic = vec![
        (userland.program("ip")?, root.join("bin/ip")),
        (userland.program("nsenter")?, root.join("bin/nsenter")),
        (binaries.edgegate.clone(), root.join("bin/edgegate")),
    ];
    for (name, path) in &binaries.tests {
        dynamic.push((path.clone(), root.join("tests").join(name)));
    }
    let mut libraries = BTreeSet::new();
    for (from, to) in &dynamic {
        fs::copy(from, to).with_context(|| format!("copy {}", from.display()))?;
        libraries.extend(userland.libraries(from)?);
    }
    for library in libraries {
        let target = root.join(library.strip_prefix("/").expect("absolute"));
        fs::create_dir_all(target.parent().expect("a directory"))?;
        let source = userland.file(&library);
        fs::copy(&source, &target).with_context(|| format!("copy {}", source.display()))?;
    }
    for module in &kernel.modules {
        let name = module.file_name().context("a module file")?;
        fs::copy(module, root.join("modules").join(name))?;
    }
    let init = root.join("init");
    fs::write(&init, init_script(binaries))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let image = work.join(format!("{}.initramfs.gz", kernel.name));
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        root.display(),
        image.display()
    );
    exec::run(Command::new("sh").arg("-c").arg(script))?;
    Ok(image)
}

/// Why a VM run failed.
#[derive(Debug, thiserror::Error)]
enum Boot {
    #[error("the kernel never printed anything")]
    NeverStarted,
    /// QEMU reported that KVM cannot run the guest, or the guest stalled under KVM.
    #[error("KVM failed: {detail}")]
    KvmFailed { detail: String },
    #[error("{message}")]
    Failed {
        message: String,
        /// The console showed the kernel refusing the XDP program.
        verifier_rejected: bool,
    },
}

/// How long a VM run may take, and may go without printing anything.
#[derive(Clone, Copy)]
struct Limits {
    /// TCG is slow; a hung kernel must not hang CI.
    total: Duration,
    /// Only enforced under KVM, where every test prints within seconds: a
    /// guest that KVM stopped without a word must not wait for `total`.
    silence: Option<Duration>,
    /// Under KVM the kernel reaches the init within seconds; where KVM is
    /// present but faults, nothing ever comes.
    first_output: Option<Duration>,
}

const TCG_LIMITS: Limits = Limits { total: VM_TIMEOUT, silence: None, first_output: None };
const KVM_LIMITS: Limits = Limits {
    total: VM_TIMEOUT,
    silence: Some(Duration::from_secs(60)),
    first_output: Some(Duration::from_secs(20)),
};

/// Boots `kernel` under KVM when it works. Where KVM is present but broken,
/// the kernel never starts, or it starts and QEMU then stops on an
/// emulation failure (nested virtualisation): that kernel reruns under
/// TCG, and the rest run there too.
fn boot_once(guest: &Guest, kernel: &Kernel, initramfs: &Path) -> Result<(), Boot> {
    println!("vm: booting {} ({})", kernel.name, kernel.vmlinuz.display());
    let kvm = guest.arch.is_host()
        && Path::new("/dev/kvm").exists()
        && !KVM_UNUSABLE.load(Ordering::Relaxed);
    match boot(guest, kernel, initramfs, kvm) {
        Err(e @ (Boot::NeverStarted | Boot::KvmFailed { .. })) if kvm => {
            println!("vm: {e}; rerunning {} under TCG, and the rest too", kernel.name);
            KVM_UNUSABLE.store(true, Ordering::Relaxed);
            boot(guest, kernel, initramfs, false)
        }
        outcome => outcome,
    }
}

/// Boots the kernel, streams the console, and judges it.
fn boot(guest: &Guest, kernel: &Kernel, initramfs: &Path, kvm: bool) -> Result<(), Boot> {
    let mut qemu = Command::new(guest.qemu.0);
    if kvm {
        qemu.args(["-accel", "kvm", "-cpu", "host", "-smp", "2"]);
    } else {
        // One vCPU: TCG's single thread.
        qemu.args(["-accel", "tcg,thread=single", "-smp", "1"]).args(guest.tcg);
    }
    let child = qemu
        .args(["-m", "2048"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!("console={} panic=-1 quiet", guest.console))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Boot::Failed {
            message: format!("cannot start {}: {e}", guest.qemu.0),
            verifier_rejected: false,
        })?;
    let started = Instant::now();
    watch(child, if kvm { KVM_LIMITS } else { TCG_LIMITS }, &kernel.name)?;
    println!("vm: {} in {:?}", kernel.name, started.elapsed());
    Ok(())
}

/// What stopped a VM before its console ended by itself.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Silent,
    KvmError,
}

/// Whether a line QEMU writes to stderr says KVM stopped the guest: QEMU
/// then pauses it and waits forever, so the run must be ended at once.
fn is_kvm_failure(line: &str) -> bool {
    line.contains("KVM internal error") || line.contains("emulation failure")
}

/// Whether a console line shows the kernel's verifier refusing the XDP
/// program: the daemon's message, or a test's load error carrying the
/// verifier's log (which only a rejection has).
fn is_verifier_rejection(line: &str) -> bool {
    line.contains("the kernel refused the XDP program")
        || (line.contains("LoadError") && line.contains("verifier_log:"))
}

/// Streams the console of a started QEMU, stops it when `limits` are
/// exceeded or KVM fails, and judges the result lines.
fn watch(mut child: std::process::Child, limits: Limits, label: &str) -> Result<(), Boot> {
    use std::sync::{Arc, Mutex};
    let failed = |message: String| Boot::Failed { message, verifier_rejected: false };
    let started = Instant::now();
    let pid = child.id();
    // None until the guest prints its first line.
    let last_output: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let stop: Arc<Mutex<Option<(Stop, String)>>> = Arc::new(Mutex::new(None));
    let kill = {
        let stop = Arc::clone(&stop);
        move |why: Stop, detail: String| {
            let mut stop = stop.lock().expect("stop lock");
            if stop.is_none() {
                *stop = Some((why, detail));
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    };
    let stderr = child.stderr.take().expect("piped");
    let stderr_reader = {
        let kill = kill.clone();
        let label = label.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap_or_default();
                eprintln!("  {label} ! {line}");
                if is_kvm_failure(&line) {
                    kill(Stop::KvmError, line);
                }
            }
        })
    };
    // Enforce the limits from a watchdog thread: reading blocks.
    let watchdog = {
        let last_output = Arc::clone(&last_output);
        std::thread::spawn(move || {
            while Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(Duration::from_millis(200));
                let (quiet, limit) = match *last_output.lock().expect("output lock") {
                    Some(line) => (line.elapsed(), limits.silence),
                    None => (started.elapsed(), limits.first_output),
                };
                if started.elapsed() > limits.total {
                    kill(Stop::TimedOut, format!("no result within {:?}", limits.total));
                } else if let Some(silence) = limit.filter(|s| quiet > *s) {
                    kill(Stop::Silent, format!("the guest printed nothing for {silence:?}"));
                }
            }
        })
    };
    let console = child.stdout.take().expect("piped");
    let (mut results, mut done, mut panicked, mut started_kernel) =
        (Vec::new(), false, false, false);
    let mut verifier_rejected = false;
    for line in BufReader::new(console).lines() {
        let line = line.unwrap_or_default();
        *last_output.lock().expect("output lock") = Some(Instant::now());
        println!("  {label} | {line}");
        started_kernel |= line.contains("EDGEGATE-VM-KERNEL") || line.contains("Linux version");
        verifier_rejected |= is_verifier_rejection(&line);
        if let Some(result) = line.strip_prefix("EDGEGATE-VM-RESULT ") {
            results.push(result.to_owned());
        }
        done |= line.contains("EDGEGATE-VM-DONE");
        panicked |= line.contains("Kernel panic");
    }
    let _ = child.wait();
    let _ = watchdog.join();
    let _ = stderr_reader.join();
    match stop.lock().expect("stop lock").take() {
        Some((Stop::KvmError | Stop::Silent, detail)) => return Err(Boot::KvmFailed { detail }),
        Some((Stop::TimedOut, detail)) => return Err(failed(detail)),
        None => {}
    }
    if !started_kernel {
        return Err(Boot::NeverStarted);
    }
    if panicked {
        return Err(failed("the kernel panicked".into()));
    }
    if !done {
        return Err(failed("the VM stopped before reporting (see the console above)".into()));
    }
    let failing: Vec<&String> = results.iter().filter(|r| !r.ends_with(" 0")).collect();
    if results.is_empty() || !failing.is_empty() {
        let message = format!("failing suites: {failing:?} (of {results:?})");
        return Err(Boot::Failed { message, verifier_rejected });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for QEMU: prints `stdout` on the console and `stderr` on
    /// its stderr, then hangs as a paused guest does.
    fn fake_qemu(stdout: &str, stderr: &str) -> std::process::Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!("printf '{stdout}'; printf '{stderr}' >&2; exec sleep 600"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh")
    }

    const LIMITS: Limits = Limits {
        total: Duration::from_secs(120),
        silence: Some(Duration::from_secs(60)),
        first_output: Some(Duration::from_secs(60)),
    };

    #[test]
    fn a_kvm_internal_error_ends_the_run_at_once() {
        let started = Instant::now();
        let child = fake_qemu(
            "Linux version 6.12.0\\nEDGEGATE-VM-KERNEL 6.12.0\\n",
            "KVM internal error. Suberror: 1\\nextra data[0]: 0x0\\nemulation failure\\n",
        );
        let outcome = watch(child, LIMITS, "test");
        assert!(
            matches!(&outcome, Err(Boot::KvmFailed { detail }) if detail.contains("KVM internal error")),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    /// A guest printing `console` and then nothing is stopped as a KVM
    /// failure within seconds under `limits`, not at the total bound.
    fn assert_silence_stops(console: &str, limits: Limits) {
        let started = Instant::now();
        let outcome = watch(fake_qemu(console, ""), limits, "test");
        assert!(matches!(&outcome, Err(Boot::KvmFailed { detail }) if detail.contains("nothing")));
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    #[test]
    fn a_guest_silent_under_kvm_ends_the_run_after_the_silence_bound() {
        let limits = Limits { silence: Some(Duration::from_secs(2)), ..LIMITS };
        assert_silence_stops("Linux version 6.1.0\\n", limits);
    }

    #[test]
    fn a_guest_that_never_prints_under_kvm_ends_after_the_first_output_bound() {
        let limits = Limits { first_output: Some(Duration::from_secs(2)), ..LIMITS };
        assert_silence_stops("", limits);
    }

    /// `--exact` with a name no test has runs nothing and passes: every name
    /// the guest runs is a test of its suite.
    #[test]
    fn every_test_the_guest_runs_by_name_exists() {
        let suites = [
            (include_str!("../../tests/tests/end_to_end.rs"), &END_TO_END[..]),
            (include_str!("../../tests/tests/worker.rs"), &WORKER[..]),
            (include_str!("../../tests/tests/xdp_verdicts.rs"), &SELF_TEST[..]),
        ];
        for (source, names) in suites {
            for name in names {
                assert!(source.contains(&format!("#[test]\nfn {name}()")), "no test {name}");
            }
        }
    }

    #[test]
    fn a_verifier_rejection_is_told_from_other_failures() {
        let verdict_suite = "  | load the XDP program: Verify(LoadError { io_error: Os { code: 13, \
                             kind: PermissionDenied, message: \"Permission denied\" }, \
                             verifier_log: 0: R1=ctx() R10=fp0";
        assert!(is_verifier_rejection(verdict_suite));
        assert!(is_verifier_rejection("edgegate: the kernel refused the XDP program: ..."));
        assert!(!is_verifier_rejection("load the XDP program: Io(NotFound)"));
        assert!(!is_verifier_rejection("thread 'main' panicked at tests/src/harness.rs:69:67"));
    }

    #[test]
    fn a_run_past_its_total_limit_fails_without_a_retry() {
        let limits = Limits { total: Duration::from_secs(2), silence: None, first_output: None };
        let outcome = watch(fake_qemu("Linux version 6.1.0\\n", ""), limits, "test");
        assert!(
            matches!(&outcome, Err(Boot::Failed { message, .. }) if message.contains("no result"))
        );
    }

    #[test]
    fn a_complete_console_is_judged_by_its_result_lines() {
        let console =
            "Linux version 6.1.0\\nEDGEGATE-VM-RESULT xdp_verdicts 0\\nEDGEGATE-VM-DONE\\n";
        let print = |text: &str| {
            Command::new("printf")
                .arg(text)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("printf")
        };
        assert!(watch(print(console), LIMITS, "test").is_ok());
        let outcome = watch(print(&console.replace(" 0", " 101")), LIMITS, "test");
        assert!(
            matches!(&outcome, Err(Boot::Failed { message, .. }) if message.contains("failing suites")),
            "{outcome:?}"
        );
        let outcome = watch(print("EDGEGATE-VM-DONE\\n"), LIMITS, "test");
        assert!(matches!(outcome, Err(Boot::NeverStarted)), "{outcome:?}");
    }
}
