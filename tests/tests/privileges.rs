//! Least privilege, proven from `/proc`: the gate (uid 0) keeps seven
//! capabilities and no way to regain more; the proxy worker, which parses
//! every byte from the internet, runs as `daemon.user` with no capability in
//! any set, `no_new_privs`, seccomp, and no descriptor but stdio, its
//! socketpair and its sockets.

use std::os::unix::fs::MetadataExt as _;

use edgegate_tests::{
    mtls::{BackendMode, MtlsBed},
    testbed::Testbed,
};

/// CAP_DAC_OVERRIDE (1), CAP_KILL (5), CAP_SETGID (6), CAP_SETUID (7),
/// CAP_SETPCAP (8), CAP_NET_BIND_SERVICE (10), CAP_BPF (39).
const GATE: u64 = (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 10) | (1 << 39);
/// Where the gate takes a worker's transient uid from, with no `edgegate`
/// account (see `privileges::TRANSIENT_UIDS`).
const TRANSIENT_UIDS: std::ops::RangeInclusive<u32> = 60578..=61183;

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn mask(status: &str, set: &str) -> u64 {
    u64::from_str_radix(field(status, set), 16).expect("hex")
}

/// `/proc/<pid>/task/*/status`: every thread's.
fn threads(pid: u32) -> Vec<(std::path::PathBuf, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .map(|task| {
            let path = task.expect("task").path();
            let status = std::fs::read_to_string(path.join("status")).expect("status");
            (path, status)
        })
        .collect()
}

