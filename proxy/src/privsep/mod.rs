//! Privilege separation: the internet-facing proxy runs in a worker process
//! that holds nothing of power.
//!
//! - The **gate** (`edgegate run`, uid 0 with a few capabilities) owns the
//!   XDP program and its maps, the allowlist file, the control socket,
//!   metrics and reloads. It binds the listening sockets, reads the TLS
//!   files and resolves the backends, and starts the worker
//!   (`daemon::worker`).
//! - The **worker** (`edgegate worker`, hidden) parses every byte from the
//!   internet: PROXY headers, TLS, the relay. It runs as `daemon.user` with
//!   no capability in any set, `no_new_privs`, Landlock and seccomp
//!   (`sandbox`), and no BPF descriptor; it binds and opens nothing.
//!
//! They talk over one socketpair (`protocol`, `channel`): the gate sends
//! listeners (with their sockets and material), allowlist snapshots,
//! report requests and the drain; the worker answers. The worker writes its
//! own log lines (access logs included) to the stderr it inherited: sending
//! them through the gate would put attacker-chosen text on the gate's path
//! at connection rate, for nothing the journal does not already do.

pub mod channel;
pub mod escape;
pub mod keys;
pub mod protocol;
pub mod sandbox;
pub mod spawn;
pub mod worker;
