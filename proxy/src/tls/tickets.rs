//! Session tickets (TLS 1.3 resumption tickets and TLS 1.2 session tickets)
//! sealed with keys that every host behind the load balancer shares, so a
//! partner resumes on whichever host its next connection lands.
//!
//! The key file holds one key per line: base64 of 48 random bytes (a 16-byte
//! name, then an AES-256-GCM key), as `openssl rand -base64 48` prints them;
//! `#` starts a comment. The first key seals new tickets and every key opens
//! them, so a rotation never strands a partner: add the new key at the end
//! (every host opens its tickets), then move it first (hosts seal with it),
//! then drop the old one after `session_lifetime`.
//!
//! The ticket keys stay in the gate; the proxy worker never holds one. Each
//! ticket is sealed with a single-use data key that the gate makes and
//! wraps under the ticket key:
//!
//! ```text
//! wrapped = name || nonce || AES-256-GCM_key(issued_at || data key)   (aad: name)
//! ticket  = wrapped || nonce' || AES-256-GCM_data key(session)        (aad: wrapped)
//! ```
//!
//! So the worker seals a ticket with a data key it fetched in advance (no
//! round trip to the gate on the handshake's path), and opening one takes
//! one: the gate unwraps the data key. The wrapping's issue time makes
//! `session_lifetime` a hard limit (rustls itself never checks a ticket's
//! age); a data key is used within [`DATA_KEY_MAX_AGE`] of it.

use std::{fmt, time::Duration};

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;
use rustls::server::ProducesTickets;

const NAME_LEN: usize = 16;
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const ISSUED_LEN: usize = 8;
/// A data key as the gate wraps it.
pub const WRAPPED_LEN: usize = NAME_LEN + NONCE_LEN + ISSUED_LEN + KEY_LEN + TAG_LEN;
/// A data key older than this is not used: it would make a ticket look
/// older than it is, and expire early.
pub const DATA_KEY_MAX_AGE: Duration = Duration::from_secs(60);
/// How far in the future an issue time may be: the hosts' clocks differ a little.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why a ticket key file is refused. Lines count from 1.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TicketKeysError {
    #[error("holds no key (one per line: `openssl rand -base64 48`)")]
    Empty,
    #[error("line {line}: not base64")]
    NotBase64 { line: usize },
    #[error("line {line}: {len} bytes, a key is {} (`openssl rand -base64 48`)", NAME_LEN + KEY_LEN)]
    WrongLength { line: usize, len: usize },
    #[error("line {line}: the same key name as line {first}")]
    DuplicateName { line: usize, first: usize },
}

/// The keys of one listener: the first seals, all open.
pub struct TicketKeys {
    keys: Vec<TicketKey>,
    lifetime: Duration,
}

struct TicketKey {
    name: [u8; NAME_LEN],
    key: RandomizedNonceKey,
}