#[test]
fn the_gate_keeps_seven_capabilities_and_the_worker_none() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "");
    bed.testbed.start_daemon();
    // Serve traffic first, so that every thread has started.
    assert_eq!(bed.exchange(0, Some(&bed.client), b"before").expect("exchange"), b"before");
    let gate = bed.testbed.daemon_pid();
    let status = bed.testbed.status();
    assert_eq!(status.gate_pid, gate);
    let worker = status.worker.pid.expect("a worker serves");
    assert_ne!(worker, gate);
    // No `edgegate` account here: a uid of its own, used by no other process.
    let uid: u32 = status
        .worker
        .user
        .strip_prefix("transient uid ")
        .unwrap_or_else(|| panic!("{}", status.worker.user))
        .parse()
        .expect("a uid");
    assert!(TRANSIENT_UIDS.contains(&uid), "{uid}");
    assert!(nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).unwrap().is_none());
    let uid_text = uid.to_string();
    let sandbox = status.worker.sandbox.expect("the worker reports its sandbox");
    assert!(sandbox.seccomp, "{sandbox:?}");

    // Not dumpable: another process of the worker's own user can neither
    // read its memory nor attach to it.
    let as_worker_user = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
            .args(args)
            .output()
            .expect("run as the worker's user")
    };
    let memory = as_worker_user(&["dd", &format!("if=/proc/{worker}/mem"), "bs=1", "count=1"]);
    assert!(!memory.status.success(), "read the worker's memory");
    let environ = as_worker_user(&["cat", &format!("/proc/{worker}/environ")]);
    let refused = String::from_utf8_lossy(&environ.stderr);
    assert!(!environ.status.success() && refused.contains("Permission denied"), "{refused}");
    assert_eq!(std::fs::metadata(format!("/proc/{worker}/status")).expect("proc").uid(), 0);
    let attach = "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); \
                  sys.exit(0 if libc.ptrace(16, int(sys.argv[1]), 0, 0) == 0 else 1)";
    let ptrace = as_worker_user(&["/usr/bin/python3", "-c", attach, &worker.to_string()]);
    assert_eq!(ptrace.status.code(), Some(1), "PTRACE_ATTACH: {ptrace:?}");

    let gate_threads = threads(gate);
    assert!(gate_threads.len() > 1, "a multi-threaded gate");
    for (task, status) in &gate_threads {
        let task = task.display();
        assert_eq!(field(status, "Uid").split_whitespace().collect::<Vec<_>>(), ["0"; 4], "{task}");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(mask(status, set), GATE, "{task}: {set} {:#x}", mask(status, set));
        }
        assert_eq!(mask(status, "CapInh"), 0, "{task}");
        assert_eq!(mask(status, "CapAmb"), 0, "{task}");
        assert_eq!(field(status, "NoNewPrivs"), "1", "{task}");
    }

    let worker_threads = threads(worker);
    assert!(worker_threads.len() > 1, "the worker runs its connection threads");
    for (task, status) in &worker_threads {
        let task = task.display();
        let uids: Vec<&str> = field(status, "Uid").split_whitespace().collect();
        assert_eq!(uids, [uid_text.as_str(); 4], "{task}: real, effective, saved, fs uid");
        let gids: Vec<&str> = field(status, "Gid").split_whitespace().collect();
        assert_eq!(gids, [uid_text.as_str(); 4], "{task}");
        assert_eq!(field(status, "Groups"), "", "{task}: no supplementary groups");
        for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            assert_eq!(mask(status, set), 0, "{task}: {set}");
        }
        assert_eq!(field(status, "NoNewPrivs"), "1", "{task}");
        assert_eq!(field(status, "Seccomp"), "2", "{task}: seccomp filter mode");
    }

    assert_worker_descriptors(&bed.testbed, worker);
    // The gate holds the maps.
    let gate_fds: Vec<String> = std::fs::read_dir(format!("/proc/{gate}/fd"))
        .expect("fds")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    assert!(gate_fds.iter().any(|t| t == "anon_inode:bpf-map"), "{gate_fds:?}");

    // The gate still does its whole job: map updates and the list file,
    // reloads that re-read certificates (and reach the worker).
    let listed = bed.testbed.cli_ok(&["allow", "add", "198.51.100.7"]);
    assert!(listed.contains("1 added"), "{listed}");
    let persisted = std::fs::read_to_string(bed.testbed.allowlist_path()).expect("list");
    assert!(persisted.contains("198.51.100.7/32"), "{persisted}");
    let reloaded = bed.testbed.cli_ok(&["reload"]);
    assert!(reloaded.contains("listener `edge`: reloaded"), "{reloaded}");
    assert_eq!(bed.testbed.http_get("/readyz").0, 200);
    assert_eq!(bed.exchange(0, Some(&bed.client), b"after").expect("exchange"), b"after");
    let status = bed.testbed.cli_ok(&["status"]);
    assert!(
        status.contains(&format!("gate pid {gate}"))
            && status.contains(&format!("worker pid {worker}")),
        "{status}"
    );

    // The control socket stays root's: the worker's user cannot use it.
    let add_as_nobody = || {
        let output = as_worker_user(&[
            edgegate_tests::testbed::edgegate_binary().to_str().expect("UTF-8"),
            "--control-socket",
            bed.testbed.socket.to_str().expect("UTF-8"),
            "allow",
            "add",
            "0.0.0.0/0",
        ]);
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let message = add_as_nobody();
    assert!(message.contains("permission denied") && message.contains("root-only"), "{message}");

    // Even with the socket and its directory opened to everyone, the daemon
    // asks the kernel who connects (SO_PEERCRED) and refuses anyone but root.
    use std::os::unix::fs::PermissionsExt as _;
    let open = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    open(bed.testbed.socket.parent().expect("socket dir"), 0o755);
    open(&bed.testbed.socket, 0o666);
    let message = add_as_nobody();
    assert!(message.contains("permission denied") && message.contains("root only"), "{message}");
    let listed = bed.testbed.cli_ok(&["allow", "list"]);
    assert!(!listed.contains("0.0.0.0/0"), "{listed}");
}

/// The worker's descriptors: stdin (/dev/null), the pipe the gate relays
/// its log from, then sockets and the event loop's own; no BPF map, program
/// or link, no other file.
fn assert_worker_descriptors(testbed: &Testbed, worker: u32) {
    let links = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .collect()
    };
    let gate = links(testbed.daemon_pid());
    for fd in std::fs::read_dir(format!("/proc/{worker}/fd")).expect("fds") {
        let fd = fd.expect("fd").path();
        let target = std::fs::read_link(&fd).expect("link").to_string_lossy().into_owned();
        let number: u32 = fd.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let expected = match number {
            0 => target == "/dev/null",
            1 | 2 => target.starts_with("pipe:") && gate.contains(&target),
            _ => {
                target.starts_with("socket:")
                    || target == "anon_inode:[eventpoll]"
                    || target == "anon_inode:[eventfd]"
            }
        };
        assert!(expected, "worker fd {number} is {target}");
        assert!(!target.contains("bpf"), "worker fd {number} is {target}");
    }
}

