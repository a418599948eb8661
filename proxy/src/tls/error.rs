//! Why a listener's TLS files are refused, in words that name the config key,
//! the file, the real cause and the fix (rustls's own texts show debug output).

use std::{
    fmt, io,
    path::{Path, PathBuf},
};

use rustls::{CertRevocationListError, CertificateError};

use super::TicketKeysError;

/// Why a listener's TLS files are refused. Messages name the config key,
/// the file, the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or holds nothing usable.
    #[error("`{key}` {}: {problem}", path.display())]
    File { key: &'static str, path: PathBuf, problem: FileProblem },
    /// The private key belongs to none of the chain's certificates.
    #[error(
        "{key}: this private key does not belong to the certificate in {cert} (their public \
         keys differ): install the key that was generated with this certificate"
    )]
    KeyMismatch { cert: Named, key: Named },
    /// The private key belongs to a later certificate of the chain: the
    /// chain is out of order (often the CA first).
    #[error(transparent)]
    ChainOrder(Box<ChainOrder>),
    /// A passphrase protects the private key, and the daemon has none to give.
    #[error(
        "`{key}` {}: the private key is encrypted with a passphrase; edgegate reads unencrypted \
         keys only: decrypt it (`openssl pkey -in {} -out NEW.key`), keep NEW.key mode 600 \
         (`chmod 600`) and name it in `{key}`",
        path.display(),
        path.display()
    )]
    EncryptedKey { key: &'static str, path: PathBuf },
    /// rustls refused the settings (the protocol versions), or found no randomness.
    #[error("`{key}`: {source}")]
    Rustls {
        key: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// The session-ticket key file holds no usable keys.
    #[error("`tls_ticket_keys` {}: {source}", path.display())]
    TicketKeys {
        path: PathBuf,
        #[source]
        source: TicketKeysError,
    },
    /// An `allow_*` pattern is not a glob (`Config::parse` refuses these first).
    #[error("identity rules: {0}")]
    Pattern(#[source] globset::Error),
    /// `backend_tls.server_name` is neither a DNS name nor an IP address.
    #[error("`backend_tls.server_name`: `{0}` is not a DNS name or an IP address")]
    ServerName(String),
}

/// A chain whose certificate the key belongs to is not the first.
#[derive(Debug, thiserror::Error)]
#[error(
    "the chain in {cert} is out of order: {key} belongs to its certificate number {position}, \
     `{subject}`{}; put that (leaf) certificate first, then its issuers, each followed by the \
     one that signed it",
    first_ca.as_ref().map_or_else(String::new, |ca| format!(
        ", and the first, `{ca}`, is a CA (CA:TRUE)"
    ))
)]
pub struct ChainOrder {
    pub cert: Named,
    pub key: Named,
    /// From 1.
    pub position: usize,
    pub subject: String,
    /// The first certificate's subject, if it is a CA.
    pub first_ca: Option<String>,
}

/// A file as messages name it: its config key and its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub key: &'static str,
    pub path: PathBuf,
}

impl Named {
    pub(super) fn new(key: &'static str, path: &Path) -> Self {
        Self { key, path: path.to_owned() }
    }
}

impl fmt::Display for Named {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.key, self.path.display())
    }
}

/// What is wrong with one file.
#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    #[error("cannot be read: {0}")]
    Unreadable(#[source] io::Error),
    #[error("is not valid PEM: {0}")]
    Syntax(#[source] PemProblem),
    #[error("holds no certificate (no `-----BEGIN CERTIFICATE-----` block)")]
    NoCertificate,
    #[error(
        "holds no private key (PKCS#8, PKCS#1 or SEC1 PEM: `-----BEGIN PRIVATE KEY-----`, \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY`)"
    )]
    NoKey,
    #[error("holds no CRL (no `-----BEGIN X509 CRL-----` block; {found}): give the CA's CRL")]
    NoCrl { found: Labels },
    #[error(
        "holds a private key rustls cannot sign with: it takes RSA (2048 bits or more), ECDSA \
         (P-256, P-384, P-521) or Ed25519 keys"
    )]
    UnusableKey,
    /// webpki parses version 3 certificates only (trust anchors aside).
    #[error(
        "the certificate `{subject}` is X.509 version {version}; rustls accepts only version 3: \
         reissue it as version 3 (`openssl x509 -req` makes one when given extensions with \
         `-extfile`, e.g. `subjectAltName` and `basicConstraints = CA:FALSE`)"
    )]
    OldVersion { subject: String, version: u32 },
    #[error("holds a certificate rustls cannot use: {}", CertificateCause(.0))]
    BadCertificate(#[source] Box<rustls::Error>),
    #[error("holds a certificate the trust store refuses: {}", CertificateCause(.0))]
    BadCa(#[source] Box<rustls::Error>),
    /// A client CA bundle certificate that vouches for no client.
    #[error(
        "the certificate `{subject}` is not a CA (CA:FALSE): no client certificate chains to \
         it; give the CA that issues the partner's certificates (this one's issuer is \
         `{issuer}`)"
    )]
    NotACa { subject: String, issuer: String },
    #[error("is no CRL rustls can use: {}", CrlCause(.0))]
    Crl(Box<CertRevocationListError>),
    #[error(
        "is readable by other users (mode {0:03o}): whoever reads it can decrypt recorded \
         sessions; `chmod 600` it"
    )]
    Exposed(u32),
}

