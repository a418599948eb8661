//! Throwaway PKIs for the mTLS tests: CAs, server and client certificates
//! (good and every kind of bad), and CRLs, written as PEM files.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// A certificate authority whose files live in `dir`.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA certificate (PEM), what a peer trusts.
    pub cert: PathBuf,
}

/// What a leaf certificate says, and when it is valid.
#[derive(Clone)]
pub struct Leaf {
    pub common_name: String,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub usages: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Leaf {
    /// A client certificate valid from yesterday for a year.
    pub fn client(common_name: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: common_name.to_owned(),
            dns: Vec::new(),
            uris: Vec::new(),
            usages: vec![ExtendedKeyUsagePurpose::ClientAuth],
            not_before: now - Duration::days(1),
            not_after: now + Duration::days(365),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(names: &[&str]) -> Self {
        Self {
            dns: names.iter().map(|n| (*n).to_owned()).collect(),
            usages: vec![ExtendedKeyUsagePurpose::ServerAuth],
            ..Self::client(names.first().copied().unwrap_or("server"))
        }
    }
}

/// The files of an issued certificate.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: u64,
}

impl Authority {
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = distinguished_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, issuer.pem()).expect("write CA");
        Self { issuer, dir: dir.to_owned(), cert }
    }

    /// Issues `leaf` (ECDSA P-256) and writes `<stem>.pem` (leaf, then this
    /// CA) and `<stem>.key`.
    pub fn issue(&self, stem: &str, leaf: &Leaf) -> Issued {
        self.issue_with_key(stem, leaf, KeyPair::generate().expect("leaf key"))
    }

    /// As [`Self::issue`], for a key of the caller's choosing.
    pub fn issue_with_key(&self, stem: &str, leaf: &Leaf, key: KeyPair) -> Issued {
        static SERIAL: AtomicU64 = AtomicU64::new(1000);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = distinguished_name(&leaf.common_name);
        params.subject_alt_names = leaf
            .dns
            .iter()
            .map(|name| match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().expect("DNS name")),
            })
            .chain(leaf.uris.iter().map(|uri| SanType::URI(uri.clone().try_into().expect("URI"))))
            .collect();
        params.extended_key_usages = leaf.usages.clone();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = leaf.not_before;
        params.not_after = leaf.not_after;
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        let certificate = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let cert = self.dir.join(format!("{stem}.pem"));
        let key_path = self.dir.join(format!("{stem}.key"));
        std::fs::write(&cert, format!("{}{}", certificate.pem(), self.issuer.pem()))
            .expect("write");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        Issued { cert, key: key_path, serial }
    }

    /// A CRL revoking `serials`, written to `<stem>.crl.pem`.
    pub fn crl(&self, stem: &str, serials: &[u64]) -> PathBuf {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from(1),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: now - Duration::minutes(30),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).expect("sign CRL");
        let path = self.dir.join(format!("{stem}.crl.pem"));
        std::fs::write(&path, crl.pem().expect("CRL PEM")).expect("write CRL");
        path
    }
}

/// A rustls client config that trusts `ca` and presents `cert` (if any),
/// limited to `versions`: what the demo, the tests and the benches connect with.
pub fn client_config(
    ca: &Path,
    cert: Option<&Issued>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<rustls::ClientConfig> {
    client_config_with(rustls::crypto::aws_lc_rs::default_provider(), ca, cert, versions)
}

/// As [`client_config`], with the given algorithms (a benchmark pins the key exchange).
pub fn client_config_with(
    provider: rustls::crypto::CryptoProvider,
    ca: &Path,
    cert: Option<&Issued>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca)? {
        roots.add(certificate?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    Ok(match cert {
        Some(issued) => {
            let chain =
                CertificateDer::pem_file_iter(&issued.cert)?.collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&issued.key)?)?
        }
        None => builder.with_no_client_auth(),
    })
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "edgegate tests");
    name
}