/// Kernels before 5.11 have no `close_range(CLOSE_RANGE_CLOEXEC)`. With
/// the call failing as it does there (a seccomp filter answers ENOSYS),
/// the worker still gets no descriptor but its own, not even one the
/// daemon inherited without close-on-exec from whatever started it.
#[test]
fn without_close_range_the_worker_inherits_no_descriptor() {
    const INHERITED: i32 = 100;
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "");
    let rules = [(libc::SYS_close_range, vec![])].into_iter().collect();
    let no_close_range: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        std::env::consts::ARCH.try_into().expect("a seccomp architecture"),
    )
    .and_then(TryInto::try_into)
    .expect("filter");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let null_fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    bed.testbed.start_daemon_prepared(|command| {
        // SAFETY: between fork and exec only system calls, on memory
        // prepared before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(command, move || {
                // `dup2` leaves the copy without close-on-exec.
                if libc::dup2(null_fd, INHERITED) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                seccompiler::apply_filter(&no_close_range).map_err(std::io::Error::other)
            });
        }
    });
    let gate = bed.testbed.daemon_pid();
    let gate_status = std::fs::read_to_string(format!("/proc/{gate}/status")).expect("status");
    assert_eq!(field(&gate_status, "Seccomp"), "2", "the gate runs without close_range");
    let inherited = std::fs::read_link(format!("/proc/{gate}/fd/{INHERITED}"));
    assert_eq!(inherited.expect("the gate inherited it"), std::path::Path::new("/dev/null"));
    assert_eq!(bed.exchange(0, Some(&bed.client), b"served").expect("exchange"), b"served");
    let worker = bed.testbed.status().worker.pid.expect("a worker serves");
    assert_worker_descriptors(&bed.testbed, worker);
}

#[test]
fn an_unknown_root_or_shared_user_stops_the_start() {
    let bed = MtlsBed::new(BackendMode::Echo);
    // `daemon` (uid 1) exists on every Debian system; a process runs as it.
    let mut squatter = std::process::Command::new("setpriv")
        .args(["--reuid=daemon", "--regid=daemon", "--clear-groups", "sleep", "30"])
        .spawn()
        .expect("a process of user `daemon`");
    let squatter_pid = squatter.id();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let in_use = format!(
        "the proxy worker's account `daemon` (uid 1) is in use by pid {squatter_pid} (sleep)"
    );
    for (user, expected) in [
        ("no-such-edgegate-user", "`daemon.user`: no user `no-such-edgegate-user`"),
        ("root", "`daemon.user`: `root` has uid 0; the proxy worker never runs as root"),
        ("nobody", "`daemon.user`: `nobody` (uid 65534) is shared with other daemons"),
        ("daemon", in_use.as_str()),
    ] {
        bed.write("", &format!("user = \"{user}\""));
        let output = bed.testbed.refused_start(&[]);
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains(expected), "{message}");
        assert!(!bed.testbed.bpffs_dir.exists(), "checked before anything is attached");
    }
    let _ = squatter.kill();
    let _ = squatter.wait();
}

/// An older version handed the state directory to `daemon.user`; only the
/// gate writes it now, so it comes back to root.
#[test]
fn a_state_directory_the_worker_user_owns_goes_back_to_root() {
    let bed = MtlsBed::new(BackendMode::Echo);
    bed.write("", "");
    let state = bed.testbed.allowlist_path().parent().expect("state dir").to_owned();
    std::fs::create_dir_all(&state).expect("state dir");
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    nix::unistd::chown(&state, nobody, None).expect("chown");
    bed.testbed.start_daemon();
    assert_eq!(std::fs::metadata(&state).expect("stat").uid(), 0);
    let changed = bed.testbed.cli_ok(&["allow", "add", "198.51.100.7"]);
    assert!(changed.contains("1 added"), "{changed}");
    assert_eq!(std::fs::metadata(bed.testbed.allowlist_path()).expect("stat").uid(), 0);
}
