//! edgegate: a host-level gate for backends that only a known partner may call.
//!
//! An XDP program (`proxy-ebpf`) drops packets whose source address is not on
//! the allowlist, at the NIC; this crate is the daemon that loads it, keeps
//! its maps in step with the list and terminates mutual TLS for the
//! connections that get through, and the CLI that changes the list.
//!
//! Layout, one concern per module, data flowing downwards:
//! - [`config`]: the TOML file, validated into a [`config::Config`];
//! - [`allowlist`]: the list model, its text format, changes, atomic persistence;
//! - [`filter`]: loads, attaches and pins the XDP program and owns its maps;
//! - [`daemon`]: `edgegate run`, holding the list and the filter together;
//! - [`control`]: the Unix-socket protocol between CLI and daemon;
//! - [`fleet`]: fleet mode: the group's list in etcd, followed by every host;
//! - [`learned`]: authenticated clients the list does not allow, as suggested entries;
//! - [`tls`]: rustls configs, client identity rules, rejection reasons;
//! - [`proxy`]: the mTLS listeners: accept, PROXY protocol, handshake, relay;
//! - [`metrics`]: `/metrics`, `/healthz` and `/readyz` over HTTP;
//! - [`privileges`]: what the gate keeps of root after start-up, and who the worker runs as;
//! - [`privsep`]: the sandboxed proxy worker, its start and its protocol with the gate;
//! - [`aws`]: AWS's published address ranges, for `allow import-aws`;
//! - [`accept`]: the accept loop the control socket, metrics and the worker's listeners share;
//! - [`clock`]: wall-clock time as Unix time, for what crosses hosts, files and certificates;
//! - [`files`]: atomic, link-safe state files and the state lock.

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
