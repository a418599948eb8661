//! The worker's side: its channels to the gate, and the stand-ins for the
//! keys it never holds (a signing key, a listener's ticket keys), which keep
//! a batch of data keys and those of the tickets they issued.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use rustls::{
    SignatureAlgorithm, SignatureScheme,
    server::ProducesTickets,
    sign::{Signer, SigningKey},
};

use super::{
    KeyHandle, ListenerKeyHandles, MAX_DATA_KEYS, MAX_MESSAGE, TicketHandle, allowed_cpus,
    wire::{ANSWER_OK, ANSWER_REFUSED, Request, encode},
};
use crate::{
    privsep::sys,
    tls::{
        DATA_KEY_LEN, DATA_KEY_MAX_AGE, DataKey, ListenerKeys, WRAPPED_LEN, open_ticket,
        seal_ticket, wrapped_nonce, wrapped_part,
    },
};

/// How many data keys the worker fetches at once: as many as the gate
/// gives, so that a round trip serves sixteen connections (two tickets each).
const DATA_KEY_BATCH: u8 = MAX_DATA_KEYS;
/// How many data keys of tickets it issued a worker remembers (about 70
/// bytes each), so that a client resuming where it got its ticket costs no
/// round trip to the gate. They open only the tickets this worker sealed:
/// sessions it held anyway.
pub(super) const ISSUED_REMEMBERED: usize = 8192;

/// The worker's side: its channels to the gate.
pub struct KeyClient {
    channels: Vec<Mutex<Channel>>,
    /// Each CPU's channel: its position among the allowed CPUs.
    cpus: Vec<usize>,
}

struct Channel {
    fd: OwnedFd,
    sequence: u32,
    buffer: Vec<u8>,
}

/// Why the gate gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the gate refused")]
    Refused,
    #[error("key channel: {0}")]
    Io(#[source] io::Error),
    #[error("key channel: an answer that does not decode")]
    Malformed,
    #[error("no key channel")]
    NoChannel,
}

impl KeyClient {
    /// Call it before the sandbox: it reads the CPUs this process may use.
    pub fn new(channels: Vec<OwnedFd>) -> Self {
        let channels = channels
            .into_iter()
            .map(|fd| Mutex::new(Channel { fd, sequence: 0, buffer: vec![0; MAX_MESSAGE] }))
            .collect();
        Self { channels, cpus: allowed_cpus() }
    }

    /// The channel of the CPU this thread runs on.
    fn slot(&self) -> usize {
        let cpu = sys::current_cpu().unwrap_or(0);
        let position = self.cpus.iter().position(|&c| c == cpu).unwrap_or(cpu);
        position % self.channels.len()
    }

    /// Asks the gate, on this thread's channel; blocks up to
    /// [`ANSWER_TIMEOUT`].
    fn ask(&self, request: &Request<'_>) -> Result<Vec<u8>, KeyError> {
        if self.channels.is_empty() {
            return Err(KeyError::NoChannel);
        }
        // This CPU's channel; if a thread preempted on this CPU holds it,
        // a free one, else wait for this one (its holder waits at most
        // ANSWER_TIMEOUT).
        let own = self.slot();
        let free = (0..self.channels.len())
            .map(|offset| (own + offset) % self.channels.len())
            .find_map(|slot| self.channels[slot].try_lock().ok());
        let mut channel = match free {
            Some(channel) => channel,
            None => self.channels[own].lock().unwrap_or_else(PoisonError::into_inner),
        };
        let channel = &mut *channel;
        channel.sequence = channel.sequence.wrapping_add(1);
        let frame = encode(channel.sequence, request);
        sys::send_message(channel.fd.as_fd(), &frame).map_err(KeyError::Io)?;
        // An answer to an earlier request that timed out is skipped.
        loop {
            let received =
                sys::recv_message(channel.fd.as_fd(), &mut channel.buffer).map_err(KeyError::Io)?;
            let answer = &channel.buffer[..received];
            let (head, rest) = answer.split_first_chunk::<5>().ok_or(KeyError::Malformed)?;
            if u32::from_be_bytes([head[0], head[1], head[2], head[3]]) != channel.sequence {
                continue;
            }
            return match head[4] {
                ANSWER_OK => Ok(rest.to_vec()),
                ANSWER_REFUSED => Err(KeyError::Refused),
                _ => Err(KeyError::Malformed),
            };
        }
    }
}

/// Test only (`escape`): asks the gate to sign a message no handshake
/// signs with the first key it holds; the gate kills the worker for it.
#[cfg(feature = "test-hooks")]
pub fn sign_anything(client: &KeyClient) -> Result<Vec<u8>, KeyError> {
    let message = b"I, the partner, owe the attacker one million";
    let scheme = u16::from(SignatureScheme::ECDSA_NISTP256_SHA256);
    client.ask(&Request::Sign { key: 0, scheme, message })
}

