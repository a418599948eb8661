//! Values TOML has no type for: durations ("10s") and networks, read as the
//! allowlist reads them.

use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// A duration such as "10s", "5m" or "1h"; the error says so.
pub(super) fn duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration ({e}): write a number and a unit, e.g. \"10s\", \"5m\" \
             or \"1h\""
        ))
    })
}

/// The form [`duration`] reads back: the worker receives listener configs
/// as the gate serializes them.
pub(super) fn duration_text<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

/// Networks written as the allowlist writes them, refused as it refuses them
/// (host bits set, a prefix length beyond the family's, IPv4-mapped).
pub(super) fn networks<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| crate::allowlist::parse_cidr(text).map_err(serde::de::Error::custom))
        .collect()
}
