//! The key channel end to end: what may be signed, framing, the gate's
//! refusals and violations, and a worker signing and sealing through it.

use std::{
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{SignatureScheme, pki_types::PrivateKeyDer, server::ProducesTickets as _};

use super::{
    KeyClient, KeyStore, MAX_DATA_KEYS, MAX_MESSAGE, channels,
    client::{ISSUED_REMEMBERED, Issued},
    gate::answer_until_closed,
    remote_keys,
    wire::{OP_DATA_KEYS, OP_SIGN, OP_UNWRAP, Request, Role, Violation, decode, encode, signable},
};
use crate::{
    privsep::sys,
    tls::{DataKey, Secrets, TicketKeys, WRAPPED_LEN},
};

/// A TLS 1.3 server CertificateVerify input over a SHA-256 transcript hash.
fn tls13_server(hash_len: usize) -> Vec<u8> {
    let mut message = vec![b' '; 64];
    message.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    message.extend(std::iter::repeat_n(0xab, hash_len));
    message
}

/// A TLS 1.2 server's ECDHE parameters: randoms, named curve, point.
fn tls12_server() -> Vec<u8> {
    let mut message = vec![7; 64];
    message.extend_from_slice(&[3, 0, 23, 65]);
    message.extend(std::iter::repeat_n(4, 65));
    message
}

fn secrets() -> Secrets {
    let key = rcgen::KeyPair::generate().expect("key");
    let der = PrivateKeyDer::try_from(key.serialize_der()).expect("der");
    Secrets {
        server: rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).expect("key"),
        backend: None,
        tickets: Some(Arc::new(TicketKeys::random(Duration::from_secs(3600)).expect("keys"))),
    }
}

#[test]
fn only_what_a_handshake_signs_is_signed() {
    assert!(signable(Role::Server, &tls13_server(32)));
    assert!(signable(Role::Server, &tls13_server(48)));
    assert!(signable(Role::Server, &tls12_server()));
    let mut client = tls13_server(32);
    client[64..97].copy_from_slice(b"TLS 1.3, client CertificateVerify");
    assert!(signable(Role::BackendClient, &client));
    assert!(signable(Role::BackendClient, &[1, 0, 0, 40]), "a TLS 1.2 transcript");
    let refused: [(&str, Role, Vec<u8>); 7] = [
        ("arbitrary text", Role::Server, b"I owe you".to_vec()),
        ("a client's context for a server key", Role::Server, client.clone()),
        ("a server's context for a client key", Role::BackendClient, tls13_server(32)),
        ("a hash of no TLS length", Role::Server, tls13_server(20)),
        ("no zero byte after the context", Role::Server, {
            let mut m = tls13_server(32);
            m[97] = b'!';
            m
        }),
        ("ECDHE parameters whose point is cut short", Role::Server, {
            let mut m = tls12_server();
            m.pop();
            m
        }),
        ("nothing", Role::Server, Vec::new()),
    ];
    for (what, role, message) in refused {
        assert!(!signable(role, &message), "{what}");
    }
}

#[test]
fn requests_decode_as_encoded_and_bad_frames_do_not() {
    let wrapped = [9u8; WRAPPED_LEN];
    let requests = [
        Request::Sign { key: 7, scheme: 0x0403, message: b"m" },
        Request::DataKeys { tickets: 8, count: 16 },
        Request::Unwrap { tickets: 9, wrapped: &wrapped },
    ];
    for request in requests {
        let frame = encode(41, &request);
        assert_eq!(decode(&frame), Ok((41, request)));
    }
    let bad: [&[u8]; 6] = [
        &[],
        &[0, 0, 0, 1],
        &[0, 0, 0, 1, 99],
        &[0, 0, 0, 1, OP_SIGN, 0, 0, 0, 1, 4],
        &[0, 0, 0, 1, OP_DATA_KEYS, 0, 0, 0, 1, 16, 0],
        &[0, 0, 0, 1, OP_UNWRAP, 0, 0, 0, 1, 9, 9],
    ];
    for frame in bad {
        assert_eq!(decode(frame), Err(Violation::Malformed), "{frame:?}");
    }
}

