//! Checks of a listener's certificates that rustls does not make, or makes
//! without naming the file and the fix: the key belongs to the chain's first
//! certificate, served certificates are X.509 v3, `client_ca` holds CAs.

use std::{path::Path, sync::Arc};

use rustls::{
    pki_types::CertificateDer,
    sign::{CertifiedKey, SigningKey},
};

use super::{
    error::{ChainOrder, FileProblem, Named, TlsError, file_error},
    identity::parse_certificate,
};

/// `chain` with `key`, checked to belong together where the key can tell
/// (a stand-in for a key in the gate cannot: the gate checked it).
pub(super) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &Arc<dyn SigningKey>,
    cert_file: Named,
    key_file: Named,
) -> Result<CertifiedKey, TlsError> {
    let certified = CertifiedKey::new(chain, Arc::clone(key));
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(mismatch(&certified, cert_file, key_file))
        }
        // The chain's leaf does not parse: the certificate is to blame.
        Err(source) => Err(TlsError::File {
            key: cert_file.key,
            path: cert_file.path,
            problem: FileProblem::BadCertificate(Box::new(source)),
        }),
    }
}

/// Why the key is not the first certificate's: it belongs to a later one
/// (the chain is out of order, often CA first), or to none.
fn mismatch(certified: &CertifiedKey, cert: Named, key: Named) -> TlsError {
    let belongs = |der: &CertificateDer<'static>| {
        CertifiedKey::new(vec![der.clone()], Arc::clone(&certified.key)).keys_match().is_ok()
    };
    let Some(index) = certified.cert.iter().position(belongs) else {
        return TlsError::KeyMismatch { cert, key };
    };
    let first = certified.cert.first().and_then(|der| parse_certificate(der));
    TlsError::ChainOrder(Box::new(ChainOrder {
        cert,
        key,
        position: index + 1,
        subject: parse_certificate(&certified.cert[index])
            .map_or_else(String::new, |c| subject(&c)),
        first_ca: first.filter(is_ca).map(|c| subject(&c)),
    }))
}

/// A certificate's subject as messages quote it.
fn subject(certificate: &x509_parser::certificate::X509Certificate<'_>) -> String {
    match certificate.subject().to_string() {
        subject if subject.is_empty() => "(empty subject)".to_owned(),
        subject => subject,
    }
}

/// Whether a certificate says CA:TRUE.
fn is_ca(certificate: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    certificate.basic_constraints().ok().flatten().is_some_and(|constraints| constraints.value.ca)
}

fn self_issued(certificate: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    certificate.subject().as_raw() == certificate.issuer().as_raw()
}

/// Refuses a version 1 or 2 certificate in a chain the listener presents,
/// naming it: rustls's own refusal names neither the file nor the
/// certificate. A self-signed root at the end may be any version (peers
/// take roots from their own trust store).
pub(super) fn served_versions(
    key: &'static str,
    path: &Path,
    chain: &[CertificateDer<'static>],
) -> Result<(), TlsError> {
    for (index, der) in chain.iter().enumerate() {
        // One that does not parse: `certified_key` says why.
        let Some(certificate) = parse_certificate(der) else { continue };
        let version = certificate.version();
        if version != x509_parser::x509::X509Version::V3
            && (index == 0 || !self_issued(&certificate))
        {
            return Err(file_error(key, path)(FileProblem::OldVersion {
                subject: subject(&certificate),
                version: version.0 + 1,
            }));
        }
    }
    Ok(())
}

/// Refuses a `client_ca` certificate that is not a CA: no client
/// certificate chains to it, so every partner would be refused (it is
/// typically the partner's own certificate, or the server's). A
/// self-signed one is its own anchor (a pinned client), and version 1 roots
/// predate basicConstraints: both are taken as given.
pub(super) fn client_authorities(
    path: &Path,
    cas: &[CertificateDer<'static>],
) -> Result<(), TlsError> {
    for der in cas {
        // One that does not parse: `root_store` says why.
        let Some(certificate) = parse_certificate(der) else { continue };
        if certificate.version() == x509_parser::x509::X509Version::V3
            && !is_ca(&certificate)
            && !self_issued(&certificate)
        {
            return Err(file_error("client_ca", path)(FileProblem::NotACa {
                subject: subject(&certificate),
                issuer: certificate.issuer().to_string(),
            }));
        }
    }
    Ok(())
}
