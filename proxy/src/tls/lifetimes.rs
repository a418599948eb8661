//! When a listener's certificates and CRLs stop being usable, for `/metrics`,
//! `status` and `check`.

use std::path::{Path, PathBuf};

/// Which of a listener's files a [`Lifetime`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifetimeKind {
    /// The server certificate (`cert`'s leaf).
    Server,
    /// The client CA bundle (`client_ca`): its certificate that expires first.
    ClientCa,
    /// The CRLs (`crl`): the one due for its next update first.
    Crl,
}

impl LifetimeKind {
    /// The name in `/metrics` and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::ClientCa => "client_ca",
            Self::Crl => "crl",
        }
    }

    /// The config key of the file.
    pub fn key(self) -> &'static str {
        match self {
            Self::Server => "cert",
            Self::ClientCa => "client_ca",
            Self::Crl => "crl",
        }
    }
}

/// A validity window, in Unix seconds: a certificate's notBefore/notAfter, a
/// CRL's thisUpdate/nextUpdate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lifetime {
    pub kind: LifetimeKind,
    pub path: PathBuf,
    /// The certificate's subject, or the CRL's issuer.
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// The validity of a certificate that rustls accepted; `None` only if
/// x509-parser reads it differently.
pub(super) fn certificate_lifetime(
    kind: LifetimeKind,
    path: &Path,
    der: &[u8],
) -> Option<Lifetime> {
    use x509_parser::prelude::FromDer as _;
    let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let validity = certificate.validity();
    Some(Lifetime {
        kind,
        path: path.to_owned(),
        subject: certificate.subject().to_string(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// When a CRL was issued and is due again; `None` without a nextUpdate.
pub(super) fn crl_lifetime(path: &Path, der: &[u8]) -> Option<Lifetime> {
    use x509_parser::prelude::FromDer as _;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).ok()?;
    Some(Lifetime {
        kind: LifetimeKind::Crl,
        path: path.to_owned(),
        subject: crl.issuer().to_string(),
        not_before: crl.last_update().timestamp(),
        not_after: crl.next_update()?.timestamp(),
    })
}
