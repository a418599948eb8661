//! The contents of a listener's TLS files (read by the gate, sent to the worker
//! without its secrets), the secrets among them, and their parsing into
//! certificates, private keys and CRLs.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject},
    server::ProducesTickets,
    sign::SigningKey,
};

use super::{
    TicketKeys,
    error::{FileProblem, Labels, TlsError, file_error, pem_problem},
};
use crate::config::{BackendTlsConfig, ListenerConfig};

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

/// The contents of every file a listener's TLS names, by path. The gate
/// reads them (it may); the worker, which has no file system, builds its
/// [`ListenerTls`](super::ListenerTls) from them.
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

pub(super) fn certificates(
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

/// CRLs from a PEM file (one or more `X509 CRL` blocks) or a DER file.
pub(super) fn revocation_lists(
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
