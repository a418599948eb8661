//! edgegate: a host-level gate for backends that only a known partner may call.
//!
//! An XDP program (`proxy-ebpf`) drops packets whose source address is not on
//! the allowlist, at the NIC; this crate is the daemon that loads it, keeps
//! its maps in step with the list and terminates mutual TLS for the
//! connections that get through, and the CLI that changes the list.
//!
//! One binary, `edgegate`, runs as three kinds of process; data flows one
//! way: config → daemon state → (XDP maps, listeners), and the CLI, `status`
//! and `/metrics` only read what the daemon publishes. The modules, by the
//! process that runs them:
//!
//! **The gate** (`edgegate run`, root until start-up is done):
//! - [`daemon`]: start-up, the state (the list in force and what enforces
//!   it, changed as one transaction), the control socket's server, the
//!   worker's supervisor, reloads and the handover between gates;
//! - [`filter`]: loads, attaches and pins the XDP program and owns its maps
//!   (and the one capacity rule of those maps);
//! - [`fleet`]: fleet mode: the group's list in etcd, followed by every host;
//! - [`preflight`]: what `check` and every start inspect first;
//! - [`privileges`]: what the gate keeps of root, and who the worker runs as;
//! - [`metrics`]: `/metrics`, `/healthz` and `/readyz` over HTTP;
//! - [`learned`]: authenticated clients the list does not allow, as suggestions.
//!
//! **The worker** (`edgegate worker`, sandboxed, started by the gate):
//! - [`privsep`]: its start, sandbox and protocol with the gate, the key
//!   service that keeps private keys in the gate, and (one file) every raw
//!   system call privilege separation makes;
//! - [`proxy`]: the mTLS listeners: admission, PROXY protocol, handshake,
//!   backend, relay.
//!
//! **Shared** by the gate, the worker and the CLI:
//! - [`config`]: the TOML file, validated into a [`config::Config`];
//! - [`allowlist`]: the list model, its text format, changes (parsed once), persistence;
//! - [`control`]: the Unix-socket protocol between CLI and daemon, its error kinds;
//! - [`tls`]: certificates and keys, rustls configs, identity rules, rejection reasons;
//! - [`status`]: what `status`, `/metrics` and `/readyz` report;
//! - [`accept`]: the accept loop of the control socket, metrics and the listeners;
//! - [`files`]: atomic, link-safe state files, bounded reads, the state lock, one I/O error;
//! - [`clock`]: wall-clock time as Unix time (what crosses hosts, files, certificates).
//!
//! **The CLI** is the binary's `cli` module (arguments, one file per command
//! family, the typed answer and the exit status), with [`aws`] (AWS's
//! published ranges, for `allow import-aws`) and [`demo`] (`edgegate demo`:
//! namespaces and a PKI, which the tests reuse).

pub mod accept;
pub mod allowlist;
pub mod aws;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod files;
pub mod filter;
pub mod fleet;
pub mod learned;
pub mod metrics;
pub mod preflight;
pub mod privileges;
pub mod privsep;
pub mod proxy;
pub mod status;
pub mod tls;
