//! TLS for the listeners: server configs that require and verify client
//! certificates (chain, validity, key usage, revocation, identity rules), and
//! client configs for backends that want TLS too.
//!
//! Identity rules are checked inside the handshake, by wrapping WebPKI's
//! verifier: a client whose certificate is valid but not allowed gets a TLS
//! alert (`access_denied`) and never reaches the backend. A resumed session
//! skips the verifier, so [`ListenerTls::recheck`] runs it again on the
//! certificate the session carries: the rules and CRLs in force now decide.

mod tickets;

use std::{
    collections::BTreeMap,
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use globset::{Glob, GlobSet, GlobSetBuilder};
use rustls::{
    CertRevocationListError, CertificateError, ClientConfig, DigitallySignedStruct,
    DistinguishedName, RootCertStore, ServerConfig, SignatureScheme, SupportedProtocolVersion,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{
        CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
        pem::PemObject,
    },
    server::ProducesTickets,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
    sign::SigningKey,
};
use tokio_rustls::TlsConnector;

pub use self::tickets::{
    DATA_KEY_MAX_AGE, DataKey, KEY_LEN as DATA_KEY_LEN, TicketKeys, TicketKeysError, WRAPPED_LEN,
    open_ticket, seal_ticket, wrapped_nonce, wrapped_part,
};
use crate::config::{BackendTlsConfig, ListenerConfig, TlsVersion};

/// A listener's private keys and session-ticket keys as a TLS config uses
/// them: the keys themselves (the gate, `check`), or stand-ins that ask the
/// gate (the worker, see `privsep::keys`).
#[derive(Clone)]
pub struct ListenerKeys {
    pub server: Arc<dyn SigningKey>,
    /// `backend_tls.key`, when the backend wants a client certificate.
    pub backend: Option<Arc<dyn SigningKey>>,
    /// `None` with `session_lifetime = 0` (no resumption).
    pub tickets: Option<Arc<dyn ProducesTickets>>,
}

/// The secrets a listener's files hold, read by the gate.
pub struct Secrets {
    pub server: Arc<dyn SigningKey>,
    pub backend: Option<Arc<dyn SigningKey>>,
    /// The listener's `tls_ticket_keys`, or a key of this process's own.
    pub tickets: Option<Arc<TicketKeys>>,
}

impl Secrets {
    /// Parses the private keys and ticket keys in `material`.
    pub fn read(listener: &ListenerConfig, material: &Material) -> Result<Self, TlsError> {
        let load = |key: &'static str, path: &Path| {
            rustls::crypto::aws_lc_rs::sign::any_supported_type(&private_key(key, path, material)?)
                .map_err(|_| file_error(key, path)(FileProblem::UnusableKey))
        };
        let server = load("key", &listener.key)?;
        let backend = match &listener.backend_tls {
            Some(BackendTlsConfig { key: Some(key), cert: Some(_), .. }) => {
                Some(load("backend_tls.key", key)?)
            }
            _ => None,
        };
        let tickets = if listener.session_lifetime.is_zero() {
            None
        } else {
            Some(Arc::new(match &listener.tls_ticket_keys {
                Some(path) => {
                    let text = material.get("tls_ticket_keys", path)?;
                    TicketKeys::parse(text, listener.session_lifetime)
                        .map_err(|source| TlsError::TicketKeys { path: path.clone(), source })?
                }
                None => TicketKeys::random(listener.session_lifetime)
                    .map_err(|source| TlsError::Rustls { key: "tls_ticket_keys", source })?,
            }))
        };
        Ok(Self { server, backend, tickets })
    }

    /// The keys themselves, for a config built where they are.
    pub fn keys(&self) -> ListenerKeys {
        ListenerKeys {
            server: Arc::clone(&self.server),
            backend: self.backend.clone(),
            tickets: self.tickets.clone().map(|t| t as Arc<dyn ProducesTickets>),
        }
    }
}

