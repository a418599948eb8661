//! `[fleet]`: the group's list kept in etcd, and reading a file for that
//! table alone (an admin's file, for changes made with a signing key).

use std::{fs, path::Path, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    error::{ConfigError, Invalid, syntax_error},
    filter::default_max_entries,
    validate::validate_fleet,
    values::duration,
};

/// `[fleet]`: hosts of one group enforce one allowlist, kept in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd client URLs (`https://host:2379`); any member will do.
    pub endpoints: Vec<String>,
    /// Hosts of one group enforce one list.
    pub group: String,
    /// Key prefix under which the groups live.
    #[serde(default = "default_fleet_prefix")]
    pub prefix: String,
    /// CAs that issue the etcd members' certificates (needed with `https://`).
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How this host is named in `edgegate fleet status`; default: the hostname.
    pub host_id: Option<String>,
    /// The whole list is re-read this often even while the watch looks healthy.
    #[serde(default = "default_resync_interval", deserialize_with = "duration")]
    pub resync_interval: Duration,
    /// Each etcd request (and connection attempt) fails after this long.
    #[serde(default = "default_fleet_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Public keys (`ed25519:…`, from `edgegate fleet keygen`) whose
    /// signature a generation needs before this host enforces it. Empty:
    /// anyone who can write the group's keys in etcd decides the list.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Accept `http://` endpoints beyond loopback (the list and credentials
    /// cross the network unprotected).
    #[serde(default)]
    pub insecure_plaintext: bool,
}

impl FleetConfig {
    /// The parsed `trusted_keys` (validated with the config).
    pub fn trusted_keys(
        &self,
    ) -> Result<crate::fleet::trust::TrustedKeys, crate::fleet::trust::BadPublicKey> {
        let keys = self.trusted_keys.iter().map(|k| k.parse()).collect::<Result<_, _>>()?;
        Ok(crate::fleet::trust::TrustedKeys::new(keys))
    }
}

/// A file read only for its `[fleet]` table (and `filter.max_entries`): a
/// gate's config, or an admin's file that holds nothing else.
#[derive(Deserialize)]
struct FleetFile {
    fleet: Option<FleetConfig>,
    filter: Option<FleetFileFilter>,
}

#[derive(Deserialize)]
struct FleetFileFilter {
    #[serde(default = "default_max_entries")]
    max_entries: u32,
}

/// Where changes are made with a signing key: the `[fleet]` table of
/// `path` and the maps' capacity (`filter.max_entries`, default if absent).
pub fn load_fleet(path: &Path) -> Result<(FleetConfig, u32), ConfigError> {
    let text = fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let file: FleetFile = toml::from_str(&text).map_err(|e| syntax_error(path, &text, e))?;
    let Some(fleet) = file.fleet else {
        let problem =
            Invalid::new("fleet", "this file has no `[fleet]` table: name the group and its etcd");
        return Err(ConfigError::Invalid { path: path.to_owned(), problems: vec![problem] });
    };
    let problems = validate_fleet(&fleet);
    if !problems.is_empty() {
        return Err(ConfigError::Invalid { path: path.to_owned(), problems });
    }
    Ok((fleet, file.filter.map_or_else(default_max_entries, |f| f.max_entries)))
}

fn default_fleet_prefix() -> String {
    "/edgegate".into()
}
fn default_resync_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_fleet_timeout() -> Duration {
    Duration::from_secs(2)
}
