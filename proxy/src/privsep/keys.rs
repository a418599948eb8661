//! The listeners' private keys and session-ticket keys stay in the gate, as
//! OpenSSH's host keys stay in its monitor: the worker holds stand-ins
//! ([`RemoteKey`], [`RemoteTickets`]) that ask the gate to sign a handshake,
//! to make data keys for new tickets and to unwrap the data key of a
//! presented one (see `tls::tickets` for the ticket format). A worker taken
//! over can use the keys while it runs, within the limits below, but takes
//! none away.
//!
//! Each CPU has its own channel (a `SOCK_SEQPACKET` socketpair, one message
//! per request or reply) and a gate thread that answers it, pinned to that
//! CPU; a worker thread asks on the channel of the CPU it runs on. So
//! handshakes on different cores never wait for each other, and a request
//! and its answer are two context switches on one CPU, without waking
//! another (which, in a VM, costs an interrupt between vCPUs each way). Every request
//! is bounded ([`MAX_MESSAGE`], [`MAX_DATA_KEYS`]) and strictly decoded; a
//! signature is made only over what a TLS handshake signs (see
//! [`signable`]); each channel answers at most [`MAX_REQUESTS_PER_SECOND`].
//! A worker that breaks any of this is killed (the supervisor starts
//! another). The worker waits for an answer at most [`ANSWER_TIMEOUT`].

use std::{
    collections::{BTreeSet, HashMap},
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rustls::{
    SignatureAlgorithm, SignatureScheme,
    server::ProducesTickets,
    sign::{Signer, SigningKey},
};
use serde::{Deserialize, Serialize};

use crate::tls::{
    DATA_KEY_LEN, DATA_KEY_MAX_AGE, DataKey, ListenerKeys, Secrets, TicketKeys, WRAPPED_LEN,
    open_ticket, seal_ticket, wrapped_nonce, wrapped_part,
};

/// The largest request or reply on a key channel.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The most data keys one request may ask for.
pub const MAX_DATA_KEYS: u8 = 32;
/// How many requests a channel answers per second at most: far above what
/// one core's handshakes need (a full handshake costs well over 100 µs of
/// CPU, and needs one request).
pub const MAX_REQUESTS_PER_SECOND: u32 = 20_000;
/// How long the worker waits for an answer before the handshake fails.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How many data keys the worker fetches at once.
const DATA_KEY_BATCH: u8 = 16;
/// How many data keys of tickets it issued a worker remembers (about 70
/// bytes each), so that a client resuming where it got its ticket costs no
/// round trip to the gate. They open only the tickets this worker sealed:
/// sessions it held anyway.
const ISSUED_REMEMBERED: usize = 8192;

/// A private key in the gate, as the worker knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyHandle {
    pub id: u32,
    /// rustls's `SignatureAlgorithm`.
    pub algorithm: u8,
    /// The schemes the key signs with, in its order of preference.
    pub schemes: Vec<u16>,
}

/// A listener's ticket keys in the gate, as the worker knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketHandle {
    pub id: u32,
    /// Seconds, as clients are told.
    pub lifetime: u32,
}

/// A listener's keys in the gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerKeyHandles {
    pub server: KeyHandle,
    pub backend: Option<KeyHandle>,
    pub tickets: Option<TicketHandle>,
}

/// What a key may sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A listener's key: TLS server handshakes.
    Server,
    /// `backend_tls.key`: TLS client handshakes with the backend.
    BackendClient,
}

const OP_SIGN: u8 = 1;
const OP_DATA_KEYS: u8 = 2;
const OP_UNWRAP: u8 = 3;
const ANSWER_OK: u8 = 0;
const ANSWER_REFUSED: u8 = 1;

/// A request, as the gate decodes it.
#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    Sign { key: u32, scheme: u16, message: &'a [u8] },
    DataKeys { tickets: u32, count: u8 },
    Unwrap { tickets: u32, wrapped: &'a [u8] },
}

/// Why the gate killed a worker over its key channel.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Violation {
    #[error("a request of {0} bytes")]
    Size(usize),
    #[error("a request that does not decode")]
    Malformed,
    #[error("a signature over something no TLS handshake signs")]
    NotAHandshake,
    #[error("a signature scheme the key does not use")]
    Scheme,
    #[error("{0} data keys at once")]
    TooManyDataKeys(u8),
}