impl TicketKeys {
    /// Parses a key file's contents.
    pub fn parse(text: &[u8], lifetime: Duration) -> Result<Self, TicketKeysError> {
        let text = String::from_utf8_lossy(text);
        let mut keys: Vec<(usize, TicketKey)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_number = index + 1;
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| TicketKeysError::NotBase64 { line: line_number })?;
            let key = TicketKey::from_bytes(&bytes)
                .ok_or(TicketKeysError::WrongLength { line: line_number, len: bytes.len() })?;
            if let Some((first, _)) = keys.iter().find(|(_, k)| k.name == key.name) {
                return Err(TicketKeysError::DuplicateName { line: line_number, first: *first });
            }
            keys.push((line_number, key));
        }
        if keys.is_empty() {
            return Err(TicketKeysError::Empty);
        }
        Ok(Self { keys: keys.into_iter().map(|(_, key)| key).collect(), lifetime })
    }

    /// One key that only this process knows: resumption on this host, until
    /// the listener's next reload.
    pub fn random(lifetime: Duration) -> Result<Self, rustls::Error> {
        let mut bytes = [0u8; NAME_LEN + KEY_LEN];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
        let key = TicketKey::from_bytes(&bytes).expect("the length of a key");
        Ok(Self { keys: vec![key], lifetime })
    }

    /// The ticket lifetime clients are told, in seconds.
    pub fn lifetime_secs(&self) -> u32 {
        u32::try_from(self.lifetime.as_secs()).unwrap_or(u32::MAX)
    }

    /// A fresh data key, wrapped under the sealing key, issued `now`.
    pub fn mint(&self, now: Duration) -> Option<DataKey> {
        let key = &self.keys[0];
        let mut data_key = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut data_key).ok()?;
        let mut sealed = Vec::with_capacity(ISSUED_LEN + KEY_LEN + TAG_LEN);
        sealed.extend_from_slice(&now.as_secs().to_be_bytes());
        sealed.extend_from_slice(&data_key);
        let nonce = key.key.seal_in_place_append_tag(Aad::from(key.name), &mut sealed).ok()?;
        let mut wrapped = [0u8; WRAPPED_LEN];
        let (name, rest) = wrapped.split_at_mut(NAME_LEN);
        name.copy_from_slice(&key.name);
        let (nonce_out, sealed_out) = rest.split_at_mut(NONCE_LEN);
        nonce_out.copy_from_slice(nonce.as_ref());
        sealed_out.copy_from_slice(&sealed);
        Some(DataKey { key: data_key, wrapped })
    }

    /// The data key in `wrapped`, if a listed key wrapped it and the ticket
    /// is neither past its lifetime nor from the future.
    pub fn unwrap(&self, wrapped: &[u8], now: Duration) -> Option<[u8; KEY_LEN]> {
        if wrapped.len() != WRAPPED_LEN {
            return None;
        }
        let (name, rest) = wrapped.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = key.key.open_in_place(nonce, Aad::from(key.name), &mut sealed).ok()?;
        let (issued, data_key) = plain.split_at(ISSUED_LEN);
        let issued = Duration::from_secs(u64::from_be_bytes(issued.try_into().ok()?));
        let fresh = issued <= now + CLOCK_SKEW && now.saturating_sub(issued) <= self.lifetime;
        fresh.then(|| data_key.try_into().ok()).flatten()
    }

    fn seal(&self, session: &[u8], now: Duration) -> Option<Vec<u8>> {
        seal_ticket(&self.mint(now)?, session)
    }

    fn open(&self, ticket: &[u8], now: Duration) -> Option<Vec<u8>> {
        open_ticket(&self.unwrap(wrapped_part(ticket)?, now)?, ticket)
    }
}

/// A single-use key for one ticket, and its form wrapped by the gate.
pub struct DataKey {
    pub key: [u8; KEY_LEN],
    pub wrapped: [u8; WRAPPED_LEN],
}

/// Never the key itself.
impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey")
    }
}

/// A ticket for `session`, sealed with `data_key`.
pub fn seal_ticket(data_key: &DataKey, session: &[u8]) -> Option<Vec<u8>> {
    let key = RandomizedNonceKey::new(&AES_256_GCM, &data_key.key).ok()?;
    let mut sealed = Vec::with_capacity(session.len() + TAG_LEN);
    sealed.extend_from_slice(session);
    let nonce = key.seal_in_place_append_tag(Aad::from(&data_key.wrapped[..]), &mut sealed).ok()?;
    let mut ticket = Vec::with_capacity(WRAPPED_LEN + NONCE_LEN + sealed.len());
    ticket.extend_from_slice(&data_key.wrapped);
    ticket.extend_from_slice(nonce.as_ref());
    ticket.extend_from_slice(&sealed);
    Some(ticket)
}

/// The nonce of a wrapped data key: unique to it (the gate draws it at
/// random for each), so a name for it.
pub fn wrapped_nonce(wrapped: &[u8]) -> Option<[u8; NONCE_LEN]> {
    wrapped.get(NAME_LEN..NAME_LEN + NONCE_LEN)?.try_into().ok()
}

/// The wrapped data key a ticket starts with.
pub fn wrapped_part(ticket: &[u8]) -> Option<&[u8]> {
    (ticket.len() >= WRAPPED_LEN + NONCE_LEN + TAG_LEN).then(|| &ticket[..WRAPPED_LEN])
}

/// The session in `ticket`, opened with its data key.
pub fn open_ticket(data_key: &[u8; KEY_LEN], ticket: &[u8]) -> Option<Vec<u8>> {
    let wrapped = wrapped_part(ticket)?;
    let (nonce, sealed) = ticket[WRAPPED_LEN..].split_at(NONCE_LEN);
    let key = RandomizedNonceKey::new(&AES_256_GCM, data_key).ok()?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut sealed = sealed.to_vec();
    key.open_in_place(nonce, Aad::from(wrapped), &mut sealed).ok().map(|plain| plain.to_vec())
}

