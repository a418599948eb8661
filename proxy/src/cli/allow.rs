//! The list's commands: `allow` and `deny` changes (through the daemon,
//! `--offline` to the file, or `--signing-key` to the group's etcd), `list`,
//! `explain` and `suggest`.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use edgegate::{
    allowlist::{self, Action, Change, ChangeText},
    config::{Config, DEFAULT_MAX_ENTRIES},
    control::{self, Request, Response},
    filter::Capacity,
    learned::Suggestion,
    status::Explanation,
};

use super::{
    args::{AddArgs, AllowCommand, Commit, DelArgs, DenyCommand, Global, Offline},
    ask::ask,
    exit::{Refused, Usage},
    fleet::{connect_admin, wait_for_daemon_fleet, wait_for_fleet},
};

/// `allow …`: changes, the list, and what the daemon explains and suggests.
pub fn allow(global: &Global, command: AllowCommand) -> anyhow::Result<()> {
    match command {
        AllowCommand::Add(args) => add(global, Action::Allow, args),
        AllowCommand::Del(args) => remove(global, Action::Allow, args),
        AllowCommand::List { json } => list(global, json, None),
        AllowCommand::Explain { address, port, json } => explain(global, address, port, json),
        AllowCommand::Suggest { json, apply, only, config, commit } => {
            let via = Offline { offline: false, config };
            suggest(global, json, apply.as_deref(), &only, &via, &commit)
        }
        AllowCommand::ImportAws { file, regions, services, replace, offline, commit } => {
            let selection = edgegate::aws::Selection { regions, services };
            let entries = edgegate::aws::read(&file, &selection)?;
            let tag = edgegate::aws::COMMENT_TAG.to_owned();
            let import = ChangeText::Import { entries, tag, replace }.parse()?;
            change(global, import, &offline, &commit)
        }
        AllowCommand::Replace { file, offline, commit } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            // Refused here, as the daemon would refuse it, naming the file.
            let replace =
                ChangeText::Replace { text }.parse().with_context(|| file.display().to_string())?;
            change(global, replace, &offline, &commit)
        }
    }
}

/// `deny …`: the exceptions inside allowed ranges.
pub fn deny(global: &Global, command: DenyCommand) -> anyhow::Result<()> {
    match command {
        DenyCommand::Add(args) => add(global, Action::Deny, args),
        DenyCommand::Del(args) => remove(global, Action::Deny, args),
        DenyCommand::List { json } => list(global, json, Some(Action::Deny)),
    }
}

fn add(global: &Global, action: Action, args: AddArgs) -> anyhow::Result<()> {
    let AddArgs { cidrs, comment, offline, commit } = args;
    change(global, ChangeText::Add { action, cidrs, comment }.parse()?, &offline, &commit)
}

fn remove(global: &Global, action: Action, args: DelArgs) -> anyhow::Result<()> {
    let DelArgs { cidrs, offline, commit } = args;
    change(global, ChangeText::Remove { action, cidrs }.parse()?, &offline, &commit)
}

/// Has the daemon apply `change` (parsed here: errors name the argument
/// even with no daemon), or applies it to the file with `--offline`.
fn change(
    global: &Global,
    change: Change,
    offline: &Offline,
    commit: &Commit,
) -> anyhow::Result<()> {
    if let Some(key) = &commit.signing_key {
        if offline.offline {
            bail!(Usage(
                "--signing-key commits to the group's list in etcd; --offline changes a local file"
            ));
        }
        let Some(config) = &offline.config else {
            bail!(Usage(
                "--signing-key needs --config: the file whose `[fleet]` table names the group"
            ));
        };
        return change_signed(change, config, key, commit);
    }
    if offline.config.is_some() && !offline.offline {
        bail!(Usage("--config goes with --offline or --signing-key"));
    }
    if offline.offline {
        let (diff, entries, path) = change_offline(global, &change, offline.config.as_deref())?;
        println!(
            "ok: {} added, {} removed, {} updated; {entries} entries in {} (applied when the \
             daemon starts)",
            diff.added,
            diff.removed,
            diff.updated,
            path.display()
        );
        return Ok(());
    }
    let request = Request::Change { change, empty_ok: commit.force };
    let (diff, entries, fleet) = ask(global, &request, |answer| match answer {
        Response::Changed { diff, entries, fleet } => Some((diff, entries, fleet)),
        _ => None,
    })?;
    let counts =
        format!("{} added, {} removed, {} updated", diff.added, diff.removed, diff.updated);
    let Some(fleet) = fleet else {
        println!("ok: {counts}; {entries} entries in force");
        return Ok(());
    };
    let here = if fleet.enforced_here { "in force here" } else { "not yet in force here" };
    println!(
        "ok: {counts}; {entries} entries; committed as the group's generation {} ({here})",
        fleet.generation
    );
    if commit.wait {
        wait_for_daemon_fleet(global, fleet.generation, commit.wait_timeout)?;
    }
    Ok(())
}