/// `[sequence u32][op u8][fields]`, big-endian.
fn decode(frame: &[u8]) -> Result<(u32, Request<'_>), Violation> {
    let (head, rest) = frame.split_first_chunk::<5>().ok_or(Violation::Malformed)?;
    let sequence = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let id = |rest: &[u8]| {
        rest.first_chunk::<4>().map(|b| u32::from_be_bytes(*b)).ok_or(Violation::Malformed)
    };
    let request = match head[4] {
        OP_SIGN => {
            let (scheme, message) = rest
                .get(4..)
                .and_then(|r| r.split_first_chunk::<2>())
                .ok_or(Violation::Malformed)?;
            Request::Sign { key: id(rest)?, scheme: u16::from_be_bytes(*scheme), message }
        }
        OP_DATA_KEYS => match rest {
            [a, b, c, d, count] => {
                Request::DataKeys { tickets: u32::from_be_bytes([*a, *b, *c, *d]), count: *count }
            }
            _ => return Err(Violation::Malformed),
        },
        OP_UNWRAP => {
            let wrapped = rest.get(4..).filter(|w| w.len() == WRAPPED_LEN);
            Request::Unwrap { tickets: id(rest)?, wrapped: wrapped.ok_or(Violation::Malformed)? }
        }
        _ => return Err(Violation::Malformed),
    };
    Ok((sequence, request))
}

fn encode(sequence: u32, request: &Request<'_>) -> Vec<u8> {
    let mut frame = sequence.to_be_bytes().to_vec();
    match request {
        Request::Sign { key, scheme, message } => {
            frame.push(OP_SIGN);
            frame.extend_from_slice(&key.to_be_bytes());
            frame.extend_from_slice(&scheme.to_be_bytes());
            frame.extend_from_slice(message);
        }
        Request::DataKeys { tickets, count } => {
            frame.push(OP_DATA_KEYS);
            frame.extend_from_slice(&tickets.to_be_bytes());
            frame.push(*count);
        }
        Request::Unwrap { tickets, wrapped } => {
            frame.push(OP_UNWRAP);
            frame.extend_from_slice(&tickets.to_be_bytes());
            frame.extend_from_slice(wrapped);
        }
    }
    frame
}

/// What a TLS handshake signs, by role: TLS 1.3's CertificateVerify input
/// (64 spaces, the context string, a zero byte and a transcript hash), a
/// TLS 1.2 server's ECDHE parameters (both randoms, then a named curve and
/// its point), or, for a TLS 1.2 client, its handshake transcript.
fn signable(role: Role, message: &[u8]) -> bool {
    let tls13 = |context: &[u8]| {
        message.len() > 64 + context.len() + 1
            && message[..64].iter().all(|&b| b == b' ')
            && message[64..].starts_with(context)
            && message[64 + context.len()] == 0
            && matches!(message.len() - 64 - context.len() - 1, 32 | 48 | 64)
    };
    match role {
        Role::Server => {
            let ecdhe = message.len() > 68
                && message[64] == 3
                && usize::from(message[67]) == message.len() - 68;
            tls13(b"TLS 1.3, server CertificateVerify") || ecdhe
        }
        Role::BackendClient => {
            tls13(b"TLS 1.3, client CertificateVerify") || message.first() == Some(&1)
        }
    }
}

/// The keys the gate answers for: those of the listeners in force, and of
/// the set before (a handshake may have started under it).
#[derive(Default)]
pub struct KeyStore {
    next_id: AtomicU32,
    generations: RwLock<[Registry; 2]>,
}

#[derive(Default)]
struct Registry {
    signing: HashMap<u32, (Arc<dyn SigningKey>, Role)>,
    tickets: HashMap<u32, Arc<TicketKeys>>,
}

