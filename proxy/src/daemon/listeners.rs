//! The listeners as the gate holds them: TLS files read and checked,
//! backends resolved and sockets bound, all by the gate, then handed to the
//! worker as [`Desired`]: without the private keys and ticket keys, which
//! the gate keeps in its [`KeyStore`]. A reload keeps a listener's socket
//! and, when its new files are broken, its previous ones.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{SocketAddr, ToSocketAddrs as _},
    sync::Arc,
};

use super::handover::Inherited;
use crate::{
    config::ListenerConfig,
    privsep::keys::{KeyStore, ListenerKeyHandles},
    privsep::protocol::{ListenerCounters, ListenerSpec},
    proxy::rejection::Rejection,
    status::{ListenerStatus, NotReady, ReloadOutcome, ReloadResult},
    tls::{Lifetime, ListenerTls, Material, Secrets, TlsError},
};

/// Why a listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Its TLS material is unusable.
    #[error("listener `{listener}`: {source}")]
    Tls {
        listener: String,
        #[source]
        source: TlsError,
    },
    /// The bind address is taken or not local.
    #[error("listener `{listener}`: cannot listen on {address}: {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The backend's name does not resolve.
    #[error("listener `{listener}`: backend `{backend}` does not resolve: {source}")]
    Resolve {
        listener: String,
        backend: String,
        #[source]
        source: io::Error,
    },
}

impl ListenerError {
    /// What is wrong, without the listener's name (a reload outcome names it).
    fn reason(&self) -> String {
        match self {
            Self::Tls { source, .. } => source.to_string(),
            Self::Bind { address, source, .. } => format!("cannot listen on {address}: {source}"),
            Self::Resolve { backend, source, .. } => {
                format!("backend `{backend}` does not resolve: {source}")
            }
        }
    }
}

/// One listener as the gate holds it.
struct Held {
    config: ListenerConfig,
    socket: Arc<std::net::TcpListener>,
    material: Material,
    /// Its keys in the gate's store; `None` where the worker holds them.
    keys: Option<ListenerKeyHandles>,
    backend_addrs: Vec<SocketAddr>,
    lifetimes: Vec<Lifetime>,
}

impl Held {
    /// Reads and checks the TLS files and resolves the backend; the socket
    /// is bound by the caller, or kept from the running listener. The keys
    /// go into `store`.
    fn load(
        config: &ListenerConfig,
        socket: Arc<std::net::TcpListener>,
        store: Option<&KeyStore>,
    ) -> Result<Self, ListenerError> {
        let listener = config.name.clone();
        let tls_error = |source| ListenerError::Tls { listener: listener.clone(), source };
        let material = Material::read(config).map_err(tls_error)?;
        let secrets = Secrets::read(config, &material).map_err(tls_error)?;
        let tls = ListenerTls::build(config, &material, &secrets.keys()).map_err(tls_error)?;
        let backend_addrs = resolve(&config.backend).map_err(|source| ListenerError::Resolve {
            listener: listener.clone(),
            backend: config.backend.clone(),
            source,
        })?;
        let (material, keys) = match store {
            Some(store) => (material.public(config), Some(store.register(&secrets))),
            None => (material, None),
        };
        Ok(Self {
            config: config.clone(),
            socket,
            material,
            keys,
            backend_addrs,
            lifetimes: tls.lifetimes,
        })
    }

    /// The listening socket for `config`: the one the previous gate kept
    /// in systemd's store, or a new one.
    fn bind(
        config: &ListenerConfig,
        inherited: &mut Inherited,
    ) -> Result<Arc<std::net::TcpListener>, ListenerError> {
        let error = |source| ListenerError::Bind {
            listener: config.name.clone(),
            address: config.bind,
            source,
        };
        let socket = match inherited.listener(config.bind) {
            Some(socket) => {
                // Its queue as deep as a new one's (see `listen`).
                nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::MAXALLOWABLE)
                    .map_err(|e| error(e.into()))?;
                socket
            }
            None => listen(config.bind).map_err(error)?,
        };
        defer_accept(&socket).map_err(error)?;
        Ok(Arc::new(socket))
    }

    fn spec(&self) -> ListenerSpec {
        ListenerSpec {
            config: self.config.clone(),
            backend_addrs: self.backend_addrs.clone(),
            material: self.material.clone(),
            keys: self.keys.clone(),
        }
    }
}

