//! The daemon's state: the allowlist in force and what enforces it (the XDP
//! filter and the proxy's own copy of the list), changed only under one lock.
//! Every allowlist change, from the CLI or a reload, goes through
//! [`State::change`]: validated whole, persisted, applied, then acknowledged.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use super::fleet::Marker;

use crate::{
    allowlist::{self, Allowlist, Change, Diff, Entry},
    config::{Config, Overrides},
    control::{ErrorKind, ListSource, Response},
    filter::{Filter, FilterError},
    fleet::Health,
    learned::{LearnedSources, SightingRefusal},
    preflight,
    status::{ListReload, NotReady, Observation, ReloadResult, Status},
    tls::IdentityRules,
};

use super::{
    egress::WorkerEgress,
    listeners::Listeners,
    supervisor::{Worker, WorkerReport},
    transaction::{ChangeRefused, Persist, put_in_force},
};

/// The list and what enforces it; changed only under a lock.
pub struct State {
    /// The state lock, held while the daemon runs.
    pub(super) _lock: crate::files::StateLock,
    pub(super) list: Allowlist,
    pub(super) list_path: PathBuf,
    pub(super) filter: Filter,
    /// The listeners as the gate holds them (sockets, files, backends).
    pub(super) listeners: Listeners,
    /// Where the worker may connect to: the listeners' backends.
    pub(super) egress: WorkerEgress,
    /// The proxy worker: it serves the listeners, with its own copy of the
    /// list for PROXY-reported client addresses.
    pub(super) worker: Worker,
    pub(super) config: Config,
    pub(super) config_path: PathBuf,
    pub(super) overrides: Overrides,
    pub(super) reloads_ok: u64,
    pub(super) reloads_failed: u64,
    /// Fleet mode: where this host stands in its group.
    pub(super) fleet: Option<Arc<Health>>,
    /// Authenticated clients the list does not allow, for `allow suggest`.
    pub(super) learned: LearnedSources,
    /// Sightings not taken since start, by why.
    pub(super) sightings_refused: BTreeMap<SightingRefusal, u64>,
}

impl State {
    /// Puts `change` in force here (not in fleet mode, where the group's
    /// list changes in etcd): applied to the list whole, persisted, applied
    /// to the maps; a refused change leaves file and maps as they were.
    /// Map updates are blocking system calls: call it where blocking is allowed.
    pub(super) fn apply(&mut self, change: &Change) -> Result<Diff, ChangeRefused> {
        let next = change.apply_to(&self.list)?;
        self.change(next, Persist::Yes)
    }

    /// The list in force, and in fleet mode the generation it is.
    pub(super) fn list(&self) -> (Vec<Entry>, Option<ListSource>) {
        let source = self.fleet.as_ref().map(|health| ListSource {
            group: health.group().to_owned(),
            generation: health.applied(),
        });
        (self.list.entries().cloned().collect(), source)
    }

    /// How many entries the list in force has.
    pub(super) fn entries(&self) -> usize {
        self.list.len()
    }

    /// The learned sources the list does not decide, as `allow suggest` shows them.
    pub(super) fn suggest(&mut self) -> Response {
        self.learn();
        Response::Suggested {
            suggestions: self.learned.suggest(&self.list),
            learned: self.learned.len(),
            audit: self.filter.audit(),
            refused: self.sightings_refused.clone(),
        }
    }

    /// Resolves once the worker holds the list in force (bounded): awaited
    /// after the state lock is released, before a change is acknowledged.
    pub(super) fn worker_caught_up(
        &self,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.worker.caught_up()
    }

    /// Puts the group's `generation` in force (fleet mode), as a change read
    /// from etcd: the file becomes its cache, and the marker says which
    /// generation it holds.
    pub(super) fn adopt(
        &mut self,
        list: Allowlist,
        generation: u64,
    ) -> Result<Diff, ChangeRefused> {
        let diff = self.change(list, Persist::Yes)?;
        if let Some(fleet) = &self.config.fleet {
            let marker = Marker { group: fleet.group.clone(), generation };
            if let Err(e) = marker.write(&self.list_path) {
                tracing::warn!(
                    "cannot record generation {generation} next to {}: {e}; a restart fetches it again",
                    self.list_path.display()
                );
            }
        }
        Ok(diff)
    }

    /// Puts `next` in force (see [`put_in_force`]), then tells the worker.
    fn change(&mut self, next: Allowlist, persist: Persist) -> Result<Diff, ChangeRefused> {
        let file = self.list_path.as_path();
        put_in_force(&mut self.filter, file, persist, &self.list, &next).inspect_err(
            |refused| {
                // A refusal is the caller's to report; a failure in the maps is the host's.
                if matches!(refused, ChangeRefused::Apply(_) | ChangeRefused::RollbackFailed { .. })
                {
                    tracing::error!("allowlist change failed: {refused}");
                }
            },
        )?;
        let diff = self.list.diff(&next);
        tracing::info!(
            "allowlist changed: {} added, {} removed, {} updated, {} entries",
            diff.added,
            diff.removed,
            diff.updated,
            next.len()
        );
        self.list = next;
        self.worker.publish(&self.list, self.filter.audit());
        Ok(diff)
    }

