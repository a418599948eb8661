//! TLS for the listeners: server configs that require and verify client
//! certificates (chain, validity, key usage, revocation, identity rules), and
//! client configs for backends that want TLS too.
//!
//! Identity rules are checked inside the handshake, by wrapping WebPKI's
//! verifier: a client whose certificate is valid but not allowed gets a TLS
//! alert (`access_denied`) and never reaches the backend. A resumed session
//! skips the verifier, so [`ListenerTls::recheck`] runs it again on the
//! certificate the session carries: the rules and CRLs in force now decide.
//!
//! Layout: `material` reads and parses the files, `checks` refuses what rustls
//! would refuse without naming the file, `server` and `backend` build the
//! configs, `verifier` applies the `identity` rules, `error` words every
//! refusal, `lifetimes` tells when the files expire and `tickets` seals
//! session tickets.

mod backend;
mod checks;
mod error;
mod identity;
mod lifetimes;
mod material;
mod server;
mod tickets;
mod verifier;

#[cfg(test)]
mod tests;

pub use self::{
    backend::BackendTls,
    error::{ChainOrder, FileProblem, Labels, Named, PemProblem, TlsError, pem_problem},
    identity::{ClientName, Identity, IdentityRules},
    lifetimes::{Lifetime, LifetimeKind},
    material::{ListenerKeys, Material, Secrets, parse_certificates, parse_private_key},
    server::ListenerTls,
    tickets::{
        DATA_KEY_MAX_AGE, DataKey, KEY_LEN as DATA_KEY_LEN, TicketKeys, TicketKeysError,
        WRAPPED_LEN, open_ticket, seal_ticket, wrapped_nonce, wrapped_part,
    },
};