/// Why a PEM file does not parse, in words (the parser's own messages
/// print bytes as Rust arrays).
#[derive(Debug, thiserror::Error)]
pub enum PemProblem {
    #[error("its `{0}` block has no `-----END {0}-----` line: the file is cut short")]
    Unterminated(String),
    #[error("`{0}` is not a PEM begin line (`-----BEGIN LABEL-----`)")]
    BadBeginLine(String),
    #[error("a block's body is not base64: the file is damaged or was edited")]
    Base64,
    #[error("a block is larger than 256 MB")]
    TooLarge,
    #[error("{0}")]
    Other(String),
}

/// The PEM block labels a file holds, for "holds no X" messages: a key file
/// named as `cert`, or a certificate as `key`, shows at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels(Vec<String>);

impl Labels {
    pub(super) fn of(pem: &[u8]) -> Self {
        let mut labels = Vec::new();
        for line in String::from_utf8_lossy(pem).lines() {
            let label =
                line.trim().strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----"));
            if let Some(label) = label
                && !labels.iter().any(|known| known == label)
            {
                labels.push(label.to_owned());
            }
        }
        Self(labels)
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("it has no PEM block at all");
        }
        f.write_str("it has ")?;
        for (index, label) in self.0.iter().enumerate() {
            write!(f, "{}`{label}`", if index == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

/// rustls's reason for refusing a certificate, in words: its own text shows
/// webpki's reasons as Rust debug text (`Other(OtherError(..))`).
struct CertificateCause<'a>(&'a rustls::Error);

impl fmt::Display for CertificateCause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding) => {
                f.write_str("it is not valid DER (a damaged file, or not a certificate)")
            }
            // webpki's reason, which has no words of its own (e.g. an
            // unsupported critical extension).
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                write!(f, "webpki cannot parse it ({other})")
            }
            other => write!(f, "{other}"),
        }
    }
}

/// Why webpki refuses a CRL, in words (rustls prints its debug text).
struct CrlCause<'a>(&'a CertRevocationListError);

impl fmt::Display for CrlCause<'_> {
    #[allow(deprecated, reason = "`UnsupportedSignatureAlgorithm`, which rustls may still give")]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use CertRevocationListError as E;
        f.write_str(match self.0 {
            // webpki's reasons rustls has no name for (e.g. trailing data)
            // are parse failures too: a verifier only parses CRLs when built.
            E::ParseError | E::Other(_) => {
                "it does not parse as one (a PEM `X509 CRL` block or DER): give the CA's CRL \
                 (`openssl crl -in FILE -noout -text` reads one)"
            }
            E::UnsupportedCrlVersion => {
                "it is not an X.509 version 2 CRL: have the CA issue a v2 CRL"
            }
            E::UnsupportedCriticalExtension => {
                "it has a critical extension webpki does not support"
            }
            E::UnsupportedDeltaCrl => "it is a delta CRL: give the CA's complete CRL",
            E::UnsupportedIndirectCrl => {
                "it is an indirect CRL (it lists other CAs' certificates): give each CA's own CRL"
            }
            E::UnsupportedRevocationReason => {
                "it lists a revocation reason RFC 5280 does not define"
            }
            E::InvalidCrlNumber => "its CRL number is not a valid positive integer",
            E::InvalidRevokedCertSerialNumber => "it lists a serial number that is not valid",
            E::IssuerInvalidForCrl => "its issuer may not sign CRLs (no cRLSign key usage)",
            E::BadSignature => "its signature does not verify with its issuer's key",
            E::UnsupportedSignatureAlgorithm
            | E::UnsupportedSignatureAlgorithmContext { .. }
            | E::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                "it is signed with an algorithm rustls does not support"
            }
            other => return write!(f, "rustls refuses it ({other:?})"),
        })
    }
}

pub(super) fn file_error<'a>(
    key: &'static str,
    path: &'a Path,
) -> impl Fn(FileProblem) -> TlsError + 'a {
    move |problem| TlsError::File { key, path: path.to_owned(), problem }
}

/// Why a PEM file does not parse, in words.
pub fn pem_problem(error: rustls::pki_types::pem::Error) -> FileProblem {
    use rustls::pki_types::pem::Error as E;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    FileProblem::Syntax(match error {
        E::Io(e) => return FileProblem::Unreadable(e),
        E::MissingSectionEnd { end_marker } => PemProblem::Unterminated(text(&end_marker)),
        E::IllegalSectionStart { line } => PemProblem::BadBeginLine(text(&line)),
        E::Base64Decode(_) => PemProblem::Base64,
        E::SectionTooLarge => PemProblem::TooLarge,
        // `NoItemsFound`: each caller says what it missed.
        other => PemProblem::Other(other.to_string()),
    })
}