    /// Re-reads the allowlist file, which an operator may have edited by hand:
    /// validated whole, and put in force only if it parses and fits.
    fn reload_list(&mut self) -> ListReload {
        if let Some(fleet) = &self.config.fleet {
            return ListReload::Fleet { group: fleet.group.clone() };
        }
        let reason = match allowlist::load(&self.list_path, self.config.filter.max_entries) {
            Ok(list) if list == self.list => return ListReload::Unchanged,
            Ok(list) => match self.change(list, Persist::No) {
                Ok(diff) => return ListReload::Applied { diff, entries: self.list.len() },
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        tracing::error!(
            "reload: allowlist {}: {reason}; the list in force stays",
            self.list_path.display()
        );
        ListReload::Kept { reason }
    }

    pub(super) fn status(&self, top_rules: usize, dropped: usize) -> Result<Status, FilterError> {
        let report = self.worker.report();
        tokio::task::block_in_place(|| self.status_with(top_rules, dropped, report.as_ref().ok()))
    }

    /// The status, with the worker's counters if it answered.
    fn status_with(
        &self,
        top_rules: usize,
        dropped: usize,
        report: Option<&WorkerReport>,
    ) -> Result<Status, FilterError> {
        let (ipv4_entries, ipv6_entries) = self.list.family_sizes();
        let (v4, v6) = self.filter.lookups();
        Ok(Status {
            interfaces: self.filter.attachments().to_vec(),
            scope: self.config.filter.scope,
            audit: self.filter.audit(),
            protected_ports: self.config.protected_ports(),
            tunnels: self.config.tunnels(),
            allowlist: self.list_path.clone(),
            ipv4_entries,
            ipv6_entries,
            ipv4_lookup: v4,
            ipv6_lookup: v6,
            capacity_per_family: self.filter.capacity(),
            counters: self.filter.counters()?,
            top_rules: self.filter.rule_hits(top_rules)?,
            dropped_sources: self.filter.dropped_sources(dropped)?,
            listeners: self.listeners.status(report.map(|r| r.listeners.as_slice())),
            fleet: self.fleet.as_ref().map(|health| health.snapshot()),
            gate_pid: std::process::id(),
            worker: self.worker.status(self.egress.status()),
        })
    }

    /// Takes the worker's sightings into the learned sources, and keeps
    /// them on disk: those that other evidence backs (see
    /// [`SightingRefusal`]); the rest are counted.
    pub(super) fn learn(&mut self) {
        let reported = self.worker.take_sightings();
        if reported.is_empty() {
            return;
        }
        let audit = self.filter.audit();
        let rules: BTreeMap<&str, IdentityRules> = self
            .config
            .listeners
            .iter()
            .filter_map(|listener| {
                Some((listener.name.as_str(), IdentityRules::new(listener).ok()?))
            })
            .collect();
        let mut sightings = Vec::new();
        for mut sighting in reported {
            sighting.address = sighting.address.to_canonical();
            let refusal = if !audit {
                Some(SightingRefusal::NotAuditing)
            } else if !rules
                .get(sighting.listener.as_str())
                .is_some_and(|rules| rules.allows_name(&sighting.name))
            {
                Some(SightingRefusal::IdentityNotAllowed)
            } else if self.filter.dropped_source(sighting.address).is_none() {
                Some(SightingRefusal::NotSampled)
            } else {
                None
            };
            match refusal {
                Some(why) => *self.sightings_refused.entry(why).or_default() += 1,
                None => sightings.push(sighting),
            }
        }
        if sightings.is_empty() {
            return;
        }
        // Names from the worker are shown to operators and end up in list
        // comments: no control character goes further than this.
        for sighting in &mut sightings {
            let name = &mut sighting.name;
            let names = name.common_name.iter_mut().chain(&mut name.dns).chain(&mut name.uris);
            names
                .chain([&mut sighting.listener])
                .for_each(|text| *text = crate::status::quoted(text));
        }
        self.learned.record(sightings);
        if let Err(e) = tokio::task::block_in_place(|| self.learned.save()) {
            tracing::warn!("cannot keep the learned sources: {e}; they are kept in memory");
        }
    }

    /// Logs what is about to expire among the certificates and CRLs in force.
    pub(super) fn warn_of_expiry(&self) {
        let now = crate::clock::unix_seconds();
        for listener in self.listeners.status(None) {
            for lifetime in &listener.lifetimes {
                let at = format!("listener `{}`: `{}`", listener.name, lifetime.kind.key());
                if let Some(finding) = preflight::judge_lifetime(&at, lifetime, now) {
                    tracing::warn!("{finding}");
                }
            }
        }
    }

    /// What `/metrics` and `/readyz` report (with the worker's newest
    /// counters: never a wait on the worker).
    pub fn observe(&self) -> Result<Observation, FilterError> {
        let report = self.worker.report();
        let ready = self.filter.verify_attachments().and_then(|()| {
            self.worker.ready()?;
            match &report {
                Ok(report) => self.listeners.verify_accepting(&report.listeners),
                Err(reason) => Err(NotReady::NoWorker { reason: reason.to_string() }),
            }
        });
        Ok(Observation {
            status: tokio::task::block_in_place(|| self.status_with(10, 0, report.as_ref().ok()))?,
            ready,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            fleet_propagation: self.fleet.as_ref().map(|health| health.propagation()),
        })
    }

    /// Re-reads the config file and the listeners' certificates, keys, CAs
    /// and CRLs. A config that does not parse changes nothing; a listener
    /// whose files are broken keeps its previous ones. Open connections are
    /// never disturbed.
    pub async fn reload(&mut self) -> Response {
        let next = match Config::load(&self.config_path, &self.overrides) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!("reload: {e}; keeping the running configuration");
                self.reloads_failed += 1;
                return Response::error(ErrorKind::Refused, format!("nothing reloaded: {e}"));
            }
        };
        // Only `filter.ports`, `filter.audit` (and the listeners) change in place.
        let running_with_new_ports = crate::config::FilterConfig {
            ports: next.filter.ports.clone(),
            audit: next.filter.audit,
            ..self.config.filter.clone()
        };
        if running_with_new_ports != next.filter
            || next.daemon != self.config.daemon
            || next.metrics != self.config.metrics
            || next.fleet != self.config.fleet
        {
            tracing::warn!(
                "reload: [filter], [daemon], [metrics] and [fleet] changes other than \
                 `filter.ports` and `filter.audit` take effect at the next start"
            );
        }
        if next.filter.audit != self.config.filter.audit {
            match self.filter.set_audit(next.filter.audit) {
                Ok(()) if next.filter.audit => tracing::warn!(
                    "reload: AUDIT MODE on: nothing is dropped; would-be drops are counted"
                ),
                Ok(()) => tracing::info!("reload: audit mode off: the list is enforced"),
                Err(e) => tracing::error!("reload: cannot switch audit mode: {e}"),
            }
            self.config.filter.audit = self.filter.audit();
            self.worker.publish(&self.list, self.config.filter.audit);
        }
        let allowlist = tokio::task::block_in_place(|| self.reload_list());
        self.config.listeners = next.listeners;
        self.config.filter.ports = next.filter.ports;
        // Protect new listeners' ports before they accept anything.
        if let Err(e) = self.filter.set_ports(&self.config.protected_ports()) {
            tracing::error!("reload: cannot update the protected ports: {e}");
        }
        // The gate reads the files and binds; the worker then serves the
        // result (a listener it refuses keeps what it had there too).
        let mut outcomes =
            tokio::task::block_in_place(|| self.listeners.reload(&self.config.listeners));
        // New listeners' sockets go into systemd's store too (a no-op elsewhere).
        super::handover::store(self.listeners.sockets());
        // New backends are reachable before the worker serves them; old
        // ones until it has the new listeners.
        let destinations = self.listeners.destinations();
        self.egress.also_permit(&destinations);
        let configured = self.worker.configure(&self.listeners).await;
        self.egress.permit(&destinations);
        match configured {
            Ok(refused) => {
                for refusal in refused {
                    if let Some(outcome) =
                        outcomes.iter_mut().find(|o| o.listener == refusal.listener)
                    {
                        outcome.result = ReloadResult::KeptPrevious(format!(
                            "the worker: {}",
                            crate::status::quoted(&refusal.reason)
                        ));
                    }
                }
            }
            Err(e) => tracing::warn!(
                "reload: the proxy worker: {e}; a new one serves the reloaded listeners"
            ),
        }
        for outcome in &outcomes {
            if outcome.result.failed() {
                tracing::warn!(listener = %outcome.listener, "reload: {}", outcome.result);
            } else {
                tracing::info!(listener = %outcome.listener, "reload: {}", outcome.result);
            }
        }
        if outcomes.iter().any(|o| o.result.failed())
            || matches!(allowlist, ListReload::Kept { .. })
        {
            self.reloads_failed += 1;
        } else {
            self.reloads_ok += 1;
        }
        Response::Reloaded { allowlist, outcomes }
    }
}