impl KeyStore {
    /// Takes in a listener's secrets; returns what the worker is told.
    pub fn register(&self, secrets: &Secrets) -> ListenerKeyHandles {
        let mut generations = self.generations.write().unwrap_or_else(PoisonError::into_inner);
        let current = &mut generations[0];
        let mut key = |key: &Arc<dyn SigningKey>, role| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            current.signing.insert(id, (Arc::clone(key), role));
            KeyHandle { id, algorithm: u8::from(key.algorithm()), schemes: schemes(key.as_ref()) }
        };
        let server = key(&secrets.server, Role::Server);
        let backend = secrets.backend.as_ref().map(|k| key(k, Role::BackendClient));
        let tickets = secrets.tickets.as_ref().map(|tickets| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            current.tickets.insert(id, Arc::clone(tickets));
            TicketHandle { id, lifetime: tickets.lifetime_secs() }
        });
        ListenerKeyHandles { server, backend, tickets }
    }

    /// After a reload: keys not among `live` become the previous set, and
    /// the set before that is dropped.
    pub fn retire_all_but(&self, live: &[&ListenerKeyHandles]) {
        let ids: BTreeSet<u32> = live
            .iter()
            .flat_map(|h| {
                [
                    Some(h.server.id),
                    h.backend.as_ref().map(|k| k.id),
                    h.tickets.as_ref().map(|t| t.id),
                ]
            })
            .flatten()
            .collect();
        /// Takes the entries of `map` not in `ids` out of it.
        fn retired<V>(map: &mut HashMap<u32, V>, ids: &BTreeSet<u32>) -> HashMap<u32, V> {
            let (live, retired) = map.drain().partition(|(id, _)| ids.contains(id));
            *map = live;
            retired
        }
        let mut generations = self.generations.write().unwrap_or_else(PoisonError::into_inner);
        let [current, previous] = &mut *generations;
        *previous = Registry {
            signing: retired(&mut current.signing, &ids),
            tickets: retired(&mut current.tickets, &ids),
        };
    }

    fn signing(&self, id: u32) -> Option<(Arc<dyn SigningKey>, Role)> {
        let generations = self.generations.read().unwrap_or_else(PoisonError::into_inner);
        generations.iter().find_map(|g| g.signing.get(&id).cloned())
    }

    fn tickets(&self, id: u32) -> Option<Arc<TicketKeys>> {
        let generations = self.generations.read().unwrap_or_else(PoisonError::into_inner);
        generations.iter().find_map(|g| g.tickets.get(&id).cloned())
    }

    /// The answer to one request: `Ok(None)` refuses it (a ticket that does
    /// not open), `Err` is a violation.
    fn answer(&self, request: Request<'_>) -> Result<Option<Vec<u8>>, Violation> {
        match request {
            // A key retired meanwhile (two reloads during one handshake,
            // or a worker that refused the newer listeners) is no violation.
            Request::Sign { key, scheme, message } => {
                let Some((signing, role)) = self.signing(key) else { return Ok(None) };
                if !signable(role, message) {
                    return Err(Violation::NotAHandshake);
                }
                let signer = signing
                    .choose_scheme(&[SignatureScheme::from(scheme)])
                    .ok_or(Violation::Scheme)?;
                Ok(signer.sign(message).ok())
            }
            Request::DataKeys { tickets, count } => {
                if count > MAX_DATA_KEYS {
                    return Err(Violation::TooManyDataKeys(count));
                }
                let Some(keys) = self.tickets(tickets) else { return Ok(None) };
                let now = unix_now();
                let mut answer =
                    Vec::with_capacity(usize::from(count) * (DATA_KEY_LEN + WRAPPED_LEN));
                for _ in 0..count {
                    let Some(data_key) = keys.mint(now) else { return Ok(None) };
                    answer.extend_from_slice(&data_key.key);
                    answer.extend_from_slice(&data_key.wrapped);
                }
                Ok(Some(answer))
            }
            Request::Unwrap { tickets, wrapped } => {
                let Some(keys) = self.tickets(tickets) else { return Ok(None) };
                Ok(keys.unwrap(wrapped, unix_now()).map(|key| key.to_vec()))
            }
        }
    }
}

/// The schemes `key` signs with, in its order of preference.
fn schemes(key: &dyn SigningKey) -> Vec<u16> {
    const ALL: [SignatureScheme; 9] = [
        SignatureScheme::ED25519,
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ECDSA_NISTP521_SHA512,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PSS_SHA384,
        SignatureScheme::RSA_PSS_SHA512,
        SignatureScheme::RSA_PKCS1_SHA256,
        SignatureScheme::RSA_PKCS1_SHA384,
    ];
    let mut offered: Vec<SignatureScheme> =
        ALL.into_iter().chain([SignatureScheme::RSA_PKCS1_SHA512]).collect();
    let mut preferred = Vec::new();
    while let Some(signer) = key.choose_scheme(&offered) {
        let scheme = signer.scheme();
        preferred.push(u16::from(scheme));
        offered.retain(|s| *s != scheme);
    }
    preferred
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// `count` key channels: the gate's ends, and the worker's (which time out
/// after [`ANSWER_TIMEOUT`] on both directions).
pub fn channels(count: usize) -> io::Result<(Vec<OwnedFd>, Vec<OwnedFd>)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt};
    let timeout = nix::sys::time::TimeVal::new(
        i64::try_from(ANSWER_TIMEOUT.as_secs()).unwrap_or(i64::MAX),
        0,
    );
    let mut gate = Vec::with_capacity(count);
    let mut worker = Vec::with_capacity(count);
    for _ in 0..count {
        let (gate_end, worker_end) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        setsockopt(&worker_end, sockopt::ReceiveTimeout, &timeout)?;
        setsockopt(&worker_end, sockopt::SendTimeout, &timeout)?;
        // A worker that stops reading cannot hold a gate thread either.
        setsockopt(&gate_end, sockopt::SendTimeout, &timeout)?;
        gate.push(gate_end);
        worker.push(worker_end);
    }
    Ok((gate, worker))
}