/// A listening socket on `address` whose queue of connections not yet
/// accepted is as deep as the host allows (`net.core.somaxconn`, 4096 by
/// default). The standard library's 128 is too shallow for a proxy whose
/// handshakes cost CPU: a burst of new connections while the workers are
/// busy would have its SYNs dropped past it, each client then waiting a
/// second or more to retry.
fn listen(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = std::net::TcpListener::bind(address)?;
    // On a listening socket listen() only sets the queue's length; -1 asks
    // for the host's limit.
    nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::MAXALLOWABLE)?;
    Ok(socket)
}

/// How long the kernel holds a connection that has sent nothing yet.
const DEFER_ACCEPT_SECONDS: libc::c_int = 1;

/// `TCP_DEFER_ACCEPT`: the kernel hands a connection over only once its
/// first bytes (a ClientHello, or a PROXY header) have arrived, so a worker
/// is woken once per connection, with something to read, instead of for the
/// accept and again for the data. A client that sends nothing is handed over
/// after about [`DEFER_ACCEPT_SECONDS`] anyway and then held to
/// `handshake_timeout` as before; until then it costs the kernel a request
/// socket, not the worker a descriptor and a task.
fn defer_accept(socket: &std::net::TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let seconds = DEFER_ACCEPT_SECONDS;
    // SAFETY: the option value is a c_int that lives across the call, its
    // size given; the descriptor is an open socket.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Every address of `backend` (`host:port`); at least one.
pub(crate) fn resolve(backend: &str) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = backend.to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::other("no address"));
    }
    Ok(addrs)
}

/// The listeners, as handed to the worker.
pub struct Listeners {
    held: BTreeMap<String, Held>,
    /// Where their keys are kept (`None`: the worker gets them).
    keys: Option<Arc<KeyStore>>,
}

impl Listeners {
    /// Reads every listener's files, resolves its backend and binds its
    /// address; fails whole, so that a daemon never starts with half its
    /// listeners.
    /// Sockets the previous gate handed over (`inherited`) are taken over.
    pub fn prepare(
        configs: &[ListenerConfig],
        inherited: &mut Inherited,
        keys: Option<Arc<KeyStore>>,
    ) -> Result<Self, ListenerError> {
        let mut held = BTreeMap::new();
        for config in configs {
            let socket = Held::bind(config, inherited)?;
            held.insert(config.name.clone(), Held::load(config, socket, keys.as_deref())?);
        }
        Ok(Self { held, keys })
    }

    /// Every listening socket, by address.
    pub fn sockets(&self) -> impl Iterator<Item = (SocketAddr, &std::net::TcpListener)> {
        self.held.values().map(|held| (held.config.bind, &*held.socket))
    }

    /// Applies a new set of listener configs. A listener whose new files do
    /// not load keeps its previous ones, and the outcome says why.
    pub fn reload(&mut self, configs: &[ListenerConfig]) -> Vec<ReloadOutcome> {
        let mut outcomes = Vec::new();
        let wanted: BTreeMap<&str, SocketAddr> =
            configs.iter().map(|c| (c.name.as_str(), c.bind)).collect();
        self.held.retain(|name, held| {
            let keep = wanted.get(name.as_str()) == Some(&held.config.bind);
            if !keep {
                outcomes
                    .push(ReloadOutcome { listener: name.clone(), result: ReloadResult::Stopped });
            }
            keep
        });
        for config in configs {
            let result = match self.held.get(&config.name) {
                Some(running) => {
                    match Held::load(config, Arc::clone(&running.socket), self.keys.as_deref()) {
                        Ok(held) => {
                            self.held.insert(config.name.clone(), held);
                            ReloadResult::Reloaded
                        }
                        Err(e) => ReloadResult::KeptPrevious(e.reason()),
                    }
                }
                None => match Held::bind(config, &mut Inherited::default())
                    .and_then(|socket| Held::load(config, socket, self.keys.as_deref()))
                {
                    Ok(held) => {
                        self.held.insert(config.name.clone(), held);
                        ReloadResult::Started
                    }
                    Err(e) => ReloadResult::NotStarted(e.to_string()),
                },
            };
            outcomes.push(ReloadOutcome { listener: config.name.clone(), result });
        }
        if let Some(store) = &self.keys {
            let live: Vec<&ListenerKeyHandles> =
                self.held.values().filter_map(|held| held.keys.as_ref()).collect();
            store.retire_all_but(&live);
        }
        outcomes
    }

