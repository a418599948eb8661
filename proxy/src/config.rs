//! The TOML configuration file, parsed into a validated [`Config`].
//!
//! The allowlist is not configuration: it is state the daemon owns (see
//! `allowlist`); the config only says where it lives.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Where the daemon keeps its state when neither config nor flags say otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/edgegate";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/edgegate/control.sock";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/edgegate";
/// Rules per address family. Maps allocate on insert, so unused capacity is cheap.
pub const DEFAULT_MAX_ENTRIES: u32 = 1 << 18;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub filter: FilterConfig,
    pub daemon: DaemonConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Interfaces the XDP program is attached to.
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub mode: AttachMode,
    #[serde(default)]
    pub scope: Scope,
    /// Protected ports besides the listeners' own.
    #[serde(default)]
    pub ports: BTreeSet<u16>,
    /// The allowlist file; `<state dir>/allowlist` when absent.
    pub allowlist: Option<PathBuf>,
    /// Capacity of the rule maps, per address family.
    #[serde(default = "default_max_entries")]
    pub max_entries: u32,
}

fn default_max_entries() -> u32 {
    DEFAULT_MAX_ENTRIES
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, else generic (skb) mode with a warning.
    #[default]
    Auto,
    Native,
    Skb,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Ports,
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// How long a stopping daemon waits for work in progress.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            control_socket: default_control_socket(),
            state_dir: default_state_dir(),
            bpffs_dir: default_bpffs_dir(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_control_socket() -> PathBuf {
    DEFAULT_CONTROL_SOCKET.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_bpffs_dir() -> PathBuf {
    DEFAULT_BPFFS_DIR.into()
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The file as written; [`Config`] is what validation makes of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    filter: FilterConfig,
    #[serde(default)]
    daemon: DaemonConfig,
    /// Not served yet by this version; refused with a clear message rather than ignored.
    #[serde(default)]
    listener: Vec<toml::Table>,
}

/// Why a configuration file is refused. Messages name the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or a key has the wrong type or an unknown name (the message has the line).
    #[error("config {}: {source}", path.display())]
    Syntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is well-formed but unusable.
    #[error("config {}: `{key}`: {problem}", path.display())]
    Invalid { path: PathBuf, key: &'static str, problem: String },
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
        let text = fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path, overrides)
    }

    /// Parses `text`; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax { path: path.to_owned(), source: Box::new(e) })?;
        let invalid = |key, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        if !raw.listener.is_empty() {
            return Err(invalid(
                "listener",
                "this version runs the XDP filter only; mTLS listeners are not available yet",
            ));
        }
        let RawConfig { mut filter, mut daemon, .. } = raw;
        if filter.interfaces.is_empty() {
            return Err(invalid(
                "filter.interfaces",
                "name at least one interface, e.g. [\"eth0\"]",
            ));
        }
        if let Some(name) = filter.interfaces.iter().find(|n| !valid_interface_name(n)) {
            return Err(invalid(
                "filter.interfaces",
                &format!("`{name}` is not an interface name"),
            ));
        }
        if filter.scope == Scope::Ports && filter.ports.is_empty() {
            return Err(invalid(
                "filter.ports",
                "scope = \"ports\" with no ports and no listeners would protect nothing; \
                 list ports here or use scope = \"host\"",
            ));
        }
        if filter.ports.contains(&0) {
            return Err(invalid("filter.ports", "port 0 cannot be protected"));
        }
        if filter.max_entries == 0 {
            return Err(invalid("filter.max_entries", "must be at least 1"));
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
        if filter.allowlist.is_none() {
            filter.allowlist = Some(daemon.state_dir.join("allowlist"));
        }
        Ok(Self { filter, daemon })
    }

    pub fn allowlist_path(&self) -> &Path {
        self.filter.allowlist.as_deref().expect("set by Config::parse")
    }
}

fn valid_interface_name(name: &str) -> bool {
    // IFNAMSIZ is 16 including the terminating NUL.
    !name.is_empty()
        && name.len() < 16
        && !name.contains(['/', ' ', '\0'])
        && name != "."
        && name != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("edgegate.toml"), &Overrides::default())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse("[filter]\ninterfaces = [\"eth0\"]\nports = [8443]\n").unwrap();
        assert_eq!(config.filter.mode, AttachMode::Auto);
        assert_eq!(config.filter.scope, Scope::Ports);
        assert_eq!(config.allowlist_path(), Path::new("/var/lib/edgegate/allowlist"));
        assert_eq!(config.daemon.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(config.daemon.drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn overrides_win_and_move_the_default_allowlist() {
        let overrides = Overrides { state_dir: Some("/tmp/eg".into()), ..Overrides::default() };
        let config = Config::parse(
            "[filter]\ninterfaces = [\"eth0\"]\nscope = \"host\"\n",
            Path::new("x.toml"),
            &overrides,
        )
        .unwrap();
        assert_eq!(config.allowlist_path(), Path::new("/tmp/eg/allowlist"));
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            ("[filter]\ninterfaces = []\nports = [1]\n", "filter.interfaces"),
            ("[filter]\ninterfaces = [\"eth0\"]\n", "filter.ports"),
            ("[filter]\ninterfaces = [\"eth0\"]\nports = [0]\n", "filter.ports"),
            ("[filter]\ninterfaces = [\"a/b\"]\nports = [1]\n", "filter.interfaces"),
            (
                "[filter]\ninterfaces = [\"eth0\"]\nports = [1]\n[[listener]]\nname = \"x\"\n",
                "listener",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
                "{text}: {err}"
            );
            assert!(err.to_string().starts_with("config edgegate.toml: "), "{err}");
        }
    }

    #[test]
    fn syntax_errors_point_at_the_key() {
        let err = parse("[filter]\ninterfaces = [\"eth0\"]\nmode = \"turbo\"\n").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(message.contains("line 3") && message.contains("turbo"), "{message}");
        let err = parse("[filter]\ninterfaces = [\"eth0\"]\nport = [1]\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `port`"), "{err}");
    }
}