/// What a listener needs for TLS, built from its files; swapped whole on reload.
pub struct ListenerTls {
    pub server: Arc<ServerConfig>,
    verifier: Arc<IdentityVerifier>,
    pub backend: Option<BackendTls>,
    /// When its certificates and CRLs stop being usable.
    pub lifetimes: Vec<Lifetime>,
}

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

/// TLS towards the backend.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

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
    fn new(key: &'static str, path: &Path) -> Self {
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
    fn of(pem: &[u8]) -> Self {
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

/// The contents of every file a listener's TLS names, by path. The gate
/// reads them (it may); the worker, which has no file system, builds its
/// [`ListenerTls`] from them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Material {
    files: BTreeMap<PathBuf, Vec<u8>>,
}

impl Material {
    /// What the worker may see of it: every file but those holding a
    /// private key or ticket keys (of a file that holds a certificate as
    /// well as its key, only the certificates).
    pub fn public(&self, listener: &ListenerConfig) -> Self {
        let mut secret: Vec<&Path> = vec![&listener.key];
        secret.extend(listener.tls_ticket_keys.as_deref());
        secret.extend(listener.backend_tls.as_ref().and_then(|tls| tls.key.as_deref()));
        let mut certificates: Vec<&Path> = vec![&listener.cert];
        certificates.extend(listener.backend_tls.as_ref().and_then(|tls| tls.cert.as_deref()));
        let files = self
            .files
            .iter()
            .filter_map(|(path, bytes)| {
                if !secret.contains(&path.as_path()) {
                    Some((path.clone(), bytes.clone()))
                } else if certificates.contains(&path.as_path()) {
                    Some((path.clone(), certificate_blocks(bytes)))
                } else {
                    None
                }
            })
            .collect();
        Self { files }
    }

    /// Reads every file `listener` names.
    pub fn read(listener: &ListenerConfig) -> Result<Self, TlsError> {
        let mut files = BTreeMap::new();
        for (key, path) in listener.files() {
            if !files.contains_key(path) {
                let bytes = std::fs::read(path)
                    .map_err(|e| file_error(key, path)(FileProblem::Unreadable(e)))?;
                files.insert(path.to_owned(), bytes);
            }
        }
        if let Some(path) = &listener.tls_ticket_keys {
            private_to_owner(path).map_err(file_error("tls_ticket_keys", path))?;
        }
        Ok(Self { files })
    }

    /// The bytes of `path`, which `read` read for `key`.
    fn get(&self, key: &'static str, path: &Path) -> Result<&[u8], TlsError> {
        self.files.get(path).map(Vec::as_slice).ok_or_else(|| {
            let missing = io::Error::new(io::ErrorKind::NotFound, "not among the files sent");
            file_error(key, path)(FileProblem::Unreadable(missing))
        })
    }

    /// How many bytes the files hold together.
    pub fn size(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }
}

impl ListenerTls {
    /// Reads and checks every file the listener names.
    pub fn load(listener: &ListenerConfig) -> Result<Self, TlsError> {
        let material = Material::read(listener)?;
        Self::build(listener, &material, &Secrets::read(listener, &material)?.keys())
    }

    /// Checks the listener's files, as read into `material`, and builds the
    /// configs, which use `keys`.
    pub fn build(
        listener: &ListenerConfig,
        material: &Material,
        keys: &ListenerKeys,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(provider());
        let chain = certificates("cert", &listener.cert, material)?;
        served_versions("cert", &listener.cert, &chain)?;
        let client_cas = certificates("client_ca", &listener.client_ca, material)?;
        client_authorities(&listener.client_ca, &client_cas)?;
        let roots = Arc::new(root_store("client_ca", &listener.client_ca, client_cas.clone())?);
        let crls = listener
            .crl
            .iter()
            .map(|path| {
                let crls = revocation_lists(path, material)?;
                // Each file on its own first, so that a refusal names its file.
                WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider.clone())
                    .with_crls(crls.iter().cloned())
                    .build()
                    .map_err(|e| verifier_error(e, &listener.client_ca, path))?;
                Ok((path, crls))
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        let mut lifetimes = Vec::new();
        lifetimes.extend(certificate_lifetime(LifetimeKind::Server, &listener.cert, &chain[0]));
        lifetimes.extend(
            client_cas
                .iter()
                .filter_map(|ca| {
                    certificate_lifetime(LifetimeKind::ClientCa, &listener.client_ca, ca)
                })
                .min_by_key(|l| l.not_after),
        );
        lifetimes.extend(
            crls.iter()
                .flat_map(|(path, crls)| crls.iter().filter_map(|crl| crl_lifetime(path, crl)))
                .min_by_key(|l| l.not_after),
        );
        let crls = crls.into_iter().flat_map(|(_, crls)| crls);
        // Each file passed alone: an error here is about the CA bundle.
        let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .with_crls(crls)
            .build()
            .map_err(|e| verifier_error(e, &listener.client_ca, &listener.client_ca))?;
        let verifier = Arc::new(IdentityVerifier {
            inner: webpki,
            rules: IdentityRules::new(listener).map_err(TlsError::Pattern)?,
        });
        let certified = certified_key(
            chain.clone(),
            &keys.server,
            Named::new("cert", &listener.cert),
            Named::new("key", &listener.key),
        )?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions(listener.min_tls_version))
            .map_err(|source| TlsError::Rustls { key: "min_tls_version", source })?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(Arc::new(OneCertificate(Arc::new(certified))));
        // The server picks the suite, in `SUITES` order: a client's own
        // preference (often AES-256 first) would cost every handshake SHA-384.
        server.ignore_client_order = true;
        // Stateless resumption only: tickets sealed with the listener's
        // shared keys (or a key of the gate's own), never a session cache.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        match &keys.tickets {
            // TLS 1.3 sends rustls's (and OpenSSL's) two tickets per
            // connection: a client that opens connections in parallel needs
            // more than one (with one, `bench handshake`'s clients resumed
            // 74% of connections, not 99%).
            Some(tickets) => server.ticketer = Arc::clone(tickets),
            None => server.send_tls13_tickets = 0,
        }
        let backend = listener
            .backend_tls
            .as_ref()
            .map(|tls| backend_tls(tls, provider, material, keys.backend.as_ref()))
            .transpose()?;
        Ok(Self { server: Arc::new(server), verifier, backend, lifetimes })
    }

    /// Verifies a resumed session's client certificate as a full handshake
    /// would now: a ticket issued before a revocation, an identity rule
    /// change or the certificate's expiry must not outlive it.
    pub fn recheck(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<(), rustls::Error> {
        let Some((end_entity, intermediates)) = chain.and_then(<[_]>::split_first) else {
            return Err(rustls::Error::NoCertificatesPresented);
        };
        self.verifier.verify_client_cert(end_entity, intermediates, UnixTime::now()).map(drop)
    }
}

/// `chain` with `key`, checked to belong together where the key can tell
/// (a stand-in for a key in the gate cannot: the gate checked it).
fn certified_key(
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

/// The one certificate a listener serves (and a backend client presents).
#[derive(Debug)]
struct OneCertificate(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

impl rustls::client::ResolvesClientCert for OneCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Only if the key can sign in a scheme the server accepts.
        self.0.key.choose_scheme(schemes).is_some().then(|| Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The `CERTIFICATE` PEM blocks of `pem`, and nothing else.
fn certificate_blocks(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let mut kept = String::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim_end();
        if line == "-----BEGIN CERTIFICATE-----" {
            inside = true;
        }
        if inside {
            kept.push_str(line);
            kept.push('\n');
        }
        if line == "-----END CERTIFICATE-----" {
            inside = false;
        }
    }
    kept.into_bytes()
}

/// A key file must not be readable by anyone but its owner.
fn private_to_owner(path: &Path) -> Result<(), FileProblem> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).map_err(FileProblem::Unreadable)?.permissions().mode();
    match mode & 0o077 {
        0 => Ok(()),
        _ => Err(FileProblem::Exposed(mode & 0o777)),
    }
}

/// AEAD suites only, cheapest strong one first: AES-128-GCM (AES
/// instructions on x86-64 and Graviton; SHA-256 for the transcript, where
/// SHA-384 costs ~10% of a handshake, see `bench handshake`), then AES-256-GCM,
/// then ChaCha20-Poly1305.
const SUITES: [rustls::SupportedCipherSuite; 9] = {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    [
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// aws-lc-rs with [`SUITES`] in that order.
fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: SUITES.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

fn versions(minimum: TlsVersion) -> &'static [&'static SupportedProtocolVersion] {
    static TLS12_AND_13: [&SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match minimum {
        TlsVersion::Tls12 => &TLS12_AND_13,
        TlsVersion::Tls13 => &TLS13_ONLY,
    }
}

fn backend_tls(
    config: &BackendTlsConfig,
    provider: Arc<CryptoProvider>,
    material: &Material,
    key: Option<&Arc<dyn SigningKey>>,
) -> Result<BackendTls, TlsError> {
    let cas = certificates("backend_tls.ca", &config.ca, material)?;
    let roots = root_store("backend_tls.ca", &config.ca, cas)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(TlsVersion::Tls12))
        .map_err(|source| TlsError::Rustls { key: "backend_tls", source })?
        .with_root_certificates(roots);
    let client = match (&config.cert, &config.key, key) {
        (Some(cert), Some(key_path), Some(key)) => {
            let chain = certificates("backend_tls.cert", cert, material)?;
            served_versions("backend_tls.cert", cert, &chain)?;
            let certified = certified_key(
                chain,
                key,
                Named::new("backend_tls.cert", cert),
                Named::new("backend_tls.key", key_path),
            )?;
            builder.with_client_cert_resolver(Arc::new(OneCertificate(Arc::new(certified))))
        }
        _ => builder.with_no_client_auth(),
    };
    let server_name = ServerName::try_from(config.server_name.clone())
        .map_err(|_| TlsError::ServerName(config.server_name.clone()))?;
    Ok(BackendTls { connector: TlsConnector::from(Arc::new(client)), server_name })
}

fn file_error<'a>(key: &'static str, path: &'a Path) -> impl Fn(FileProblem) -> TlsError + 'a {
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

fn certificates(
    key: &'static str,
    path: &Path,
    material: &Material,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certificates(key, path, material.get(key, path)?)
}

/// The certificates in `bytes`, the contents of `path` named by `key`: at
/// least one.
pub fn parse_certificates(
    key: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = file_error(key, path);
    let chain = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(pem_problem(e)))?;
    if chain.is_empty() {
        return Err(error(FileProblem::NoCertificate));
    }
    Ok(chain)
}

fn private_key(
    key: &'static str,
    path: &Path,
    material: &Material,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_private_key(key, path, material.get(key, path)?)
}

/// The private key in `bytes`, the contents of `path` named by `key`.
pub fn parse_private_key(
    key: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| {
        if encrypted(bytes) {
            return TlsError::EncryptedKey { key, path: path.to_owned() };
        }
        let problem = match e {
            rustls::pki_types::pem::Error::NoItemsFound => FileProblem::NoKey,
            other => pem_problem(other),
        };
        file_error(key, path)(problem)
    })
}

/// Whether `pem` holds a passphrase-protected key: PKCS#8's `ENCRYPTED
/// PRIVATE KEY` (which the PEM reader skips as unknown), or a legacy
/// OpenSSL key's `Proc-Type: 4,ENCRYPTED` header (which it reads as bad base64).
fn encrypted(pem: &[u8]) -> bool {
    String::from_utf8_lossy(pem).lines().map(str::trim).any(|line| {
        line == "-----BEGIN ENCRYPTED PRIVATE KEY-----"
            || (line.starts_with("Proc-Type:") && line.ends_with("ENCRYPTED"))
    })
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
fn served_versions(
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
fn client_authorities(path: &Path, cas: &[CertificateDer<'static>]) -> Result<(), TlsError> {
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

/// A verifier's refusal, blamed on the file at fault: `crl` for a CRL,
/// `client_ca` when it holds no anchor.
fn verifier_error(
    error: rustls::server::VerifierBuilderError,
    client_ca: &Path,
    crl: &Path,
) -> TlsError {
    match error {
        rustls::server::VerifierBuilderError::InvalidCrl(cause) => {
            file_error("crl", crl)(FileProblem::Crl(Box::new(cause)))
        }
        // `certificates` refuses an empty bundle first; kept for rustls's sake.
        _ => file_error("client_ca", client_ca)(FileProblem::NoCertificate),
    }
}

/// Now, in Unix seconds (the unit of [`Lifetime`]).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_secs()).unwrap_or(i64::MAX))
}

/// The validity of a certificate that rustls accepted; `None` only if
/// x509-parser reads it differently.
fn certificate_lifetime(kind: LifetimeKind, path: &Path, der: &[u8]) -> Option<Lifetime> {
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
fn crl_lifetime(path: &Path, der: &[u8]) -> Option<Lifetime> {
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

fn root_store(
    key: &'static str,
    path: &Path,
    certificates: Vec<CertificateDer<'static>>,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates {
        roots
            .add(certificate)
            .map_err(|e| file_error(key, path)(FileProblem::BadCa(Box::new(e))))?;
    }
    Ok(roots)
}

/// CRLs from a PEM file (one or more `X509 CRL` blocks) or a DER file.
fn revocation_lists(
    path: &Path,
    material: &Material,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let error = file_error("crl", path);
    let bytes = material.get("crl", path)?;
    if bytes.starts_with(b"-----") {
        let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error(pem_problem(e)))?;
        if crls.is_empty() {
            return Err(error(FileProblem::NoCrl { found: Labels::of(bytes) }));
        }
        return Ok(crls);
    }
    Ok(vec![CertificateRevocationListDer::from(bytes.to_vec())])
}

/// The client identities a listener accepts: globs over the subject CN, DNS
/// SANs and URI SANs. With no rule at all, any certificate from the CA passes.
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

fn parse_certificate(der: &[u8]) -> Option<x509_parser::certificate::X509Certificate<'_>> {
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
    /// The names of a DER certificate; `None` if it does not parse. Cheaper
    /// than [`Identity::from_der`], which also renders the subject: the
    /// verifier needs only the names, on every handshake.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        parse_certificate(der).as_ref().map(Self::of)
    }

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

/// WebPKI's client verifier plus the listener's identity rules.
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    rules: IdentityRules,
}

impl fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match ClientName::from_der(end_entity) {
            Some(name) if self.rules.allows_name(&name) => Ok(verified),
            _ => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
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
        // The verifier's cheaper read finds the same names.
        let der = certificate(Some("gateway"), &["api.partner.example"], &["spiffe://p/g"]);
        let name = ClientName::from_der(&der).expect("parses");
        assert_eq!(Some(name), Identity::from_der(&der).map(|identity| identity.name));
        assert_eq!(ClientName::from_der(b"not a certificate"), None);
    }

    /// An X.509 version 1 certificate and its key, made once with OpenSSL 3
    /// (`openssl x509 -req` without extensions makes version 1; rcgen
    /// cannot): `openssl req -new -key v1.key -subj /CN=legacy.partner.example
    /// | openssl x509 -req -key v1.key -days 36500`.
    const V1_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBPzCB5QIUFLwzMvjCTfN/l7Z9QTqb5TxepZwwCgYIKoZIzj0EAwIwITEfMB0G
A1UEAwwWbGVnYWN5LnBhcnRuZXIuZXhhbXBsZTAgFw0yNjEyMDcwMzA1MzRaGA8y
MTI2MTExMzAzMDUzNFowITEfMB0GA1UEAwwWbGVnYWN5LnBhcnRuZXIuZXhhbXBs
ZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMVm+OypfkJqW7520jTBKWUgSfSZ
jh3eWKDkaNeGCaQGcatCbniwypQz8v87k6yrWC7EgyWk6C//nghr+NlNfZ0wCgYI
KoZIzj0EAwIDSQAwRgIhAOfxCzwyxor2BOpgYqfUBVOJyiHSqTHfyXIl2WSPPRat
AiEAkFJC2NNUB29s43VhHbVnE4ajcGE2VwTIwYsgtSPwaEo=
-----END CERTIFICATE-----
";
    const V1_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKgWKZsNsYAFVbGni
er23qGFwfFfzf7RWBdvTPl50bGyhRANCAATFZvjsqX5Calu+dtI0wSllIEn0mY4d
3lig5GjXhgmkBnGrQm54sMqUM/L/O5Osq1guxIMlpOgv/54Ia/jZTX2d
-----END PRIVATE KEY-----
";
    /// `V1_KEY` encrypted: `openssl pkcs8 -topk8 -v2 aes256`.
    const PKCS8_ENCRYPTED_KEY: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAjTGfg7MLIl9wICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEBjK+CehOFLgYEyXxfSf07kEgZA1
rbyPOe4b+SpX1svl08nlX9c9DeG7opnx8JInjMVs1AIf9XC3Kzat6bz1qeuCxRIR
gXQhFM4NGdrgsKJW3erdid4Gq3Df68jpiuCJCtCtAoFyBNGgVPldpFkubofon02e
l7fMMQbGnALdIZoDsPCJobWnfdgdQ+Zf2KnyW6YBlJWYFRt+Rce/nBMKk/HEORg=
-----END ENCRYPTED PRIVATE KEY-----
";
    /// `V1_KEY` encrypted the legacy way: `openssl ec -aes256`.
    const LEGACY_ENCRYPTED_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
Proc-Type: 4,ENCRYPTED
DEK-Info: AES-256-CBC,430EEA7848C34C1F9B23087C98967D26

iBxq+aXSaKNoaDTufuTn9kJAuf527I/XahhXKKzRAIYzVG7YJSbaVo1mazripe2F
DlxpJgCXwlt4xHr4wc3EeTfDHAf7WVxJiQ/7EA/sXXyK92m0bIhpG4MjmGKjAqgY
3XgUx44QSQfech+c/5K0KSVJ4DBf4p2N2PZEn2mBfos=
-----END EC PRIVATE KEY-----
";

    /// A listener's files: a CA, the server's chain (leaf, then CA) and
    /// key, a partner's client certificate; bad files are added per case.
    struct Pki {
        dir: tempfile::TempDir,
        ca: crate::demo::pki::Authority,
        server: crate::demo::pki::Issued,
        client: crate::demo::pki::Issued,
    }

    impl Pki {
        fn new() -> Self {
            use crate::demo::pki::{Authority, Leaf};
            let dir = tempfile::tempdir().expect("temp dir");
            let ca = Authority::new(dir.path(), "partner-ca");
            let server = ca.issue("server", &Leaf::server(&["gate.example"]));
            let client = ca.issue("client", &Leaf::client("partner-gateway"));
            Self { dir, ca, server, client }
        }

        fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, contents).expect("write");
            path
        }

        /// The PEM blocks of `path`.
        fn blocks(path: &Path) -> Vec<String> {
            let text = std::fs::read_to_string(path).expect("read");
            let end = "-----END CERTIFICATE-----\n";
            text.split_inclusive(end).map(str::to_owned).collect()
        }

        /// A listener naming these files (`extra`: more keys, e.g. `crl`).
        fn listener(
            &self,
            cert: &Path,
            key: &Path,
            client_ca: &Path,
            extra: &str,
        ) -> ListenerConfig {
            let text = format!(
                "[filter]\ninterfaces = [\"eth0\"]\n[[listener]]\nname = \"edge\"\n\
                 bind = \"0.0.0.0:8443\"\nbackend = \"127.0.0.1:8080\"\ncert = \"{}\"\n\
                 key = \"{}\"\nclient_ca = \"{}\"\n{extra}\n",
                cert.display(),
                key.display(),
                client_ca.display()
            );
            let config = Config::parse(&text, Path::new("edgegate.toml"), &Overrides::default())
                .expect("config");
            config.listeners[0].clone()
        }

        /// The good files, with `client_ca` and `extra` as given.
        fn serving(&self, client_ca: &Path, extra: &str) -> ListenerConfig {
            self.listener(&self.server.cert, &self.server.key, client_ca, extra)
        }
    }

    /// Every bad file names its key, its path and the real cause (and not
    /// a neighbour's key, nor Rust debug text); see issue 33.
    #[test]
    fn bad_files_are_refused_naming_key_path_and_cause() {
        let pki = Pki::new();
        let ca = &pki.ca.cert;
        let server_blocks = Pki::blocks(&pki.server.cert);
        let reversed: String = server_blocks.iter().rev().map(String::as_str).collect();
        let client_leaf = &Pki::blocks(&pki.client.cert)[0];
        let cut_short = &server_blocks[0][..server_blocks[0].len() - 30];
        type Case = (&'static str, ListenerConfig, PathBuf, &'static str, Vec<&'static str>);
        let case = |name, listener, path: &PathBuf, key, cause: &[&'static str]| -> Case {
            (name, listener, path.clone(), key, cause.to_vec())
        };
        let v1 = pki.write("legacy.pem", V1_CERT);
        let v1_key = pki.write("legacy.key", V1_KEY);
        let chain_ca_first = pki.write("ca-first.pem", &reversed);
        let pkcs8_encrypted = pki.write("pkcs8-encrypted.key", PKCS8_ENCRYPTED_KEY);
        let legacy_encrypted = pki.write("legacy-encrypted.key", LEGACY_ENCRYPTED_KEY);
        let garbage_crl = pki.write("garbage.crl", "this is not a CRL\n");
        let garbage_pem_crl = pki
            .write("garbage.crl.pem", "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n");
        let leaf_as_ca = pki.write("partner-leaf.pem", client_leaf);
        let truncated = pki.write("truncated.pem", cut_short);
        let crl = |path: &Path| format!("crl = [\"{}\"]", path.display());
        let cases = [
            case(
                "an X.509 v1 server certificate",
                pki.listener(&v1, &v1_key, ca, ""),
                &v1,
                "cert",
                &["`CN=legacy.partner.example`", "X.509 version 1", "only version 3", "-extfile"],
            ),
            case(
                "a chain in the wrong order (CA first)",
                pki.listener(&chain_ca_first, &pki.server.key, ca, ""),
                &chain_ca_first,
                "cert",
                &["out of order", "`key`", "number 2", "is a CA (CA:TRUE)", "first"],
            ),
            case(
                "a key for no certificate of the chain",
                pki.listener(&pki.server.cert, &pki.client.key, ca, ""),
                &pki.client.key,
                "key",
                &["does not belong to the certificate in `cert`"],
            ),
            case(
                "a PKCS#8 encrypted key",
                pki.listener(&v1, &pkcs8_encrypted, ca, ""),
                &pkcs8_encrypted,
                "key",
                &["encrypted with a passphrase", "openssl pkey -in", "600"],
            ),
            case(
                "a legacy (Proc-Type) encrypted key",
                pki.listener(&v1, &legacy_encrypted, ca, ""),
                &legacy_encrypted,
                "key",
                &["encrypted with a passphrase", "openssl pkey -in", "600"],
            ),
            case(
                "a certificate as the key",
                pki.listener(&pki.server.cert, ca, ca, ""),
                ca,
                "key",
                &["holds no private key"],
            ),
            case(
                "a garbage CRL",
                pki.serving(ca, &crl(&garbage_crl)),
                &garbage_crl,
                "crl",
                &["is no CRL", "does not parse", "give the CA's CRL"],
            ),
            case(
                "a PEM CRL block that is not a CRL",
                pki.serving(ca, &crl(&garbage_pem_crl)),
                &garbage_pem_crl,
                "crl",
                &["is no CRL", "does not parse"],
            ),
            case(
                "a certificate as the CRL",
                pki.serving(ca, &crl(ca)),
                ca,
                "crl",
                &["holds no CRL", "it has `CERTIFICATE`"],
            ),
            case(
                "a leaf (CA:FALSE) certificate as client_ca",
                pki.serving(&leaf_as_ca, ""),
                &leaf_as_ca,
                "client_ca",
                &["`CN=partner-gateway", "not a CA (CA:FALSE)", "the CA that issues", "partner-ca"],
            ),
            case(
                "a PEM block cut short",
                pki.listener(&truncated, &pki.server.key, ca, ""),
                &truncated,
                "cert",
                &["no `-----END CERTIFICATE-----` line", "cut short"],
            ),
            case(
                "a backend client chain in the wrong order",
                pki.serving(
                    ca,
                    &format!(
                        "[listener.backend_tls]\nca = \"{}\"\nserver_name = \"db\"\n\
                         cert = \"{}\"\nkey = \"{}\"",
                        ca.display(),
                        chain_ca_first.display(),
                        pki.server.key.display()
                    ),
                ),
                &chain_ca_first,
                "backend_tls.cert",
                &["out of order", "`backend_tls.key`", "number 2"],
            ),
        ];
        for (name, listener, path, key, cause) in cases {
            let Err(error) = ListenerTls::load(&listener) else {
                panic!("{name}: loads");
            };
            let message = error.to_string();
            let named = format!("`{key}` {}", path.display());
            assert!(message.contains(&named), "{name}: no {named}: {message}");
            for words in cause {
                assert!(message.contains(words), "{name}: no {words:?}: {message}");
            }
            for wrong in ["Other(", "OtherError", "ParseError", "[45, 45"] {
                assert!(!message.contains(wrong), "{name}: debug text: {message}");
            }
            if key == "crl" {
                assert!(!message.contains("client_ca"), "{name}: blames client_ca: {message}");
            }
        }
    }

    /// What the refusals above must not catch: the good files, a version 1
    /// root as `client_ca` (roots may predate version 3), and a pinned
    /// self-signed client certificate, which webpki takes as its own anchor.
    #[test]
    fn good_files_and_legitimate_odd_ones_load() {
        let pki = Pki::new();
        let crl = pki.ca.crl("partner", &[]);
        let good = pki.serving(&pki.ca.cert, &format!("crl = [\"{}\"]", crl.display()));
        ListenerTls::load(&good).expect("the good files");

        let v1_root = pki.write("v1-root.pem", V1_CERT);
        ListenerTls::load(&pki.serving(&v1_root, "")).expect("a version 1 root as client_ca");

        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, "pinned-partner");
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let key = KeyPair::generate().expect("key");
        let pinned = params.self_signed(&key).expect("certificate");
        let path = pki.write("pinned.pem", pinned.pem());
        let tls = ListenerTls::load(&pki.serving(&path, "")).expect("a pinned client certificate");
        tls.recheck(Some(&[pinned.der().clone()])).expect("the pinned client is let in");
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