/// A listener's keys as stand-ins that ask the gate.
pub fn remote_keys(client: &Arc<KeyClient>, handles: &ListenerKeyHandles) -> ListenerKeys {
    let key = |handle: &KeyHandle| -> Arc<dyn SigningKey> {
        Arc::new(RemoteKey { client: Arc::clone(client), handle: handle.clone() })
    };
    ListenerKeys {
        server: key(&handles.server),
        backend: handles.backend.as_ref().map(key),
        tickets: handles.tickets.as_ref().map(|handle| -> Arc<dyn ProducesTickets> {
            Arc::new(RemoteTickets {
                client: Arc::clone(client),
                handle: handle.clone(),
                data_keys: Mutex::new(Vec::new()),
                issued: Mutex::new(Issued::default()),
            })
        }),
    }
}

/// A private key in the gate.
#[derive(Debug)]
struct RemoteKey {
    client: Arc<KeyClient>,
    handle: KeyHandle,
}

impl std::fmt::Debug for KeyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyClient({} channels)", self.channels.len())
    }
}

impl SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self
            .handle
            .schemes
            .iter()
            .map(|&s| SignatureScheme::from(s))
            .find(|scheme| offered.contains(scheme))?;
        Some(Box::new(RemoteSigner {
            client: Arc::clone(&self.client),
            key: self.handle.id,
            scheme,
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::from(self.handle.algorithm)
    }
}

#[derive(Debug)]
struct RemoteSigner {
    client: Arc<KeyClient>,
    key: u32,
    scheme: SignatureScheme,
}

impl Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let request = Request::Sign { key: self.key, scheme: u16::from(self.scheme), message };
        self.client
            .ask(&request)
            .map_err(|e| rustls::Error::General(format!("signing in the gate: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// A listener's ticket keys in the gate.
struct RemoteTickets {
    client: Arc<KeyClient>,
    handle: TicketHandle,
    /// Data keys fetched ahead, with when.
    data_keys: Mutex<Vec<(DataKey, Instant)>>,
    /// Those of the tickets it issued, newest last.
    issued: Mutex<Issued>,
}

/// The data keys of the tickets a worker issued, by their wrapping's nonce,
/// with when the gate made them; the oldest go first.
#[derive(Default)]
pub(super) struct Issued {
    pub(super) keys: HashMap<[u8; 12], ([u8; DATA_KEY_LEN], Instant)>,
    order: std::collections::VecDeque<[u8; 12]>,
}

impl Issued {
    pub(super) fn remember(&mut self, data_key: &DataKey, made: Instant) {
        let Some(nonce) = wrapped_nonce(&data_key.wrapped) else { return };
        if self.order.len() == ISSUED_REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.keys.remove(&oldest);
        }
        self.keys.insert(nonce, (data_key.key, made));
        self.order.push_back(nonce);
    }

    /// The data key of `wrapped`, if this worker issued it within `lifetime`.
    pub(super) fn recall(&self, wrapped: &[u8], lifetime: Duration) -> Option<[u8; DATA_KEY_LEN]> {
        let (key, made) = self.keys.get(&wrapped_nonce(wrapped)?)?;
        (made.elapsed() <= lifetime).then_some(*key)
    }
}

impl std::fmt::Debug for RemoteTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteTickets({})", self.handle.id)
    }
}

impl RemoteTickets {
    /// A data key not older than [`DATA_KEY_MAX_AGE`], fetching a batch
    /// when none is left (without holding the batch's lock meanwhile).
    fn data_key(&self) -> Option<(DataKey, Instant)> {
        {
            let mut keys = self.data_keys.lock().unwrap_or_else(PoisonError::into_inner);
            keys.retain(|(_, fetched)| fetched.elapsed() < DATA_KEY_MAX_AGE);
            if let Some(key) = keys.pop() {
                return Some(key);
            }
        }
        let request = Request::DataKeys { tickets: self.handle.id, count: DATA_KEY_BATCH };
        let answer = self.client.ask(&request).ok()?;
        let fetched = Instant::now();
        let mut batch: Vec<(DataKey, Instant)> = answer
            .chunks_exact(DATA_KEY_LEN + WRAPPED_LEN)
            .filter_map(|chunk| {
                let (key, wrapped) = chunk.split_at(DATA_KEY_LEN);
                let key = DataKey { key: key.try_into().ok()?, wrapped: wrapped.try_into().ok()? };
                Some((key, fetched))
            })
            .collect();
        let first = batch.pop()?;
        self.data_keys.lock().unwrap_or_else(PoisonError::into_inner).extend(batch);
        Some(first)
    }
}

impl ProducesTickets for RemoteTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.handle.lifetime
    }

    fn encrypt(&self, session: &[u8]) -> Option<Vec<u8>> {
        let (data_key, made) = self.data_key()?;
        let ticket = seal_ticket(&data_key, session)?;
        self.issued.lock().unwrap_or_else(PoisonError::into_inner).remember(&data_key, made);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let wrapped = wrapped_part(ticket)?;
        let lifetime = Duration::from_secs(self.handle.lifetime.into());
        let issued =
            self.issued.lock().unwrap_or_else(PoisonError::into_inner).recall(wrapped, lifetime);
        // A ticket this worker issued opens here (its data key authenticates
        // every byte, the wrapping included); any other asks the gate.
        let data_key = match issued {
            Some(key) => key,
            None => {
                let request = Request::Unwrap { tickets: self.handle.id, wrapped };
                self.client.ask(&request).ok()?.try_into().ok()?
            }
        };
        open_ticket(&data_key, ticket)
    }
}
