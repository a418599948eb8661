//! Who may decide the group's list: Ed25519 signatures over a generation's
//! canonical description. Hosts hold only public keys (`[fleet]
//! trusted_keys`); the private key stays where changes are made (`edgegate
//! allow … --signing-key FILE`), so neither an etcd writer nor a gate host
//! can publish a list the hosts accept.

use std::{fmt, path::Path};

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};

use super::layout::Pointer;

/// How a public key is written: in `trusted_keys`, in pointers, in `.pub` files.
const PUBLIC_PREFIX: &str = "ed25519:";
const PUBLIC_KEY_BYTES: usize = 32;
const SIGNATURE_BYTES: usize = 64;

/// An Ed25519 public key, written `ed25519:<base64 of 32 bytes>`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey([u8; PUBLIC_KEY_BYTES]);

impl PublicKey {
    /// A short fingerprint for logs and `status`: the first 8 bytes of its SHA-256, hex.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        sha2::Sha256::digest(self.0).iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// Why a public key's text is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{text}` is not an Ed25519 public key (`ed25519:` and 32 bytes of base64, as `edgegate fleet keygen` prints)"
)]
pub struct BadPublicKey {
    text: String,
}

impl std::str::FromStr for PublicKey {
    type Err = BadPublicKey;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadPublicKey { text: text.chars().take(80).collect() };
        let encoded = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(bad)?;
        // Decoded length bounded before decoding: 32 bytes are 44 characters.
        if encoded.len() > 44 {
            return Err(bad());
        }
        let bytes = STANDARD.decode(encoded).map_err(|_| bad())?;
        Ok(Self(bytes.try_into().map_err(|_| bad())?))
    }
}

/// The signature a pointer carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The signer's public key (`ed25519:…`).
    pub key: String,
    /// Base64 of the 64-byte Ed25519 signature over [`canonical`].
    pub value: String,
}

/// The bytes a generation's signature covers: everything a host acts on,
/// bound to this prefix and group, so that a signature for one group or
/// generation is worthless for another. Fields are validated before this
/// is built (no line breaks), so the text is unambiguous.
pub fn canonical(prefix: &str, group: &str, pointer: &Pointer) -> Vec<u8> {
    format!(
        "edgegate fleet generation v1\nprefix {prefix}\ngroup {group}\ngeneration {}\n\
         previous {}\ndir {}\nchunks {}\nentries {}\nsha256 {}\nempty_forced {}\n\
         committed_at_ms {}\ncommitted_by {}\n",
        pointer.generation,
        pointer.previous,
        pointer.dir,
        pointer.chunks,
        pointer.entries,
        pointer.sha256,
        pointer.empty_forced,
        pointer.committed_at_ms,
        pointer.committed_by,
    )
    .into_bytes()
}

/// Why a generation's signature is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("it is not signed, and `trusted_keys` requires a signature")]
    Unsigned,
    #[error("it is signed by {key}, which is not in `trusted_keys`")]
    UnknownKey { key: String },
    #[error(
        "its signature by trusted key {fingerprint} does not verify (altered, or signed for another group or generation)"
    )]
    BadSignature { fingerprint: String },
}

impl Untrusted {
    /// The label of `edgegate_fleet_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::UnknownKey { .. } => "untrusted_key",
            Self::BadSignature { .. } => "bad_signature",
        }
    }
}

/// The keys whose signatures a host accepts; empty: signatures are not required.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self(keys)
    }

    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    pub fn fingerprints(&self) -> Vec<String> {
        self.0.iter().map(PublicKey::fingerprint).collect()
    }

    /// Accepts `pointer` when no key is required, or when one of the keys signed it.
    pub fn check(&self, prefix: &str, group: &str, pointer: &Pointer) -> Result<(), Untrusted> {
        if !self.required() {
            return Ok(());
        }
        let signature = pointer.signature.as_ref().ok_or(Untrusted::Unsigned)?;
        let shown = || signature.key.chars().take(60).collect::<String>();
        let key = signature
            .key
            .parse::<PublicKey>()
            .ok()
            .and_then(|key| self.0.iter().find(|k| **k == key))
            .ok_or_else(|| Untrusted::UnknownKey { key: shown() })?;
        let bad = || Untrusted::BadSignature { fingerprint: key.fingerprint() };
        if signature.value.len() > 88 {
            return Err(bad());
        }
        let value = STANDARD.decode(&signature.value).map_err(|_| bad())?;
        if value.len() != SIGNATURE_BYTES {
            return Err(bad());
        }
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&canonical(prefix, group, pointer), &value)
            .map_err(|_| bad())
    }
}

/// The private half, where changes are made; never on a gate host.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

/// Why a signing key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("cannot read signing key {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not an Ed25519 private key in PKCS#8 PEM (as `edgegate fleet keygen` writes)",
        path.display()
    )]
    Format { path: std::path::PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate a key pair")]
    Generate,
}

/// Largest key file read: a PKCS#8 Ed25519 key in PEM is about 170 bytes.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

