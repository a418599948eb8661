//! Who a client certificate names (subject CN, DNS and URI SANs) and the
//! listener's rules over those names.

use std::fmt;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::ListenerConfig;

/// The client identities a listener accepts: globs over the subject CN, DNS
/// SANs and URI SANs. With no rule at all, any certificate from the CA passes.
#[derive(Default)]
pub struct IdentityRules {
    common_name: GlobSet,
    dns: GlobSet,
    uri: GlobSet,
}

impl IdentityRules {
    pub fn new(listener: &ListenerConfig) -> Result<Self, globset::Error> {
        let set = |patterns: &[String]| {
            patterns
                .iter()
                .try_fold(GlobSetBuilder::new(), |mut builder, pattern| {
                    builder.add(Glob::new(pattern)?);
                    Ok::<_, globset::Error>(builder)
                })?
                .build()
        };
        Ok(Self {
            common_name: set(&listener.allow_cn)?,
            dns: set(&listener.allow_dns)?,
            uri: set(&listener.allow_uri)?,
        })
    }

    /// Whether a certificate known by `name` passes the rules.
    pub fn allows_name(&self, name: &ClientName) -> bool {
        if self.common_name.is_empty() && self.dns.is_empty() && self.uri.is_empty() {
            return true;
        }
        name.common_name.as_ref().is_some_and(|cn| self.common_name.is_match(cn))
            || name.dns.iter().any(|dns| self.dns.is_match(dns))
            || name.uris.iter().any(|uri| self.uri.is_match(uri))
    }
}

/// What a client certificate says about its holder, for rules and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    /// The names the certificate is known by, which the identity rules
    /// match (its serial aside: a renewed certificate is the same partner).
    pub name: ClientName,
    pub serial: String,
}

impl Identity {
    /// Parses a DER certificate; `None` if it does not parse (the verifier
    /// has already refused such a certificate).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let certificate = parse_certificate(der)?;
        Some(Self {
            subject: certificate.subject().to_string(),
            name: ClientName::of(&certificate),
            serial: certificate.raw_serial_as_string(),
        })
    }
}

pub(super) fn parse_certificate(
    der: &[u8],
) -> Option<x509_parser::certificate::X509Certificate<'_>> {
    use x509_parser::prelude::FromDer as _;
    let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(certificate)
}

/// Who a client certificate names: its CN and SANs.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct ClientName {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uris: Vec<String>,
}

impl ClientName {
    fn of(certificate: &x509_parser::certificate::X509Certificate<'_>) -> Self {
        use x509_parser::extensions::GeneralName;
        let common_name = certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut name = Self { common_name, ..Self::default() };
        if let Ok(Some(san)) = certificate.subject_alternative_name() {
            for general_name in &san.value.general_names {
                match general_name {
                    GeneralName::DNSName(dns) => name.dns.push((*dns).to_owned()),
                    GeneralName::URI(uri) => name.uris.push((*uri).to_owned()),
                    _ => {}
                }
            }
        }
        name
    }

    /// Every name, for bounds checks on what a worker reports.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.common_name.iter().chain(&self.dns).chain(&self.uris).map(String::as_str)
    }
}

/// `CN=a, DNS=b, URI=c`; names are printed as the certificate has them,
/// control characters (which no list comment may hold) as `?`.
impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labelled = self
            .common_name
            .iter()
            .map(|n| ("CN", n))
            .chain(self.dns.iter().map(|n| ("DNS", n)))
            .chain(self.uris.iter().map(|n| ("URI", n)));
        let mut first = true;
        for (label, name) in labelled {
            let clean: String =
                name.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
            write!(f, "{}{label}={clean}", if first { "" } else { ", " })?;
            first = false;
        }
        if first {
            f.write_str("(no name)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;
    use crate::config::{Config, Overrides};

    /// A self-signed certificate with these names, as DER.
    fn certificate(common_name: Option<&str>, dns: &[&str], uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        if let Some(cn) = common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.distinguished_name.push(DnType::OrganizationName, "Partner");
        params.subject_alt_names = dns
            .iter()
            .map(|name| SanType::DnsName((*name).try_into().expect("DNS name")))
            .chain(uris.iter().map(|uri| SanType::URI((*uri).try_into().expect("URI"))))
            .collect();
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").der().to_vec()
    }

    fn identity(common_name: Option<&str>, dns: &[&str], uris: &[&str]) -> Identity {
        Identity::from_der(&certificate(common_name, dns, uris)).expect("parses")
    }

    /// The identity rules of a listener with these `allow_*` keys.
    fn rules(keys: &str) -> IdentityRules {
        let text = format!(
            "[filter]\ninterfaces = [\"eth0\"]\n[[listener]]\nname = \"edge\"\n\
             bind = \"0.0.0.0:8443\"\nbackend = \"127.0.0.1:8080\"\ncert = \"c\"\nkey = \"k\"\n\
             client_ca = \"ca\"\n{keys}\n"
        );
        let config = Config::parse(&text, Path::new("edgegate.toml"), &Overrides::default())
            .expect("config");
        IdentityRules::new(&config.listeners[0]).expect("patterns")
    }

    #[test]
    fn identity_reads_the_subject_cn_and_every_san() {
        let identity = identity(
            Some("gateway"),
            &["api.partner.example", "b.partner.example"],
            &["spiffe://partner.example/gateway"],
        );
        assert_eq!(identity.name.common_name.as_deref(), Some("gateway"));
        assert!(identity.subject.contains("CN=gateway"), "{}", identity.subject);
        assert_eq!(identity.name.dns, ["api.partner.example", "b.partner.example"]);
        assert_eq!(identity.name.uris, ["spiffe://partner.example/gateway"]);
        assert!(!identity.serial.is_empty());
        assert_eq!(Identity::from_der(b"not a certificate"), None);
    }

    #[test]
    fn without_rules_any_certificate_from_the_ca_passes() {
        assert!(rules("").allows_name(&identity(None, &[], &[]).name));
    }

    /// One rule of each kind, and what it lets in: any one matching rule suffices.
    #[test]
    fn identity_rules_match_cn_dns_and_uri_globs() {
        let rules = rules(
            "allow_cn = [\"gateway-?\"]\nallow_dns = [\"*.partner.example\"]\n\
             allow_uri = [\"spiffe://partner.example/*\"]",
        );
        let cases = [
            (identity(Some("gateway-1"), &[], &[]), true),
            (identity(Some("gateway-10"), &[], &[]), false),
            (identity(None, &["api.partner.example"], &[]), true),
            // `*` crosses dots: a deeper name matches too (see the README).
            (identity(None, &["a.b.partner.example"], &[]), true),
            (identity(None, &["partner.example"], &[]), false),
            (identity(None, &["api.partner.example.evil"], &[]), false),
            (identity(None, &[], &["spiffe://partner.example/gateway"]), true),
            (identity(None, &[], &["spiffe://other.example/gateway"]), false),
            (identity(Some("stranger"), &["stranger.example"], &["spiffe://x/y"]), false),
        ];
        for (identity, allowed) in cases {
            assert_eq!(rules.allows_name(&identity.name), allowed, "{identity:?}");
        }
    }
}
