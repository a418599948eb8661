//! Why a connection is turned away: one name per reason, for the access
//! log, `status` and `/metrics`, and the mapping from TLS errors.

use std::{fmt, io};

use rustls::CertificateError;

/// Why a client was turned away, as logged and counted. The variants are in
/// [`Rejection::ALL`]'s order, which is also their counter index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    NoCertificate,
    UnknownCa,
    Expired,
    NotYetValid,
    Revoked,
    IdentityNotAllowed,
    WrongKeyUsage,
    BadCertificate,
    /// The TLS handshake failed for another reason (protocol, ciphers, garbage).
    Handshake,
    Timeout,
    ProxyHeaderInvalid,
    UntrustedProxy,
    /// The client address (from PROXY or the socket) is not allowed by the list.
    SourceNotAllowed,
    OverLimit,
}

impl Rejection {
    /// Every rejection, in declaration order.
    pub const ALL: [Self; 14] = [
        Self::NoCertificate,
        Self::UnknownCa,
        Self::Expired,
        Self::NotYetValid,
        Self::Revoked,
        Self::IdentityNotAllowed,
        Self::WrongKeyUsage,
        Self::BadCertificate,
        Self::Handshake,
        Self::Timeout,
        Self::ProxyHeaderInvalid,
        Self::UntrustedProxy,
        Self::SourceNotAllowed,
        Self::OverLimit,
    ];

    /// Its position in [`Self::ALL`] (a test checks that the two agree).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::IdentityNotAllowed => "identity_not_allowed",
            Self::WrongKeyUsage => "wrong_key_usage",
            Self::BadCertificate => "bad_certificate",
            Self::Handshake => "handshake_failed",
            Self::Timeout => "timeout",
            Self::ProxyHeaderInvalid => "proxy_header_invalid",
            Self::UntrustedProxy => "untrusted_proxy",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::OverLimit => "over_limit",
        }
    }

    /// Classifies a failed server handshake.
    pub fn from_handshake_error(error: &io::Error) -> Self {
        match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(error) => Self::from_tls_error(error),
            None => Self::Handshake,
        }
    }

    /// Why the client's certificate, or its handshake, was refused.
    pub fn from_tls_error(error: &rustls::Error) -> Self {
        match error {
            rustls::Error::NoCertificatesPresented => Self::NoCertificate,
            rustls::Error::InvalidCertificate(certificate) => match certificate {
                CertificateError::UnknownIssuer => Self::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                CertificateError::Revoked => Self::Revoked,
                CertificateError::ApplicationVerificationFailure => Self::IdentityNotAllowed,
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => Self::WrongKeyUsage,
                _ => Self::BadCertificate,
            },
            _ => Self::Handshake,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_rejection_at_its_index() {
        for (index, rejection) in Rejection::ALL.into_iter().enumerate() {
            assert_eq!(rejection.index(), index, "{rejection}");
        }
        let names: std::collections::BTreeSet<&str> =
            Rejection::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Rejection::ALL.len(), "names are unique");
    }

    fn handshake_error(error: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, error)
    }

    /// Each certificate error a client can cause, and the reason it is counted under.
    #[test]
    fn certificate_errors_map_to_their_reasons() {
        use rustls::Error;
        let cases = [
            (Error::NoCertificatesPresented, Rejection::NoCertificate),
            (Error::InvalidCertificate(CertificateError::UnknownIssuer), Rejection::UnknownCa),
            (Error::InvalidCertificate(CertificateError::Expired), Rejection::Expired),
            (Error::InvalidCertificate(CertificateError::NotValidYet), Rejection::NotYetValid),
            (Error::InvalidCertificate(CertificateError::Revoked), Rejection::Revoked),
            (
                Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
                Rejection::IdentityNotAllowed,
            ),
            (Error::InvalidCertificate(CertificateError::InvalidPurpose), Rejection::WrongKeyUsage),
            (Error::InvalidCertificate(CertificateError::BadSignature), Rejection::BadCertificate),
            (Error::InvalidCertificate(CertificateError::BadEncoding), Rejection::BadCertificate),
            (Error::DecryptError, Rejection::Handshake),
            (Error::General("x".into()), Rejection::Handshake),
        ];
        for (error, expected) in cases {
            let text = format!("{error:?}");
            assert_eq!(
                Rejection::from_handshake_error(&handshake_error(error)),
                expected,
                "{text}"
            );
        }
        let plain = io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer");
        assert_eq!(Rejection::from_handshake_error(&plain), Rejection::Handshake);
    }
}