impl SigningKey {
    pub fn load(path: &Path) -> Result<Self, SigningKeyError> {
        let pem = crate::files::read_bounded(path, MAX_KEY_FILE_BYTES)
            .map_err(|source| SigningKeyError::Read { path: path.to_owned(), source })?;
        let format = || SigningKeyError::Format { path: path.to_owned() };
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|_| format())?;
        let pair = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|_| format())?;
        Ok(Self { pair })
    }

    pub fn public_key(&self) -> PublicKey {
        let bytes: [u8; PUBLIC_KEY_BYTES] =
            self.pair.public_key().as_ref().try_into().expect("Ed25519 public keys are 32 bytes");
        PublicKey(bytes)
    }

    /// Signs `pointer` in place for `prefix` and `group`.
    pub fn sign(&self, prefix: &str, group: &str, pointer: &mut Pointer) {
        pointer.signature = None;
        let value = self.pair.sign(&canonical(prefix, group, pointer));
        pointer.signature = Some(Signature {
            key: self.public_key().to_string(),
            value: STANDARD.encode(value.as_ref()),
        });
    }

    /// Writes a new key pair: `{stem}.key` (PKCS#8 PEM, mode 0600, never
    /// over an existing file) and `{stem}.pub` (the `trusted_keys` line).
    pub fn generate(stem: &Path) -> Result<(PublicKey, [std::path::PathBuf; 2]), SigningKeyError> {
        use std::io::Write as _;
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| SigningKeyError::Generate)?;
        let pair =
            Ed25519KeyPair::from_pkcs8(document.as_ref()).map_err(|_| SigningKeyError::Generate)?;
        let public = Self { pair }.public_key();
        let with = |extension: &str| {
            let mut name = stem.as_os_str().to_owned();
            name.push(extension);
            std::path::PathBuf::from(name)
        };
        let (key_path, pub_path) = (with(".key"), with(".pub"));
        let write = |path: &Path, mode: u32, text: &str| {
            crate::files::create_new(path, mode)
                .and_then(|mut file| file.write_all(text.as_bytes()).and_then(|()| file.sync_all()))
                .map_err(|source| SigningKeyError::Write { path: path.to_owned(), source })
        };
        write(&key_path, 0o600, &pem("PRIVATE KEY", document.as_ref()))?;
        write(&pub_path, 0o644, &format!("{public}\n"))?;
        Ok((public, [key_path, pub_path]))
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::layout::Keys;

    fn pointer() -> Pointer {
        Pointer {
            generation: 7,
            previous: 6,
            dir: Keys::new("/edgegate", "g").generation_dir(7, 1),
            chunks: 1,
            entries: 2,
            sha256: "ab".repeat(32),
            committed_at_ms: 1,
            committed_by: "admin".into(),
            empty_forced: false,
            signature: None,
        }
    }

    fn key_pair(dir: &Path, name: &str) -> SigningKey {
        SigningKey::generate(&dir.join(name)).expect("generate");
        SigningKey::load(&dir.join(format!("{name}.key"))).expect("load")
    }

    /// Every way a pointer can fail to be one a trusted key signed.
    #[test]
    fn only_a_trusted_signature_over_this_group_and_generation_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = key_pair(dir.path(), "admin");
        let other = key_pair(dir.path(), "other");
        let trusted = TrustedKeys::new(vec![admin.public_key()]);
        let mut signed = pointer();
        admin.sign("/edgegate", "g", &mut signed);
        assert_eq!(trusted.check("/edgegate", "g", &signed), Ok(()));
        assert_eq!(TrustedKeys::default().check("/edgegate", "g", &pointer()), Ok(()));

        assert_eq!(trusted.check("/edgegate", "g", &pointer()), Err(Untrusted::Unsigned));
        let mut by_other = pointer();
        other.sign("/edgegate", "g", &mut by_other);
        assert!(matches!(
            trusted.check("/edgegate", "g", &by_other),
            Err(Untrusted::UnknownKey { .. })
        ));
        let bad = |result| matches!(result, Err(Untrusted::BadSignature { .. }));
        assert!(bad(trusted.check("/edgegate", "other-group", &signed)));
        assert!(bad(trusted.check("/other", "g", &signed)));
        for altered in [
            Pointer { generation: 8, ..signed.clone() },
            Pointer { previous: 1, ..signed.clone() },
            Pointer { entries: 3, ..signed.clone() },
            Pointer { sha256: "cd".repeat(32), ..signed.clone() },
            Pointer { empty_forced: true, ..signed.clone() },
            Pointer { committed_by: "intruder".into(), ..signed.clone() },
        ] {
            assert!(bad(trusted.check("/edgegate", "g", &altered)), "{altered:?}");
        }
        // A signature moved onto another key's name, or not base64, or cut.
        let mut moved = by_other.clone();
        moved.signature.as_mut().expect("signed").key = admin.public_key().to_string();
        assert!(bad(trusted.check("/edgegate", "g", &moved)));
        for value in ["!!", "", &"A".repeat(10_000)] {
            let mut garbled = signed.clone();
            garbled.signature.as_mut().expect("signed").value = value.to_owned();
            assert!(bad(trusted.check("/edgegate", "g", &garbled)), "{value:.20}");
        }
    }

    #[test]
    fn key_files_round_trip_and_are_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (public, [key, pub_file]) = SigningKey::generate(&dir.path().join("k")).expect("gen");
        let text = std::fs::read_to_string(&pub_file).expect("read .pub");
        assert_eq!(text.trim().parse::<PublicKey>(), Ok(public.clone()));
        assert_eq!(SigningKey::load(&key).expect("load").public_key(), public);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            SigningKey::generate(&dir.path().join("k")),
            Err(SigningKeyError::Write { .. })
        ));
        std::fs::write(dir.path().join("garbage.key"), "not a key").expect("write");
        assert!(matches!(
            SigningKey::load(&dir.path().join("garbage.key")),
            Err(SigningKeyError::Format { .. })
        ));
    }

    #[test]
    fn public_key_text_is_strict() {
        for bad in
            ["", "ed25519:", "ed25519:AAAA", "rsa:AAAA", &format!("ed25519:{}", "A".repeat(400))]
        {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:.30}");
        }
    }
}
