//! Reading a config file: the file as written, relative paths resolved
//! against its directory, command-line overrides, and every unusable value.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{
    Config, DaemonConfig, FilterConfig, FleetConfig, ListenerConfig, MetricsConfig, Scope,
    error::{ConfigError, Invalid, syntax_error},
    validate::{binds_overlap, valid_interface_name, validate_fleet, validate_listeners},
};

/// The file as written; [`Config`] is what validation makes of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    filter: FilterConfig,
    #[serde(default)]
    daemon: DaemonConfig,
    #[serde(default)]
    listener: Vec<ListenerConfig>,
    #[serde(default)]
    metrics: MetricsConfig,
    fleet: Option<FleetConfig>,
}

impl RawConfig {
    /// Makes every relative path the file names start at `base`; returns
    /// the keys that held one.
    fn resolve_relative_paths(&mut self, base: &Path) -> Vec<String> {
        let mut resolved = Vec::new();
        let mut resolve = |key: String, path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
                resolved.push(key);
            }
        };
        if let Some(path) = &mut self.filter.allowlist {
            resolve("filter.allowlist".into(), path);
        }
        let daemon = &mut self.daemon;
        resolve("daemon.control_socket".into(), &mut daemon.control_socket);
        resolve("daemon.state_dir".into(), &mut daemon.state_dir);
        resolve("daemon.bpffs_dir".into(), &mut daemon.bpffs_dir);
        for listener in &mut self.listener {
            let name = listener.name.clone();
            for (key, path) in listener.files_mut() {
                resolve(format!("listener.{name}.{key}"), path);
            }
        }
        if let Some(fleet) = &mut self.fleet {
            for (key, path) in
                [("ca", &mut fleet.ca), ("cert", &mut fleet.cert), ("key", &mut fleet.key)]
            {
                if let Some(path) = path {
                    resolve(format!("fleet.{key}"), path);
                }
            }
        }
        resolved
    }
}

/// A config file as read: its config, every unusable value in it, and the
/// keys whose relative paths were resolved against `base`.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub problems: Vec<Invalid>,
    pub relative: Vec<String>,
    /// The config file's directory.
    pub base: Option<PathBuf>,
}

/// Paths given on the command line, which win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub control_socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub bpffs_dir: Option<PathBuf>,
}

impl Config {
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let Loaded { config, problems, .. } = Self::load_with_problems(path, overrides)?;
        if problems.is_empty() {
            return Ok(config);
        }
        Err(ConfigError::Invalid { path: path.to_owned(), problems })
    }

    /// Parses `text`; `path` is only used in messages (relative paths in
    /// `text` stay relative).
    pub fn parse(text: &str, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (config, problems) = Self::parse_with_problems(text, path, None, overrides)?;
        if problems.is_empty() {
            return Ok(config);
        }
        Err(ConfigError::Invalid { path: path.to_owned(), problems })
    }

    /// As [`Self::load`], but a file that parses yields its config together
    /// with every unusable value, so that `check` can go on to the files it
    /// names. Only a file that cannot be read or parsed is an error.
    pub fn load_with_problems(path: &Path, overrides: &Overrides) -> Result<Loaded, ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        // systemd starts the daemon in `/`: a path that works from the
        // operator's shell in the config's directory must work there too.
        let base = path.parent().map(|dir| std::path::absolute(dir).unwrap_or(dir.to_owned()));
        let mut relative = Vec::new();
        let (config, problems) = Self::parse_with_problems(
            &text,
            path,
            base.as_deref().map(|b| (b, &mut relative)),
            overrides,
        )?;
        Ok(Loaded { config, problems, relative, base })
    }

    /// `resolve`: the directory relative paths in the file are read from,
    /// and where to note the keys that held one.
    fn parse_with_problems(
        text: &str,
        path: &Path,
        resolve: Option<(&Path, &mut Vec<String>)>,
        overrides: &Overrides,
    ) -> Result<(Self, Vec<Invalid>), ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(path, text, e))?;
        if let Some((base, relative)) = resolve {
            relative.extend(raw.resolve_relative_paths(base));
        }
        let RawConfig { filter, mut daemon, listener: listeners, metrics, fleet } = raw;
        let mut problems = validate_listeners(&listeners);
        if let Some(fleet) = &fleet {
            problems.extend(validate_fleet(fleet));
        }
        if filter.interfaces.is_empty() {
            problems.push(Invalid::new(
                "filter.interfaces",
                "name at least one interface, e.g. [\"eth0\"]",
            ));
        }
        let mut seen = BTreeSet::new();
        for name in filter.interfaces.iter().filter(|name| !seen.insert(name.as_str())) {
            problems.push(Invalid::new(
                "filter.interfaces",
                format!("`{name}` is named twice; each interface takes one program"),
            ));
        }
        for name in filter.interfaces.iter().filter(|n| !valid_interface_name(n)) {
            problems.push(Invalid::new(
                "filter.interfaces",
                format!("`{name}` is not an interface name"),
            ));
        }
        if filter.scope == Scope::Ports && filter.ports.is_empty() && listeners.is_empty() {
            problems.push(Invalid::new(
                "filter.ports",
                "scope = \"ports\" with no ports and no listeners would protect nothing; \
                 list ports here or use scope = \"host\"",
            ));
        }
        if filter.ports.contains(&0) {
            problems.push(Invalid::new("filter.ports", "port 0 cannot be protected"));
        }
        if filter.tunnel_ports.contains(&0) {
            problems.push(Invalid::new("filter.tunnel_ports", "port 0 carries no tunnel"));
        }
        if filter.tunnel_ports.len() > proxy_common::tunnel::MAX_UDP_PORTS {
            problems.push(Invalid::new(
                "filter.tunnel_ports",
                format!(
                    "at most {} ports; a host rarely terminates more kinds of UDP tunnel",
                    proxy_common::tunnel::MAX_UDP_PORTS
                ),
            ));
        }
        if metrics.exposed() && metrics.bind.port() == 0 {
            problems.push(Invalid::new(
                "metrics.bind",
                "an endpoint other hosts can reach needs a fixed port, so that the filter can \
                 protect it",
            ));
        }
        if let Some(listener) = listeners.iter().find(|l| binds_overlap(l.bind, metrics.bind)) {
            problems.push(Invalid::new(
                "metrics.bind",
                format!("{} is also listener `{}`'s address", metrics.bind, listener.name),
            ));
        }
        if filter.max_entries == 0 {
            problems.push(Invalid::new("filter.max_entries", "must be at least 1"));
        }
        if let Some(dir) = &overrides.state_dir {
            daemon.state_dir.clone_from(dir);
        }
        if let Some(socket) = &overrides.control_socket {
            daemon.control_socket.clone_from(socket);
        }
        if let Some(dir) = &overrides.bpffs_dir {
            daemon.bpffs_dir.clone_from(dir);
        }
        Ok((Self { filter, daemon, listeners, metrics, fleet }, problems))
    }
}
