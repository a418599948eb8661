//! The key channel's messages: requests as the worker frames them and the
//! gate strictly decodes them, the answers' status byte, and the only
//! messages a key may sign.

use crate::tls::WRAPPED_LEN;

/// What a key may sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// A listener's key: TLS server handshakes.
    Server,
    /// `backend_tls.key`: TLS client handshakes with the backend.
    BackendClient,
}

pub(super) const OP_SIGN: u8 = 1;
pub(super) const OP_DATA_KEYS: u8 = 2;
pub(super) const OP_UNWRAP: u8 = 3;
pub(super) const ANSWER_OK: u8 = 0;
pub(super) const ANSWER_REFUSED: u8 = 1;

/// A request, as the gate decodes it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Request<'a> {
    Sign { key: u32, scheme: u16, message: &'a [u8] },
    DataKeys { tickets: u32, count: u8 },
    Unwrap { tickets: u32, wrapped: &'a [u8] },
}

/// Why the gate killed a worker over its key channel.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum Violation {
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
pub(super) fn decode(frame: &[u8]) -> Result<(u32, Request<'_>), Violation> {
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

pub(super) fn encode(sequence: u32, request: &Request<'_>) -> Vec<u8> {
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
pub(super) fn signable(role: Role, message: &[u8]) -> bool {
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
