//! The gate's side: the keys it answers for (the listeners' in force and
//! the set before) and a pinned thread per channel that answers the worker,
//! killing it for any violation.

use std::{
    collections::{BTreeSet, HashMap},
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::{SignatureScheme, sign::SigningKey};

use super::{
    KeyHandle, ListenerKeyHandles, MAX_DATA_KEYS, MAX_MESSAGE, MAX_REQUESTS_PER_SECOND,
    TicketHandle,
    wire::{ANSWER_OK, ANSWER_REFUSED, Request, Role, Violation, decode, signable},
};
use crate::{
    privsep::sys,
    tls::{DATA_KEY_LEN, Secrets, TicketKeys, WRAPPED_LEN},
};

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
    pub(super) fn answer(&self, request: Request<'_>) -> Result<Option<Vec<u8>>, Violation> {
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
                let now = crate::clock::since_epoch();
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
                Ok(keys.unwrap(wrapped, crate::clock::since_epoch()).map(|key| key.to_vec()))
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

pub(super) fn answer_until_closed(store: &KeyStore, channel: &OwnedFd) -> Result<(), Violation> {
    let mut buffer = vec![0u8; MAX_MESSAGE + 1];
    let mut window = (Instant::now(), 0u32);
    loop {
        let received = match sys::recv_message(channel.as_fd(), &mut buffer) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(()),
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
        if sys::send_message(channel.as_fd(), &reply).is_err() {
            return Ok(());
        }
    }
}
