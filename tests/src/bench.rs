//! What every `cargo xtask bench` binary shares: order statistics, the
//! machine and tool versions for the table's header, process CPU time, and
//! the JSON copy of the results under `target/bench/`.

use std::{path::PathBuf, process::Command, time::Duration};

/// The `p` quantile (0.0 to 1.0) of `values`: the sorted value at rank
/// `p × (n − 1)`, rounded.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    assert!(!values.is_empty(), "no samples");
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// How a report marks a target: met, or missed in bold.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// The middle value, or the mean of the two middle ones.
pub fn median(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "no samples");
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// `(min, max)` of `values`.
pub fn spread(values: &[f64]) -> (f64, f64) {
    (percentile(values, 0.0), percentile(values, 1.0))
}

/// The start of a benchmark's report: its name and the machine it ran on.
pub fn print_heading(name: &str) {
    println!("\n## cargo xtask bench {name}");
    println!("{}", machine());
}

/// The exit status of a benchmark that this host cannot run (a capability
/// withheld, a kernel too old): automake's "skipped", which `cargo xtask
/// bench` (`xtask/src/bench.rs`) reports as not measurable rather than failed.
pub const NOT_MEASURABLE_HERE: i32 = 77;

/// Says under the benchmark's heading, in the report, why this host cannot
/// run it, and exits with [`NOT_MEASURABLE_HERE`]. Destructors do not run:
/// drop the testbed first.
pub fn exit_not_measurable_here(name: &str, why: &str) -> ! {
    print_heading(name);
    println!("not measurable on this host: {why}");
    std::process::exit(NOT_MEASURABLE_HERE)
}

/// Cores, CPU model and kernel, for a benchmark table's header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("machine: {cores} cores, {cpu}, kernel {}", kernel.trim())
}

/// The line of `program arg`'s output (stdout or stderr) that names the
/// program, e.g. its version; else the first line.
pub fn tool_version(program: &str, arg: &str) -> String {
    match Command::new(program).arg(arg).output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() { output.stderr } else { output.stdout };
            let text = String::from_utf8_lossy(&text);
            let mut lines = text.lines().map(str::trim);
            let named = lines.clone().find(|l| l.to_lowercase().starts_with(program));
            named.or_else(|| lines.next()).unwrap_or_default().to_owned()
        }
        Err(e) => format!("{program}: {e}"),
    }
}

/// `pid` and every process below it: a proxy's whole footprint (edgegate's
/// gate and its worker, a forking peer's children).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| {
            let child: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            let after_name = &stat[stat.rfind(')')? + 2..];
            let parent = after_name.split_whitespace().nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        tree.extend(parents.iter().filter(|(_, p)| *p == parent).map(|(child, _)| *child));
        next += 1;
    }
    tree
}

/// CPU time (user + system) `pid` and the processes below it have used so far.
pub fn tree_cpu(pid: u32) -> Duration {
    process_tree(pid).into_iter().map(process_cpu).sum()
}

/// Context switches (voluntary and not) of every thread of `pid` and the
/// processes below it so far: each wake-up of a thread that waited costs one.
pub fn tree_switches(pid: u32) -> u64 {
    let mut switches = 0;
    for process in process_tree(pid) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{process}/task")) else { continue };
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
            switches += status
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches")
                        || l.starts_with("nonvoluntary_ctxt_switches")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    switches
}

/// CPU time (user + system) a process has used so far.
pub fn process_cpu(pid: u32) -> Duration {
    // A process that just ended has used nothing more.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_micros(ticks * 1_000_000 / clock_ticks_per_second())
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).expect("clock ticks")
}

/// Writes `target/bench/<name>.json` and says where.
pub fn save(name: &str, value: &serde_json::Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value).expect("JSON"))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("\nresults: target/bench/{name}.json");
}