/// Signs `change` and commits it to etcd from here (`--signing-key`).
fn change_signed(change: Change, config: &Path, key: &Path, commit: &Commit) -> anyhow::Result<()> {
    let (runtime, admin, committer) = connect_admin(config, Some(key))?;
    let committed = runtime.block_on(admin.commit(&change, commit.force))?;
    let diff = committed.diff;
    println!(
        "ok: {} added, {} removed, {} updated; {} entries; committed and signed as the group's \
         generation {} (by {committer})",
        diff.added, diff.removed, diff.updated, committed.entries, committed.generation
    );
    if commit.wait {
        wait_for_fleet(committed.generation, commit.wait_timeout, || {
            runtime.block_on(admin.view()).map_err(anyhow::Error::from)
        })?;
    }
    Ok(())
}

/// Applies `change` to the allowlist file, as a daemon would, but for the maps.
fn change_offline(
    global: &Global,
    change: &Change,
    config: Option<&Path>,
) -> anyhow::Result<(allowlist::Diff, usize, PathBuf)> {
    let (path, capacity, socket) = match config {
        Some(config) => {
            let config = Config::load(config, &global.overrides())?;
            if let Some(fleet) = &config.fleet {
                bail!(Refused(format!(
                    "this config is in fleet mode (group `{}`): the list is the group's, in etcd; \
                     start the daemon and drop --offline",
                    fleet.group
                )));
            }
            (config.allowlist_path(), config.filter.max_entries, config.daemon.control_socket)
        }
        None => (global.state_dir().join("allowlist"), DEFAULT_MAX_ENTRIES, global.socket()),
    };
    // A running daemon would not see the file change, and would overwrite it.
    if control::call(&socket, &Request::Ping).is_ok() {
        bail!(Refused(format!(
            "the daemon is running (socket {}): drop --offline, and it applies the change at once",
            socket.display()
        )));
    }
    // A daemon starting meanwhile waits for this change: it holds the same lock.
    let _lock = match edgegate::files::StateLock::acquire(&path) {
        Err(edgegate::files::LockError::Held { path: lock }) => bail!(Refused(format!(
            "a daemon (or another --offline change) holds {}: drop --offline if the daemon runs",
            lock.display()
        ))),
        locked => locked?,
    };
    let list = allowlist::load(&path, capacity)?;
    let next = change.apply_to(&list)?;
    // The daemon's next start replaces the list its pinned maps hold.
    let (old, new) = (list.entries(), next.entries());
    Capacity(capacity).check(old.map(|entry| entry.cidr), new.map(|entry| entry.cidr)).map_err(
        |too_many| Refused(format!("{too_many} (`filter.max_entries`); nothing changed")),
    )?;
    allowlist::store(&path, &next)?;
    Ok((list.diff(&next), next.len(), path))
}

fn list(global: &Global, json: bool, only: Option<Action>) -> anyhow::Result<()> {
    let (mut entries, fleet) = ask(global, &Request::List, |answer| match answer {
        Response::List { entries, fleet } => Some((entries, fleet)),
        _ => None,
    })?;
    entries.retain(|e| only.is_none_or(|action| e.action == action));
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if let Some(source) = fleet {
        println!("# group {}, generation {} (in force here)", source.group, source.generation);
    }
    for entry in &entries {
        let line = format!("{:<5} {}", entry.action, entry.cidr);
        match &entry.comment {
            Some(comment) => println!("{line:<49} # {comment}"),
            None => println!("{line}"),
        }
    }
    Ok(())
}

