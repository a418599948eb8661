//! What the gate checks of a new worker before it serves: its credentials
//! and filters, read by the kernel's account in `/proc`, not by the
//! worker's word.

/// Checks from `/proc`, for every thread of `pid`, what the worker is
/// supposed to have done to itself: not root, no capability in any set,
/// `no_new_privs`, seccomp filtering, and not dumpable (the kernel then
/// gives the files in its `/proc` directory to root instead of the
/// worker's user); and that it is in `cgroup`, the workers' cgroup (where
/// the egress filter holds), when there is one.
pub(super) fn verify_confined(pid: u32, cgroup: Option<&str>) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    if let Some(expected) = cgroup {
        let path = format!("/proc/{pid}/cgroup");
        let cgroups = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let actual = cgroups.lines().find_map(|line| line.strip_prefix("0::"));
        if actual != Some(expected) {
            return Err(format!(
                "in cgroup {}, not {expected}, where its egress filter is",
                actual.unwrap_or("(none)")
            ));
        }
    }
    let status = format!("/proc/{pid}/status");
    let owner = std::fs::metadata(&status).map_err(|e| format!("{status}: {e}"))?.uid();
    if owner != 0 {
        return Err(format!("dumpable: {status} belongs to uid {owner}, not root"));
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    for task in tasks {
        let path = task.map_err(|e| e.to_string())?.path().join("status");
        let status =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .ok_or_else(|| format!("{}: no {name}", path.display()))
        };
        if field("Uid")?.split_whitespace().any(|uid| uid == "0") {
            return Err(format!("{}: runs as root", path.display()));
        }
        for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            if u64::from_str_radix(field(set)?, 16).map_err(|e| e.to_string())? != 0 {
                return Err(format!("{}: {set} is not empty", path.display()));
            }
        }
        if field("NoNewPrivs")? != "1" || field("Seccomp")? != "2" {
            return Err(format!("{}: no_new_privs or seccomp missing", path.display()));
        }
    }
    Ok(())
}
