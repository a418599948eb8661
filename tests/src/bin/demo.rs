//! `cargo xtask demo`: the XDP allowlist at work on a throwaway testbed of
//! network namespaces, narrated step by step. Everything it creates is
//! removed when it exits, also on failure or Ctrl-C.

use std::time::{Duration, Instant};

use edgegate_tests::testbed::{PROTECTED_PORT, Testbed};

const TIMEOUT: Duration = Duration::from_millis(500);

/// Ctrl-C was pressed: stop at the next step and clean up.
struct Interrupted;

fn main() {
    // Ctrl-C must not kill the process mid-way: block SIGINT in every thread
    // (threads inherit the mask) and let one thread wait for it.
    let mut sigint = nix::sys::signal::SigSet::empty();
    sigint.add(nix::sys::signal::Signal::SIGINT);
    sigint.thread_block().expect("block SIGINT");
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&interrupted);
    std::thread::spawn(move || {
        if sigint.wait().is_ok() {
            println!("\ninterrupted: cleaning up after the current step");
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    match run(&interrupted) {
        Ok(()) => println!("\n✔ demo complete; testbed removed"),
        Err(Interrupted) => std::process::exit(130),
    }
}

fn run(interrupted: &std::sync::atomic::AtomicBool) -> Result<(), Interrupted> {
    let testbed = Testbed::new(2);
    let partner = testbed.clients[0].ipv4;
    let stranger = testbed.clients[1].ipv4;
    let step = |text: &str| {
        if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Interrupted);
        }
        println!("\n▶ {text}");
        Ok(())
    };
    let connect = |client: usize| {
        let start = Instant::now();
        let ok = testbed.connects(client, testbed.server_v4(client), PROTECTED_PORT, TIMEOUT);
        let who = if client == 0 { "partner " } else { "stranger" };
        let (address, server) = (testbed.clients[client].ipv4, testbed.server_v4(client));
        if ok {
            println!(
                "  {who} {address} → {server}:{PROTECTED_PORT}: connected in {:?}",
                start.elapsed()
            );
        } else {
            println!(
                "  {who} {address} → {server}:{PROTECTED_PORT}: no answer (SYN dropped at XDP)"
            );
        }
        ok
    };
    let cli = |args: &[&str]| {
        println!("  $ edgegate {}", args.join(" "));
        for line in testbed.cli_ok(args).lines() {
            println!("    {line}");
        }
    };

    step(&format!(
        "testbed: protected host (namespace {}, TCP server on port {PROTECTED_PORT}), partner {partner}, stranger {stranger}",
        testbed.server.name()
    ))?;
    std::fs::create_dir_all(testbed.allowlist_path().parent().expect("dir")).expect("state dir");
    std::fs::write(testbed.allowlist_path(), format!("{partner}/32  # the partner platform\n"))
        .expect("list");
    println!("  allowlist {}: {partner}/32", testbed.allowlist_path().display());
    step("start the daemon: it attaches the XDP program to the host's interfaces")?;
    println!("  $ edgegate run --config {}", testbed.config.display());
    testbed.start_daemon();

    step("the partner is on the list; the stranger is not")?;
    assert!(connect(0), "the partner must connect");
    assert!(!connect(1), "the stranger must be dropped");

    let stranger_net = format!("{}/24", testbed.server_ipv4[1]).replace(".1/24", ".0/24");
    step("allow the stranger's network at runtime, no restart")?;
    cli(&["allow", "add", &stranger_net, "--comment", "second partner"]);
    assert!(connect(1), "the stranger is allowed now");

    step("a deny inside an allowed range wins (longest prefix)")?;
    cli(&["deny", "add", &stranger.to_string()]);
    assert!(!connect(1));
    cli(&["deny", "del", &stranger.to_string()]);
    assert!(connect(1));

    step("kill -9 the daemon: the pinned filter keeps filtering")?;
    cli(&["allow", "del", &stranger_net]);
    testbed.kill_daemon();
    assert!(connect(0) && !connect(1));
    step("restart: the new daemon takes over the pinned program and the same list")?;
    testbed.start_daemon();
    cli(&["allow", "list"]);

    step("what the filter saw")?;
    cli(&["status"]);
    Ok(())
}
