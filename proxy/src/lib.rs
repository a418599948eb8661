//! edgegate: a host-level gate for backends that only a known partner may call.
//!
//! An XDP program (`proxy-ebpf`) drops packets whose source address is not on
//! the allowlist, at the NIC; this crate is the daemon that loads it and keeps
//! its maps in step with the list, and the CLI that changes the list.
//!
//! Layout, one concern per module, data flowing downwards:
//! - [`config`]: the TOML file, validated into a [`config::Config`];
//! - [`allowlist`]: the list model, its text format, changes, atomic persistence;
//! - [`filter`]: loads, attaches and pins the XDP program and owns its maps;
//! - [`daemon`]: `edgegate run`, holding the list and the filter together;
//! - [`control`]: the Unix-socket protocol between CLI and daemon.

pub mod allowlist;
pub mod config;
pub mod control;
pub mod daemon;
pub mod filter;
pub mod proxy;
pub mod tls;
