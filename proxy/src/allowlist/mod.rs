//! The allowlist: its model, its text format, the changes the CLI makes to it,
//! and its atomic persistence.
//!
//! Defined behaviour for the inputs people get wrong:
//! - a bare address means a host route (`/32`, `/128`);
//! - a CIDR with host bits set (`203.0.113.7/24`) is refused, naming the network
//!   it probably meant: silently widening or narrowing a security rule is worse;
//! - IPv4-mapped IPv6 (`::ffff:203.0.113.7`) is refused: such packets arrive as
//!   IPv4 on the wire, so the entry would never match; the message names the IPv4 form;
//! - the same CIDR twice with the same action collapses into one entry; with
//!   both actions it is a conflict (a file) or must be removed first (the CLI);
//! - overlapping entries are fine: the longest matching prefix decides.
//!
//! Layout: `model` (entries, the list, its verdicts), `cidr` (what a CIDR
//! may be), `format` (the text format and its problems), `change` (the
//! CLI's changes and their diff), `store` (atomic persistence).

mod change;
mod cidr;
mod format;
mod model;
mod store;

#[cfg(test)]
mod tests;

pub use self::{
    change::{Change, ChangeError, ChangeText, Diff, Refusal},
    cidr::{CidrError, parse_cidr},
    format::{ParseError, line_of},
    model::{Action, Allowlist, Entry},
    store::{StoreError, load, read, store},
};