fn suggest(
    global: &Global,
    json: bool,
    apply: Option<&str>,
    only: &[ipnet::IpNet],
    via: &Offline,
    commit: &Commit,
) -> anyhow::Result<()> {
    let (suggestions, learned, audit, refused) =
        ask(global, &Request::Suggest, |answer| match answer {
            Response::Suggested { suggestions, learned, audit, refused } => {
                Some((suggestions, learned, audit, refused))
            }
            _ => None,
        })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&suggestions)?);
        return Ok(());
    }
    for (why, count) in &refused {
        println!("{count} sighting(s) from the proxy worker not taken: {}", why.describe());
    }
    if suggestions.is_empty() {
        let how = if audit {
            "clients from unlisted addresses are learned as they authenticate"
        } else {
            "sources are learned only in audit mode (`[filter] audit = true`), where unlisted \
             clients get to authenticate"
        };
        println!(
            "nothing to suggest ({learned} source(s) learned, all decided by the list); {how}"
        );
        return Ok(());
    }
    println!("authenticated clients the list does not allow ({learned} source(s) learned):");
    let now = u64::try_from(edgegate::clock::unix_seconds()).unwrap_or(0);
    for suggestion in &suggestions {
        let names: Vec<String> = suggestion.names.iter().map(ToString::to_string).collect();
        println!(
            "  allow {:<40} {} connection(s) from {} address(es), last {}s ago: {}",
            suggestion.cidr,
            suggestion.connections,
            suggestion.addresses.len(),
            now.saturating_sub(suggestion.last_seen),
            names.join("; ")
        );
    }
    let digest = edgegate::learned::digest(&suggestions);
    let Some(reviewed) = apply else {
        println!("digest: {digest}");
        println!(
            "review them (a compromised proxy worker could invent names), then add them with \
             `edgegate allow suggest --apply {digest}` (add `--only CIDR` for some of them)"
        );
        return Ok(());
    };
    if reviewed != digest {
        bail!(Refused(format!(
            "the suggestions are not the ones reviewed (digest {reviewed}; now {digest}): \
             nothing applied; review the list above and run `edgegate allow suggest --apply \
             {digest}`"
        )));
    }
    if let Some(missing) = only.iter().find(|cidr| !suggestions.iter().any(|s| s.cidr == **cidr)) {
        bail!(Refused(format!("{missing} is not among the suggestions: nothing applied")));
    }
    let entries = suggestions
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.cidr))
        .map(Suggestion::entry)
        .collect();
    let tag = edgegate::learned::COMMENT_TAG.to_owned();
    let import = ChangeText::Import { entries, tag, replace: false }.parse()?;
    change(global, import, via, commit)
}

/// Asks the daemon what decides for `address`, and checks that the loaded
/// program agrees.
fn explain(global: &Global, address: IpAddr, port: Option<u16>, json: bool) -> anyhow::Result<()> {
    let explanation = ask(global, &Request::Explain { address, port }, |answer| match answer {
        Response::Explained(explanation) => Some(explanation),
        _ => None,
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print_explanation(&explanation);
    }
    if !explanation.agrees {
        bail!(
            "the loaded XDP program's verdict ({}) differs from the list's ({}): please report this",
            explanation.kernel,
            explanation.verdict
        );
    }
    Ok(())
}

fn print_explanation(e: &Explanation) {
    use proxy_common::Reason;
    let protected = if e.protected { "protected" } else { "not protected" };
    println!(
        "{} to port {} ({protected}, {} scope): {} ({})",
        e.address,
        e.port,
        e.scope,
        e.verdict.name().to_uppercase(),
        e.reason
    );
    let consulted = matches!(e.reason, Reason::Allowed | Reason::Denied | Reason::Unlisted);
    match &e.rule {
        Some(rule) => {
            let comment = rule.comment.as_deref().map(|c| format!("  # {c}")).unwrap_or_default();
            let at = match rule.line {
                Some(line) => format!("{} line {line}", rule.file.display()),
                None => format!("not in {} (edited since?)", rule.file.display()),
            };
            let note = if consulted { "" } else { " (not consulted: the port is out of scope)" };
            println!("  rule:    {} {}{comment}{note}", rule.action, rule.cidr);
            println!("           {at}");
        }
        None if consulted => println!("  rule:    none: unlisted"),
        None => println!("  rule:    none (and not consulted: the port is out of scope)"),
    }
    if e.audit {
        println!("  mode:    AUDIT: nothing is dropped");
    }
    let check = if e.agrees { "agrees" } else { "DISAGREES" };
    println!("  kernel:  {} (a test packet through the loaded XDP program {check})", e.kernel);
}
