//! Privilege separation: the internet-facing proxy runs in a worker process
//! that holds nothing of power.
//!
//! - The **gate** (`edgegate run`, uid 0 with a few capabilities) owns the
//!   XDP program and its maps, the allowlist file, the control socket,
//!   metrics and reloads. It binds the listening sockets, reads the TLS
//!   files and resolves the backends, and starts the worker
//!   (`daemon::worker`).
//! - The **worker** (`edgegate worker`, hidden) parses every byte from the
//!   internet: PROXY headers, TLS, the relay. It runs as a uid of its own
//!   with no capability in any set, `no_new_privs`, Landlock and seccomp
//!   (`sandbox`), in a cgroup whose programs let it connect to its backends
//!   only (`daemon::egress`), and with no BPF descriptor and no private key;
//!   it binds and opens nothing.
//!
//! They talk over one socketpair (`protocol`, `channel`): the gate sends
//! listeners (with their sockets and material), allowlist snapshots,
//! report requests and the drain; the worker answers. Keys stay in the
//! gate, which signs and makes ticket data keys over key channels
//! (`keys`). The worker's log lines go through a pipe to the gate, which
//! labels them as the worker's (`daemon::worker_log`).
//!
//! Every raw system call of all this is in `sys`.

pub mod channel;
#[cfg(feature = "test-hooks")]
pub mod escape;
pub mod keys;
pub mod log_batch;
pub mod protocol;
pub mod sandbox;
pub mod spawn;
mod sys;
pub mod worker;