    pub(super) fn desired(&self) -> Desired {
        Desired {
            specs: self.held.values().map(Held::spec).collect(),
            sockets: self.held.values().map(|held| Arc::clone(&held.socket)).collect(),
            connect_ports: self.connect_ports(),
        }
    }

    /// The backends' addresses and ports: all a worker may connect to.
    pub(super) fn destinations(&self) -> BTreeSet<SocketAddr> {
        self.held.values().flat_map(|h| h.backend_addrs.iter().copied()).collect()
    }

    /// The backends' ports (Landlock's rules know only ports).
    pub(super) fn connect_ports(&self) -> BTreeSet<u16> {
        self.held.values().flat_map(|h| h.backend_addrs.iter().map(SocketAddr::port)).collect()
    }

    /// Closes the gate's copies of the listening sockets (at shutdown).
    pub fn close(&mut self) {
        self.held.clear();
    }

    /// The listeners' status, with the counters the worker reported.
    pub fn status(&self, report: Option<&[ListenerCounters]>) -> Vec<ListenerStatus> {
        self.held
            .values()
            .map(|held| {
                let counters = report.and_then(|r| r.iter().find(|c| c.name == held.config.name));
                let count = |pick: fn(&ListenerCounters) -> u64| counters.map_or(0, pick);
                ListenerStatus {
                    name: held.config.name.clone(),
                    bind: held.config.bind,
                    backend: held.config.backend.clone(),
                    active: count(|c| c.active),
                    handshakes_ok: count(|c| c.handshakes_ok),
                    rejected: counters
                        .map(|c| {
                            Rejection::ALL
                                .iter()
                                .zip(&c.rejected)
                                .filter(|(_, n)| **n > 0)
                                .map(|(r, n)| (r.as_str().to_owned(), *n))
                                .collect()
                        })
                        .unwrap_or_default(),
                    bytes_from_clients: count(|c| c.bytes_from_clients),
                    bytes_to_clients: count(|c| c.bytes_to_clients),
                    backend_failures: count(|c| c.backend_failures),
                    relay_errors: count(|c| c.relay_errors),
                    lifetimes: held.lifetimes.clone(),
                }
            })
            .collect()
    }

    /// Whether the worker accepts on every listener, per its report.
    pub fn verify_accepting(&self, report: &[ListenerCounters]) -> Result<(), NotReady> {
        match self.held.keys().find(|name| !report.iter().any(|c| &&c.name == name && c.accepting))
        {
            Some(name) => Err(NotReady::NotAccepting { listener: name.clone() }),
            None => Ok(()),
        }
    }
}

/// What every worker must serve: a new one gets it whole.
#[derive(Clone)]
pub(super) struct Desired {
    pub(super) specs: Vec<ListenerSpec>,
    pub(super) sockets: Vec<Arc<std::net::TcpListener>>,
    pub(super) connect_ports: BTreeSet<u16>,
}

#[cfg(test)]
mod tests {
    use std::{net::TcpStream, time::Duration};

    use super::*;

    #[test]
    fn listeners_hand_over_connections_only_once_they_have_sent_something() {
        use std::os::fd::AsRawFd as _;
        let socket = listen("127.0.0.1:0".parse().unwrap()).expect("listen");
        defer_accept(&socket).expect("TCP_DEFER_ACCEPT");
        let mut seconds: libc::c_int = 0;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the value and its length are writable locals; the socket is open.
        let result = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                std::ptr::from_mut(&mut seconds).cast(),
                &mut length,
            )
        };
        assert_eq!(result, 0);
        assert!(seconds >= DEFER_ACCEPT_SECONDS, "{seconds}");
    }

    #[test]
    fn the_listen_queue_is_as_deep_as_the_host_allows() {
        let host_limit: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("net.core.somaxconn")
            .trim()
            .parse()
            .expect("a number");
        // Past the standard library's 128, below anything a test should open.
        let burst = host_limit.min(300);
        let socket = listen("127.0.0.1:0".parse().unwrap()).expect("listen");
        let address = socket.local_addr().unwrap();
        // Nothing accepts: each connection waits in the queue. One that
        // does not fit has its SYN dropped and would time out.
        let queued: Vec<TcpStream> = (0..burst)
            .map_while(|_| TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok())
            .collect();
        assert_eq!(queued.len(), burst, "connections queued before one was refused");
    }
}