#[test]
fn the_store_refuses_what_no_handshake_needs() {
    let store = KeyStore::default();
    let handles = store.register(&secrets());
    let tickets = handles.tickets.expect("tickets").id;
    let server = handles.server.id;
    let scheme = u16::from(SignatureScheme::ECDSA_NISTP256_SHA256);
    let cases = [
        (Request::Sign { key: server, scheme, message: b"no" }, Violation::NotAHandshake),
        (
            Request::Sign {
                key: server,
                scheme: u16::from(SignatureScheme::ED25519),
                message: &tls13_server(32),
            },
            Violation::Scheme,
        ),
        (
            Request::DataKeys { tickets, count: MAX_DATA_KEYS + 1 },
            Violation::TooManyDataKeys(MAX_DATA_KEYS + 1),
        ),
    ];
    for (request, violation) in cases {
        let shown = format!("{request:?}");
        assert_eq!(store.answer(request).err(), Some(violation), "{shown}");
    }
    // A ticket that does not open, or a key retired meanwhile, is
    // refused, not a violation.
    let answer = store.answer(Request::Unwrap { tickets, wrapped: &[0; WRAPPED_LEN] });
    assert_eq!(answer, Ok(None));
    let retired = store.answer(Request::Sign { key: 999, scheme, message: &tls13_server(32) });
    assert_eq!(retired, Ok(None));
    assert_eq!(store.answer(Request::DataKeys { tickets: server, count: 1 }), Ok(None));
}

#[test]
fn a_worker_signs_and_seals_through_the_gate_and_old_keys_retire() {
    let store = Arc::new(KeyStore::default());
    let secrets = secrets();
    let handles = store.register(&secrets);
    let (gate, worker) = channels(1).expect("channels");
    let served = Arc::clone(&store);
    let gate_end = gate.into_iter().next().expect("one");
    let thread = std::thread::spawn(move || answer_until_closed(&served, &gate_end));
    let client = Arc::new(KeyClient::new(worker));
    let keys = remote_keys(&client, &handles);

    let signer = keys.server.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]);
    let signature = signer.expect("a P-256 scheme").sign(&tls13_server(32)).expect("signed");
    let local = secrets.server.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]);
    assert_eq!(local.expect("scheme").scheme(), SignatureScheme::ECDSA_NISTP256_SHA256);
    assert!(signature.len() > 64, "a DER ECDSA signature: {}", signature.len());

    let tickets = keys.tickets.expect("tickets");
    let ticket = tickets.encrypt(b"session").expect("sealed");
    assert_eq!(tickets.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
    let mut tampered = ticket.clone();
    tampered[WRAPPED_LEN + 3] ^= 1;
    assert_eq!(tickets.decrypt(&tampered), None);
    // The gate opens its own tickets, sealed in the worker.
    let local = secrets.tickets.as_ref().expect("keys");
    assert_eq!(local.decrypt(&ticket).as_deref(), Some(&b"session"[..]));

    // A ticket another worker or host sealed opens through the gate.
    let elsewhere = local.encrypt(b"elsewhere").expect("sealed");
    assert_eq!(tickets.decrypt(&elsewhere).as_deref(), Some(&b"elsewhere"[..]));

    // Two reloads later, the gate has the keys no more: only the
    // tickets this worker issued itself still open (without the gate).
    store.retire_all_but(&[]);
    assert!(tickets.decrypt(&elsewhere).is_some(), "the set before stays");
    store.retire_all_but(&[]);
    assert_eq!(tickets.decrypt(&elsewhere), None);
    assert_eq!(tickets.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
    assert_eq!(tickets.decrypt(&tampered), None, "its data key authenticates every byte");
    drop((tickets, keys.server, client));
    assert_eq!(thread.join().expect("thread"), Ok(()), "ends when the worker closes");
}

#[test]
fn a_worker_remembers_a_bounded_number_of_fresh_data_keys() {
    let keys = TicketKeys::random(Duration::from_secs(3600)).expect("keys");
    let minted: Vec<DataKey> = (0..=ISSUED_REMEMBERED)
        .map(|_| keys.mint(crate::clock::since_epoch()).expect("minted"))
        .collect();
    let mut issued = Issued::default();
    let now = Instant::now();
    for data_key in &minted {
        issued.remember(data_key, now);
    }
    let hour = Duration::from_secs(3600);
    assert_eq!(issued.keys.len(), ISSUED_REMEMBERED);
    assert_eq!(issued.recall(&minted[0].wrapped, hour), None, "the oldest went first");
    let newest = &minted[ISSUED_REMEMBERED];
    assert_eq!(issued.recall(&newest.wrapped, hour), Some(newest.key));
    assert_eq!(issued.recall(&newest.wrapped, Duration::ZERO), None, "past its lifetime");
}

#[test]
fn an_oversized_request_is_a_violation() {
    let store = KeyStore::default();
    let (gate, worker) = channels(1).expect("channels");
    let frame = vec![0u8; MAX_MESSAGE + 1];
    let sent = sys::send_message(worker[0].as_fd(), &frame).expect("sent");
    assert_eq!(sent, frame.len());
    assert_eq!(answer_until_closed(&store, &gate[0]), Err(Violation::Size(MAX_MESSAGE + 1)));
}
