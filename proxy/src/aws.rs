//! AWS's published address ranges (`ip-ranges.json`), for partners whose
//! platform runs in AWS: pick the prefixes of some regions and services and
//! turn them into allowlist entries.
//!
//! Format: <https://docs.aws.amazon.com/vpc/latest/userguide/aws-ip-ranges.html>.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    allowlist::{self, Action, Entry},
    files::{IoContext as _, IoError},
};

/// AWS's file is about 2 MB; anything far larger is not it.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Comments of imported entries start with this, so that a later import
/// with `--replace` can find (and replace) them.
pub const COMMENT_TAG: &str = "aws-ip-ranges";

#[derive(Debug, Deserialize)]
struct IpRanges {
    #[serde(rename = "syncToken")]
    sync_token: String,
    prefixes: Vec<Ipv4Prefix>,
    ipv6_prefixes: Vec<Ipv6Prefix>,
}

#[derive(Debug, Deserialize)]
struct Ipv4Prefix {
    ip_prefix: String,
    region: String,
    service: String,
}

#[derive(Debug, Deserialize)]
struct Ipv6Prefix {
    ipv6_prefix: String,
    region: String,
    service: String,
}

/// Why a ranges file is refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file cannot be read.
    #[error(transparent)]
    Read(#[from] IoError),
    /// Not the ip-ranges.json format (the message has line and column).
    #[error("{} is not AWS ip-ranges.json: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A prefix in the file is not a valid network.
    #[error("{}: prefix `{prefix}`: {source}", path.display())]
    Prefix {
        path: PathBuf,
        prefix: String,
        #[source]
        source: allowlist::CidrError,
    },
    /// The filters select nothing: importing would only remove entries.
    #[error("no prefix in {} matches the given regions and services", path.display())]
    NothingSelected { path: PathBuf },
}

/// Which prefixes to take: every region (service) when the list is empty.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub regions: Vec<String>,
    pub services: Vec<String>,
}

impl Selection {
    fn selects(&self, region: &str, service: &str) -> bool {
        let any_or = |wanted: &[String], value: &str| {
            wanted.is_empty() || wanted.iter().any(|w| w.eq_ignore_ascii_case(value))
        };
        any_or(&self.regions, region) && any_or(&self.services, service)
    }
}

/// Reads `path` and returns the selected prefixes as allow entries, one per
/// network (a prefix listed for several services appears once), each with a
/// comment naming its origin.
pub fn read(path: &Path, selection: &Selection) -> Result<Vec<Entry>, ImportError> {
    let text = crate::files::read_bounded_text(path, MAX_FILE_BYTES).at("read", path)?;
    parse(&text, path, selection)
}

fn parse(text: &str, path: &Path, selection: &Selection) -> Result<Vec<Entry>, ImportError> {
    let ranges: IpRanges = serde_json::from_str(text)
        .map_err(|source| ImportError::Format { path: path.to_owned(), source })?;
    let v4 = ranges.prefixes.iter().map(|p| (&p.ip_prefix, &p.region, &p.service));
    let v6 = ranges.ipv6_prefixes.iter().map(|p| (&p.ipv6_prefix, &p.region, &p.service));
    let mut entries: std::collections::BTreeMap<IpNet, Entry> = std::collections::BTreeMap::new();
    for (prefix, region, service) in v4.chain(v6) {
        if !selection.selects(region, service) {
            continue;
        }
        let cidr = allowlist::parse_cidr(prefix).map_err(|source| ImportError::Prefix {
            path: path.to_owned(),
            prefix: prefix.clone(),
            source,
        })?;
        entries.entry(cidr).or_insert_with(|| Entry {
            cidr,
            action: Action::Allow,
            comment: Some(format!("{COMMENT_TAG} {service} {region} {}", ranges.sync_token)),
        });
    }
    if entries.is_empty() {
        return Err(ImportError::NothingSelected { path: path.to_owned() });
    }
    Ok(entries.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = r#"{
      "syncToken": "1700000000",
      "createDate": "2026-11-01-00-00-00",
      "prefixes": [
        {"ip_prefix": "3.5.140.0/22", "region": "eu-west-1", "service": "AMAZON", "network_border_group": "eu-west-1"},
        {"ip_prefix": "3.5.140.0/22", "region": "eu-west-1", "service": "EC2", "network_border_group": "eu-west-1"},
        {"ip_prefix": "13.34.0.0/23", "region": "us-east-1", "service": "EC2", "network_border_group": "us-east-1"}
      ],
      "ipv6_prefixes": [
        {"ipv6_prefix": "2a05:d018::/36", "region": "eu-west-1", "service": "EC2", "network_border_group": "eu-west-1"}
      ]
    }"#;

    fn import(selection: &Selection) -> Result<Vec<Entry>, ImportError> {
        parse(FIXTURE, Path::new("ip-ranges.json"), selection)
    }

    #[test]
    fn selects_by_region_and_service_and_collapses_duplicates() {
        let all = import(&Selection::default()).unwrap();
        assert_eq!(all.len(), 3);
        let eu_ec2 = Selection { regions: vec!["eu-west-1".into()], services: vec!["ec2".into()] };
        let entries = import(&eu_ec2).unwrap();
        let cidrs: Vec<String> = entries.iter().map(|e| e.cidr.to_string()).collect();
        assert_eq!(cidrs, ["3.5.140.0/22", "2a05:d018::/36"]);
        assert_eq!(entries[0].comment.as_deref(), Some("aws-ip-ranges EC2 eu-west-1 1700000000"));
    }

    #[test]
    fn bad_files_are_refused() {
        let path = Path::new("x.json");
        assert!(matches!(
            parse("{\"prefixes\": []}", path, &Selection::default()),
            Err(ImportError::Format { .. })
        ));
        let bad = FIXTURE.replace("13.34.0.0/23", "13.34.0.1/23");
        assert!(matches!(
            parse(&bad, path, &Selection::default()),
            Err(ImportError::Prefix { .. })
        ));
        let nowhere = Selection { regions: vec!["mars-1".into()], ..Selection::default() };
        assert!(matches!(import(&nowhere), Err(ImportError::NothingSelected { .. })));
    }
}
