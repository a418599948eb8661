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
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme, SupportedProtocolVersion,
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
                .map_err(|source| TlsError::Rustls { key, source })
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

/// Why a listener's TLS files are refused. Messages name the config key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or holds nothing usable.
    #[error("`{key}` {}: {problem}", path.display())]
    File { key: &'static str, path: PathBuf, problem: FileProblem },
    /// The private key belongs to another certificate.
    #[error(
        "`key` {}: this private key does not belong to the certificate in `cert` {} (their \
         public keys differ): install the key that was generated with this certificate",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// rustls refused the material.
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
    /// The client CA bundle or CRLs could not make a verifier.
    #[error("`client_ca`: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// An `allow_*` pattern is not a glob (`Config::parse` refuses these first).
    #[error("identity rules: {0}")]
    Pattern(#[source] globset::Error),
    /// `backend_tls.server_name` is neither a DNS name nor an IP address.
    #[error("`backend_tls.server_name`: `{0}` is not a DNS name or an IP address")]
    ServerName(String),
}

/// What is wrong with one file.
#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    #[error("cannot be read: {0}")]
    Unreadable(#[source] io::Error),
    #[error("is not valid PEM: {0}")]
    Pem(String),
    #[error("holds no certificate")]
    NoCertificate,
    #[error("holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoKey,
    #[error("holds a certificate the trust store refuses: {0}")]
    BadCa(String),
    #[error(
        "is readable by other users (mode {0:03o}): whoever reads it can decrypt recorded \
         sessions; `chmod 600` it"
    )]
    Exposed(u32),
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
        let mut named: Vec<(&'static str, &Path)> = vec![
            ("cert", &listener.cert),
            ("key", &listener.key),
            ("client_ca", &listener.client_ca),
        ];
        named.extend(listener.crl.iter().map(|path| ("crl", path.as_path())));
        named.extend(listener.tls_ticket_keys.as_deref().map(|path| ("tls_ticket_keys", path)));
        if let Some(tls) = &listener.backend_tls {
            named.push(("backend_tls.ca", &tls.ca));
            named.extend(tls.cert.as_deref().map(|path| ("backend_tls.cert", path)));
            named.extend(tls.key.as_deref().map(|path| ("backend_tls.key", path)));
        }
        let mut files = BTreeMap::new();
        for (key, path) in named {
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
        let client_cas = certificates("client_ca", &listener.client_ca, material)?;
        let roots = root_store("client_ca", &listener.client_ca, client_cas.clone())?;
        let crls = listener
            .crl
            .iter()
            .map(|path| Ok((path, revocation_lists(path, material)?)))
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
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(crls)
            .build()
            .map_err(TlsError::Verifier)?;
        let verifier = Arc::new(IdentityVerifier {
            inner: webpki,
            rules: IdentityRules::new(listener).map_err(TlsError::Pattern)?,
        });
        let certified = certified_key(chain.clone(), &keys.server, ("cert", &listener.cert))
            .map_err(|e| e.naming_key(&listener.key))?;
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
    (cert_key, cert_path): (&'static str, &Path),
) -> Result<CertifiedKey, KeyCheck> {
    let certified = CertifiedKey::new(chain, Arc::clone(key));
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(KeyCheck::Mismatch(cert_path.to_owned()))
        }
        // The chain's leaf does not parse: the certificate is to blame.
        Err(source) => Err(KeyCheck::Certificate(TlsError::Rustls { key: cert_key, source })),
    }
}

/// Why a certificate and key do not go together.
enum KeyCheck {
    Mismatch(PathBuf),
    Certificate(TlsError),
}

impl KeyCheck {
    fn naming_key(self, key: &Path) -> TlsError {
        match self {
            Self::Mismatch(cert) => TlsError::KeyMismatch { cert, key: key.to_owned() },
            Self::Certificate(error) => error,
        }
    }
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
            let certified = certified_key(chain, key, ("backend_tls.cert", cert))
                .map_err(|e| e.naming_key(key_path))?;
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

fn pem_problem(error: rustls::pki_types::pem::Error) -> FileProblem {
    match error {
        rustls::pki_types::pem::Error::Io(e) => FileProblem::Unreadable(e),
        other => FileProblem::Pem(other.to_string()),
    }
}

fn certificates(
    key: &'static str,
    path: &Path,
    material: &Material,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = file_error(key, path);
    let chain = CertificateDer::pem_slice_iter(material.get(key, path)?)
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
    PrivateKeyDer::from_pem_slice(material.get(key, path)?).map_err(|e| {
        let problem = match e {
            rustls::pki_types::pem::Error::NoItemsFound => FileProblem::NoKey,
            other => pem_problem(other),
        };
        file_error(key, path)(problem)
    })
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
            .map_err(|e| file_error(key, path)(FileProblem::BadCa(e.to_string())))?;
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
            return Err(error(FileProblem::Pem("no X509 CRL block".into())));
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
