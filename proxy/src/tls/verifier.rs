//! The client-certificate verifier: WebPKI's, with the listener's identity
//! rules checked inside the handshake, remembering the chains it accepted.

use std::{collections::HashMap, fmt, sync::Arc, sync::Mutex};

use aws_lc_rs::digest;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::identity::{Identity, IdentityRules, parse_certificate};

/// WebPKI's client verifier plus the listener's identity rules.
pub(super) struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    rules: IdentityRules,
    accepted: AcceptedChains,
}

impl IdentityVerifier {
    pub(super) fn new(inner: Arc<dyn ClientCertVerifier>, rules: IdentityRules) -> Self {
        Self { inner, rules, accepted: AcceptedChains::default() }
    }

    /// Who an accepted chain names: remembered with the acceptance, read
    /// from the certificate otherwise (default if it does not parse).
    pub(super) fn identity(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Identity {
        let chain = ChainDigest::of(end_entity, intermediates);
        self.accepted
            .identity(&chain)
            .or_else(|| Identity::from_der(end_entity))
            .unwrap_or_default()
    }

    /// The whole check, without the memory: the chain up to the CA, its
    /// dates, the CRLs, then the identity rules.
    fn verify_afresh(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(ClientCertVerified, Identity), rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match Identity::from_der(end_entity) {
            Some(identity) if self.rules.allows_name(&identity.name) => Ok((verified, identity)),
            _ => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }
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
        let chain = ChainDigest::of(end_entity, intermediates);
        if self.accepted.holds(&chain, now) {
            return Ok(ClientCertVerified::assertion());
        }
        let (verified, identity) = self.verify_afresh(end_entity, intermediates, now)?;
        self.accepted.remember(chain, identity, end_entity, intermediates, now);
        Ok(verified)
    }

    // Handshake signatures prove the client holds the key: never remembered.
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

/// SHA-256 over a presented chain, each certificate length-prefixed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ChainDigest([u8; 32]);

impl ChainDigest {
    fn of(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Self {
        let mut context = digest::Context::new(&digest::SHA256);
        for certificate in std::iter::once(end_entity).chain(intermediates) {
            let length = u32::try_from(certificate.len()).unwrap_or(u32::MAX);
            context.update(&length.to_be_bytes());
            context.update(certificate);
        }
        let mut bytes = [0; 32];
        bytes.copy_from_slice(context.finish().as_ref());
        Self(bytes)
    }
}

/// Chains this verifier accepted lately, with who they name, each until the
/// first of: a minute after its check, the end of any presented
/// certificate's validity.
///
/// A partner platform opens many connections with one certificate, and a
/// chain's check (path building and an ECDSA or RSA verification) is among
/// a handshake's largest costs; the answer cannot change while the verifier
/// (its CAs, CRLs and identity rules, all replaced together at a reload)
/// stays the same, except with time. Reading the identity for the access
/// log means parsing the certificate, so it is kept too. Only
/// acceptances are remembered, so a stranger cannot fill the memory; it
/// holds [`Self::CAPACITY`] at most.
#[derive(Default)]
struct AcceptedChains {
    chains: Mutex<HashMap<ChainDigest, Accepted>>,
}

struct Accepted {
    /// Unix seconds.
    until: u64,
    identity: Identity,
}

impl AcceptedChains {
    const CAPACITY: usize = 1024;
    /// How long an acceptance is taken without a new check, in seconds.
    const FRESH_FOR: u64 = 60;

    fn holds(&self, chain: &ChainDigest, now: UnixTime) -> bool {
        self.lock().get(chain).is_some_and(|accepted| now.as_secs() < accepted.until)
    }

    fn identity(&self, chain: &ChainDigest) -> Option<Identity> {
        self.lock().get(chain).map(|accepted| accepted.identity.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChainDigest, Accepted>> {
        self.chains.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(
        &self,
        chain: ChainDigest,
        identity: Identity,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) {
        // WebPKI checks the dates of every certificate on the path it
        // built, at most the ones presented: the earliest end among them.
        let Some(valid_until) = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|der| {
                let certificate = parse_certificate(der)?;
                u64::try_from(certificate.validity().not_after.timestamp()).ok()
            })
            .try_fold(u64::MAX, |earliest, end| Some(earliest.min(end?)))
        else {
            return;
        };
        let until = valid_until.min(now.as_secs().saturating_add(Self::FRESH_FOR));
        let mut chains = self.lock();
        if chains.len() >= Self::CAPACITY {
            chains.retain(|_, accepted| now.as_secs() < accepted.until);
            if chains.len() >= Self::CAPACITY {
                chains.clear();
            }
        }
        chains.insert(chain, Accepted { until, identity });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{CertificateParams, DnType, KeyPair};
    use rustls::pki_types::UnixTime;

    use super::*;

    /// A WebPKI stand-in that accepts (or refuses) and counts its checks.
    #[derive(Debug, Default)]
    struct Counting {
        checks: AtomicUsize,
        refuse: bool,
    }

    impl ClientCertVerifier for Counting {
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            &[]
        }

        fn verify_client_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: UnixTime,
        ) -> Result<ClientCertVerified, rustls::Error> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            if self.refuse {
                return Err(rustls::Error::InvalidCertificate(CertificateError::BadSignature));
            }
            Ok(ClientCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            unreachable!("not part of these tests")
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            unreachable!("not part of these tests")
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            Vec::new()
        }
    }

    fn certificate(common_name: &str) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.not_after = rcgen::date_time_ymd(2033, 5, 18);
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").der().clone()
    }

    fn verifier(refuse: bool) -> (IdentityVerifier, Arc<Counting>) {
        let inner = Arc::new(Counting { refuse, ..Counting::default() });
        (IdentityVerifier::new(inner.clone(), IdentityRules::default()), inner)
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    #[test]
    fn an_accepted_chain_is_checked_again_only_after_a_minute() {
        let (verifier, inner) = verifier(false);
        let leaf = certificate("partner");
        let start = 1_800_000_000;
        for offset in [0, 1, 59] {
            verifier.verify_client_cert(&leaf, &[], at(start + offset)).expect("accepted");
        }
        assert_eq!(inner.checks.load(Ordering::SeqCst), 1);
        verifier.verify_client_cert(&leaf, &[], at(start + 60)).expect("accepted");
        assert_eq!(inner.checks.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_certificate_is_checked_again_once_it_expires() {
        let (verifier, inner) = verifier(false);
        let leaf = certificate("partner");
        // 2033-05-18T00:00:00Z is the certificate's notAfter.
        let end = 1_999_987_200;
        verifier.verify_client_cert(&leaf, &[], at(end - 10)).expect("accepted");
        verifier.verify_client_cert(&leaf, &[], at(end - 1)).expect("accepted");
        assert_eq!(inner.checks.load(Ordering::SeqCst), 1);
        verifier.verify_client_cert(&leaf, &[], at(end)).expect("checked again");
        assert_eq!(inner.checks.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_identity_is_read_once_per_acceptance_and_always_given() {
        let (verifier, _) = verifier(false);
        let leaf = certificate("partner");
        let read = Identity::from_der(&leaf).expect("parses");
        assert_eq!(read.name.common_name.as_deref(), Some("partner"));
        // Not yet accepted: read from the certificate.
        assert_eq!(verifier.identity(&leaf, &[]), read);
        verifier.verify_client_cert(&leaf, &[], at(1_800_000_000)).expect("accepted");
        let chain = ChainDigest::of(&leaf, &[]);
        assert_eq!(verifier.accepted.identity(&chain), Some(read.clone()));
        assert_eq!(verifier.identity(&leaf, &[]), read);
        let garbage = CertificateDer::from(vec![0x30, 0x00]);
        assert_eq!(verifier.identity(&garbage, &[]), Identity::default());
    }

    #[test]
    fn another_chain_is_another_check() {
        let (verifier, inner) = verifier(false);
        let (leaf, intermediate) = (certificate("partner"), certificate("issuer"));
        let now = at(1_800_000_000);
        verifier.verify_client_cert(&leaf, &[], now).expect("accepted");
        verifier.verify_client_cert(&leaf, std::slice::from_ref(&intermediate), now).expect("ok");
        verifier.verify_client_cert(&intermediate, &[], now).expect("accepted");
        assert_eq!(inner.checks.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_refusal_is_never_remembered() {
        let (verifier, inner) = verifier(true);
        let leaf = certificate("partner");
        for _ in 0..3 {
            verifier.verify_client_cert(&leaf, &[], at(1_800_000_000)).expect_err("refused");
        }
        assert_eq!(inner.checks.load(Ordering::SeqCst), 3);
        assert!(verifier.accepted.lock().is_empty());
    }

    #[test]
    fn the_memory_stays_within_its_capacity() {
        let accepted = AcceptedChains::default();
        let leaf = certificate("partner");
        let now = at(1_800_000_000);
        for n in 0..AcceptedChains::CAPACITY as u32 * 2 + 1 {
            let chain = ChainDigest::of(&CertificateDer::from(n.to_be_bytes().to_vec()), &[]);
            // The digest is of made-up bytes; the dates come from `leaf`.
            accepted.remember(chain, Identity::default(), &leaf, &[], now);
            assert!(accepted.lock().len() <= AcceptedChains::CAPACITY);
        }
    }

    #[test]
    fn a_certificate_without_readable_dates_is_not_remembered() {
        let accepted = AcceptedChains::default();
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let chain = ChainDigest::of(&garbage, &[]);
        accepted.remember(chain, Identity::default(), &garbage, &[], at(1_800_000_000));
        assert!(!accepted.holds(&chain, at(1_800_000_000)));
    }
}