impl TicketKey {
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != NAME_LEN + KEY_LEN {
            return None;
        }
        let (name, key) = bytes.split_at(NAME_LEN);
        Some(Self {
            name: name.try_into().ok()?,
            key: RandomizedNonceKey::new(&AES_256_GCM, key).ok()?,
        })
    }
}

/// Never the keys themselves.
impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("keys", &self.keys.len())
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_secs()
    }

    fn encrypt(&self, session: &[u8]) -> Option<Vec<u8>> {
        self.seal(session, crate::clock::since_epoch())
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.open(ticket, crate::clock::since_epoch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const NOW: Duration = Duration::from_secs(1_800_000_000);

    fn key_line(fill: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([fill; NAME_LEN + KEY_LEN])
    }

    fn keys(lines: &[String]) -> TicketKeys {
        TicketKeys::parse(lines.join("\n").as_bytes(), HOUR).expect("keys")
    }

    #[test]
    fn a_ticket_opens_with_any_listed_key_and_only_then() {
        let (a, b) = (key_line(1), key_line(2));
        let ticket = keys(std::slice::from_ref(&a)).seal(b"session", NOW).expect("sealed");
        let opened = keys(std::slice::from_ref(&a)).open(&ticket, NOW);
        assert_eq!(opened.as_deref(), Some(&b"session"[..]));
        // Rotation: the old key still opens once a new one seals.
        assert_eq!(keys(&[b.clone(), a]).open(&ticket, NOW).as_deref(), Some(&b"session"[..]));
        assert_eq!(keys(&[b]).open(&ticket, NOW), None);
    }

    #[test]
    fn a_ticket_past_its_lifetime_or_from_the_future_is_refused() {
        let keys = keys(&[key_line(1)]);
        let ticket = keys.seal(b"session", NOW).expect("sealed");
        assert!(keys.open(&ticket, NOW + HOUR).is_some());
        assert_eq!(keys.open(&ticket, NOW + HOUR + Duration::from_secs(1)), None);
        assert!(keys.open(&ticket, NOW - CLOCK_SKEW).is_some());
        assert_eq!(keys.open(&ticket, NOW - CLOCK_SKEW - Duration::from_secs(1)), None);
    }

    #[test]
    fn a_tampered_or_truncated_ticket_is_refused() {
        let keys = keys(&[key_line(1)]);
        let ticket = keys.seal(b"session", NOW).expect("sealed");
        for index in 0..ticket.len() {
            let mut tampered = ticket.clone();
            tampered[index] ^= 0x01;
            assert_eq!(keys.open(&tampered, NOW), None, "byte {index} flipped");
        }
        for len in 0..ticket.len() {
            assert_eq!(keys.open(&ticket[..len], NOW), None, "{len} bytes");
        }
    }

    #[test]
    fn two_tickets_of_one_session_differ() {
        let keys = keys(&[key_line(1)]);
        assert_ne!(keys.seal(b"session", NOW), keys.seal(b"session", NOW));
    }

    #[test]
    fn bad_key_files_are_refused_by_line() {
        let cases = [
            (String::new(), TicketKeysError::Empty),
            ("# only a comment\n\n".to_owned(), TicketKeysError::Empty),
            ("not base64!\n".to_owned(), TicketKeysError::NotBase64 { line: 1 }),
            (
                format!("# keys\n{}\n", base64::engine::general_purpose::STANDARD.encode([0; 80])),
                TicketKeysError::WrongLength { line: 2, len: 80 },
            ),
            (
                format!("{}\n{}\n", key_line(1), key_line(1)),
                TicketKeysError::DuplicateName { line: 2, first: 1 },
            ),
        ];
        for (text, expected) in cases {
            let error = TicketKeys::parse(text.as_bytes(), HOUR).expect_err(&text);
            assert_eq!(error, expected, "{text:?}");
        }
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let text = format!("# rotated 2026-12-01\n\n{}  # current\n{}\n", key_line(1), key_line(2));
        assert_eq!(TicketKeys::parse(text.as_bytes(), HOUR).expect("keys").keys.len(), 2);
    }

    #[test]
    fn the_debug_form_shows_no_key() {
        let shown = format!("{:?}", keys(&[key_line(7)]));
        assert!(!shown.contains(&key_line(7)) && !shown.contains("7, 7"), "{shown}");
    }
}