/// The CPUs this process may run on, in order: channel `i` belongs to the
/// `i`-th (modulo the number of channels).
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).collect()
}

/// Answers `channel` for the worker `pid` on a thread of its own, pinned to
/// `cpu`, until the worker closes it; kills the worker for a violation.
pub fn serve(
    store: Arc<KeyStore>,
    channel: OwnedFd,
    pid: u32,
    cpu: Option<usize>,
) -> io::Result<()> {
    std::thread::Builder::new().name("edgegate-keys".into()).spawn(move || {
        if let Some(cpu) = cpu {
            let mut set = nix::sched::CpuSet::new();
            // Unpinned (still correct, a little dearer) if that fails.
            if set.set(cpu).is_ok() {
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
            }
        }
        if let Err(violation) = answer_until_closed(&store, &channel) {
            tracing::error!("proxy worker {pid}: its key channel carried {violation}; killing it");
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    })?;
    Ok(())
}

fn answer_until_closed(store: &KeyStore, channel: &OwnedFd) -> Result<(), Violation> {
    let mut buffer = vec![0u8; MAX_MESSAGE + 1];
    let mut window = (Instant::now(), 0u32);
    loop {
        // SAFETY: `buffer` is writable for its length; the descriptor is open.
        let received =
            unsafe { libc::recv(channel.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        let Ok(received) = usize::try_from(received) else {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Ok(());
        };
        if received == 0 {
            return Ok(());
        }
        if received > MAX_MESSAGE {
            return Err(Violation::Size(received));
        }
        // A worker past its rate waits for the next second.
        if window.0.elapsed() >= Duration::from_secs(1) {
            window = (Instant::now(), 0);
        }
        window.1 += 1;
        if window.1 > MAX_REQUESTS_PER_SECOND {
            std::thread::sleep(Duration::from_secs(1).saturating_sub(window.0.elapsed()));
            window = (Instant::now(), 1);
        }
        let (sequence, request) = decode(&buffer[..received])?;
        let answer = store.answer(request)?;
        let mut reply = sequence.to_be_bytes().to_vec();
        match answer {
            Some(bytes) => {
                reply.push(ANSWER_OK);
                reply.extend_from_slice(&bytes);
            }
            None => reply.push(ANSWER_REFUSED),
        }
        // SAFETY: `reply` is readable for its length; the descriptor is open.
        let sent = unsafe {
            libc::send(channel.as_raw_fd(), reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL)
        };
        if sent < 0 {
            return Ok(());
        }
    }
}

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
        // SAFETY: no arguments; glibc answers from the vDSO or rseq.
        let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0);
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
        let fd = channel.fd.as_raw_fd();
        // SAFETY: `frame` is readable for its length; the descriptor is open.
        let sent =
            unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(KeyError::Io(io::Error::last_os_error()));
        }
        // An answer to an earlier request that timed out is skipped.
        loop {
            // SAFETY: the buffer is writable for its length; the descriptor is open.
            let received = unsafe {
                libc::recv(fd, channel.buffer.as_mut_ptr().cast(), channel.buffer.len(), 0)
            };
            let received =
                usize::try_from(received).map_err(|_| KeyError::Io(io::Error::last_os_error()))?;
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
struct Issued {
    keys: HashMap<[u8; 12], ([u8; DATA_KEY_LEN], Instant)>,
    order: std::collections::VecDeque<[u8; 12]>,
}

impl Issued {
    fn remember(&mut self, data_key: &DataKey, made: Instant) {
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
    fn recall(&self, wrapped: &[u8], lifetime: Duration) -> Option<[u8; DATA_KEY_LEN]> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::PrivateKeyDer;

    use super::*;

    /// A TLS 1.3 server CertificateVerify input over a SHA-256 transcript hash.
    fn tls13_server(hash_len: usize) -> Vec<u8> {
        let mut message = vec![b' '; 64];
        message.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
        message.extend(std::iter::repeat_n(0xab, hash_len));
        message
    }

    /// A TLS 1.2 server's ECDHE parameters: randoms, named curve, point.
    fn tls12_server() -> Vec<u8> {
        let mut message = vec![7; 64];
        message.extend_from_slice(&[3, 0, 23, 65]);
        message.extend(std::iter::repeat_n(4, 65));
        message
    }

    fn secrets() -> Secrets {
        let key = rcgen::KeyPair::generate().expect("key");
        let der = PrivateKeyDer::try_from(key.serialize_der()).expect("der");
        Secrets {
            server: rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).expect("key"),
            backend: None,
            tickets: Some(Arc::new(TicketKeys::random(Duration::from_secs(3600)).expect("keys"))),
        }
    }

    #[test]
    fn only_what_a_handshake_signs_is_signed() {
        assert!(signable(Role::Server, &tls13_server(32)));
        assert!(signable(Role::Server, &tls13_server(48)));
        assert!(signable(Role::Server, &tls12_server()));
        let mut client = tls13_server(32);
        client[64..97].copy_from_slice(b"TLS 1.3, client CertificateVerify");
        assert!(signable(Role::BackendClient, &client));
        assert!(signable(Role::BackendClient, &[1, 0, 0, 40]), "a TLS 1.2 transcript");
        let refused: [(&str, Role, Vec<u8>); 7] = [
            ("arbitrary text", Role::Server, b"I owe you".to_vec()),
            ("a client's context for a server key", Role::Server, client.clone()),
            ("a server's context for a client key", Role::BackendClient, tls13_server(32)),
            ("a hash of no TLS length", Role::Server, tls13_server(20)),
            ("no zero byte after the context", Role::Server, {
                let mut m = tls13_server(32);
                m[97] = b'!';
                m
            }),
            ("ECDHE parameters whose point is cut short", Role::Server, {
                let mut m = tls12_server();
                m.pop();
                m
            }),
            ("nothing", Role::Server, Vec::new()),
        ];
        for (what, role, message) in refused {
            assert!(!signable(role, &message), "{what}");
        }
    }

    #[test]
    fn requests_decode_as_encoded_and_bad_frames_do_not() {
        let wrapped = [9u8; WRAPPED_LEN];
        let requests = [
            Request::Sign { key: 7, scheme: 0x0403, message: b"m" },
            Request::DataKeys { tickets: 8, count: 16 },
            Request::Unwrap { tickets: 9, wrapped: &wrapped },
        ];
        for request in requests {
            let frame = encode(41, &request);
            assert_eq!(decode(&frame), Ok((41, request)));
        }
        let bad: [&[u8]; 6] = [
            &[],
            &[0, 0, 0, 1],
            &[0, 0, 0, 1, 99],
            &[0, 0, 0, 1, OP_SIGN, 0, 0, 0, 1, 4],
            &[0, 0, 0, 1, OP_DATA_KEYS, 0, 0, 0, 1, 16, 0],
            &[0, 0, 0, 1, OP_UNWRAP, 0, 0, 0, 1, 9, 9],
        ];
        for frame in bad {
            assert_eq!(decode(frame), Err(Violation::Malformed), "{frame:?}");
        }
    }

    #[test]
    fn the_store_refuses_what_no_handshake_needs() {
        let store = KeyStore::default();
        let handles = store.register(&secrets());
        let tickets = handles.tickets.expect("tickets").id;
        let server = handles.server.id;
        let scheme = u16::from(SignatureScheme::ECDSA_NISTP256_SHA256);
        let cases = [
            (Request::Sign { key: server, scheme, message: b"no" }, Violation::NotAHandshake),
            (
                Request::Sign {
                    key: server,
                    scheme: u16::from(SignatureScheme::ED25519),
                    message: &tls13_server(32),
                },
                Violation::Scheme,
            ),
            (
                Request::DataKeys { tickets, count: MAX_DATA_KEYS + 1 },
                Violation::TooManyDataKeys(MAX_DATA_KEYS + 1),
            ),
        ];
        for (request, violation) in cases {
            let shown = format!("{request:?}");
            assert_eq!(store.answer(request).err(), Some(violation), "{shown}");
        }
        // A ticket that does not open, or a key retired meanwhile, is
        // refused, not a violation.
        let answer = store.answer(Request::Unwrap { tickets, wrapped: &[0; WRAPPED_LEN] });
        assert_eq!(answer, Ok(None));
        let retired = store.answer(Request::Sign { key: 999, scheme, message: &tls13_server(32) });
        assert_eq!(retired, Ok(None));
        assert_eq!(store.answer(Request::DataKeys { tickets: server, count: 1 }), Ok(None));
    }

    #[test]
    fn a_worker_signs_and_seals_through_the_gate_and_old_keys_retire() {
        let store = Arc::new(KeyStore::default());
        let secrets = secrets();
        let handles = store.register(&secrets);
        let (gate, worker) = channels(1).expect("channels");
        let served = Arc::clone(&store);
        let gate_end = gate.into_iter().next().expect("one");
        let thread = std::thread::spawn(move || answer_until_closed(&served, &gate_end));
        let client = Arc::new(KeyClient::new(worker));
        let keys = remote_keys(&client, &handles);

        let signer = keys.server.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]);
        let signature = signer.expect("a P-256 scheme").sign(&tls13_server(32)).expect("signed");
        let local = secrets.server.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]);
        assert_eq!(local.expect("scheme").scheme(), SignatureScheme::ECDSA_NISTP256_SHA256);
        assert!(signature.len() > 64, "a DER ECDSA signature: {}", signature.len());

        let tickets = keys.tickets.expect("tickets");
        let ticket = tickets.encrypt(b"session").expect("sealed");
        assert_eq!(tickets.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        let mut tampered = ticket.clone();
        tampered[WRAPPED_LEN + 3] ^= 1;
        assert_eq!(tickets.decrypt(&tampered), None);
        // The gate opens its own tickets, sealed in the worker.
        let local = secrets.tickets.as_ref().expect("keys");
        assert_eq!(local.decrypt(&ticket).as_deref(), Some(&b"session"[..]));

        // A ticket another worker or host sealed opens through the gate.
        let elsewhere = local.encrypt(b"elsewhere").expect("sealed");
        assert_eq!(tickets.decrypt(&elsewhere).as_deref(), Some(&b"elsewhere"[..]));

        // Two reloads later, the gate has the keys no more: only the
        // tickets this worker issued itself still open (without the gate).
        store.retire_all_but(&[]);
        assert!(tickets.decrypt(&elsewhere).is_some(), "the set before stays");
        store.retire_all_but(&[]);
        assert_eq!(tickets.decrypt(&elsewhere), None);
        assert_eq!(tickets.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        assert_eq!(tickets.decrypt(&tampered), None, "its data key authenticates every byte");
        drop((tickets, keys.server, client));
        assert_eq!(thread.join().expect("thread"), Ok(()), "ends when the worker closes");
    }

    #[test]
    fn a_worker_remembers_a_bounded_number_of_fresh_data_keys() {
        let keys = TicketKeys::random(Duration::from_secs(3600)).expect("keys");
        let minted: Vec<DataKey> =
            (0..=ISSUED_REMEMBERED).map(|_| keys.mint(unix_now()).expect("minted")).collect();
        let mut issued = Issued::default();
        let now = Instant::now();
        for data_key in &minted {
            issued.remember(data_key, now);
        }
        let hour = Duration::from_secs(3600);
        assert_eq!(issued.keys.len(), ISSUED_REMEMBERED);
        assert_eq!(issued.recall(&minted[0].wrapped, hour), None, "the oldest went first");
        let newest = &minted[ISSUED_REMEMBERED];
        assert_eq!(issued.recall(&newest.wrapped, hour), Some(newest.key));
        assert_eq!(issued.recall(&newest.wrapped, Duration::ZERO), None, "past its lifetime");
    }

    #[test]
    fn an_oversized_request_is_a_violation() {
        let store = KeyStore::default();
        let (gate, worker) = channels(1).expect("channels");
        let frame = vec![0u8; MAX_MESSAGE + 1];
        // SAFETY: a send of a buffer that outlives the call.
        let sent =
            unsafe { libc::send(worker[0].as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(usize::try_from(sent).ok(), Some(frame.len()));
        assert_eq!(answer_until_closed(&store, &gate[0]), Err(Violation::Size(MAX_MESSAGE + 1)));
    }
}
