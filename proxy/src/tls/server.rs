//! A listener's server config: the served certificate, the cipher suites and
//! versions, the client verifier with CRLs and identity rules, and stateless
//! resumption; rebuilt whole from the files on every reload.

use std::{path::Path, sync::Arc};

use rustls::{
    RootCertStore, ServerConfig, SignatureScheme, SupportedProtocolVersion,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, UnixTime},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};

use super::{
    backend::{BackendTls, backend_tls},
    checks::{certified_key, client_authorities, served_versions},
    error::{FileProblem, Named, TlsError, file_error},
    identity::{Identity, IdentityRules},
    lifetimes::{Lifetime, LifetimeKind, certificate_lifetime, crl_lifetime},
    material::{ListenerKeys, Material, Secrets, certificates, revocation_lists},
    verifier::IdentityVerifier,
};
use crate::config::{ListenerConfig, TlsVersion};

/// What a listener needs for TLS, built from its files; swapped whole on reload.
pub struct ListenerTls {
    pub server: Arc<ServerConfig>,
    verifier: Arc<IdentityVerifier>,
    pub backend: Option<BackendTls>,
    /// When its certificates and CRLs stop being usable.
    pub lifetimes: Vec<Lifetime>,
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
        let verifier = Arc::new(IdentityVerifier::new(
            webpki,
            IdentityRules::new(listener).map_err(TlsError::Pattern)?,
        ));
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

    /// Who the client's chain names (after the handshake accepted it).
    pub fn identity(&self, chain: Option<&[CertificateDer<'_>]>) -> Identity {
        match chain.and_then(<[_]>::split_first) {
            Some((end_entity, intermediates)) => self.verifier.identity(end_entity, intermediates),
            None => Identity::default(),
        }
    }
}

/// The one certificate a listener serves (and a backend client presents).
#[derive(Debug)]
pub(super) struct OneCertificate(pub(super) Arc<CertifiedKey>);

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

pub(super) fn versions(minimum: TlsVersion) -> &'static [&'static SupportedProtocolVersion] {
    static TLS12_AND_13: [&SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match minimum {
        TlsVersion::Tls12 => &TLS12_AND_13,
        TlsVersion::Tls13 => &TLS13_ONLY,
    }
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

pub(super) fn root_store(
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
