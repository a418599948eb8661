//! The client's TLS connection on rustls's unbuffered API: this module owns
//! the buffers, so a connection that waits holds none. (rustls's buffered
//! connection keeps a 4 KiB receive buffer for as long as it lives: a third
//! of what an idle connection cost the worker.) [`accept`] runs the
//! handshake; the [`TlsStream`] it returns reads and writes like
//! tokio-rustls's, with both halves polled from one task (as the relay
//! does): a read may send, and the socket keeps one write waker.
//!
//! Every step goes through [`TlsStream::process`]: it hands rustls the TLS
//! bytes received so far, takes out what the client sent (into `plaintext`)
//! and what rustls wants sent (into `outgoing`), and encrypts the caller's
//! data when rustls allows. Reads drain `plaintext` before receiving more;
//! writes wait until the records before them have left (backpressure).
//!
//! TLS 1.3 session tickets, which the server sends once the client's
//! Finished is in, wait when a request came with that Finished: they leave
//! with the answer, in one send, instead of waking the client once for them
//! and once more for the answer.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use rustls::{
    CommonState, ServerConfig,
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{
        ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
    },
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much a receive asks for at least: what rustls's buffered connection
/// reads at a time.
const READ_SIZE: usize = 4096;
/// A TLS record at its largest on the wire: 16 KiB of plaintext, 2 KiB of
/// expansion, the 5-byte header.
const MAX_RECORD: usize = 16 * 1024 + 2048 + 5;
/// The most TLS bytes held before rustls has taken them: a handshake message
/// at rustls's limit (64 KiB) spread over records, and one record more.
const MAX_INCOMING: usize = 0xffff + MAX_RECORD;
/// The most plaintext one write encrypts (four full records): `outgoing`
/// stays bounded whatever the caller hands over at once.
const MAX_WRITE: usize = 64 * 1024;

/// A server-side TLS connection over `io`, its handshake done.
pub struct TlsStream<S> {
    conn: UnbufferedServerConnection,
    io: S,
    /// TLS bytes received that rustls has not taken yet.
    incoming: Buffer,
    /// TLS bytes to send.
    outgoing: Buffer,
    /// Decrypted bytes not read yet.
    plaintext: Buffer,
    /// The client sent close_notify: after `plaintext`, the end of the stream.
    peer_closed: bool,
    /// The TCP stream ended.
    eof: bool,
    /// This side's close_notify is in `outgoing` (or gone).
    closing: bool,
    /// `outgoing` holds session tickets that wait for the first write.
    tickets_wait: bool,
    /// rustls refused what the client sent: nothing more is read or written.
    failed: bool,
}

/// What [`TlsStream::process`] is to encrypt once the received records are
/// processed.
enum Outbound<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Runs the server side of a TLS handshake over `io`. A refused handshake
/// sends the client rustls's alert before the error comes back; the error
/// wraps the [`rustls::Error`] (as tokio-rustls's does) when TLS refused.
pub async fn accept<S>(config: Arc<ServerConfig>, io: S) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
    let mut stream = TlsStream {
        conn,
        io,
        incoming: Buffer::default(),
        outgoing: Buffer::default(),
        plaintext: Buffer::default(),
        peer_closed: false,
        eof: false,
        closing: false,
        tickets_wait: false,
        failed: false,
    };
    loop {
        if let Err(error) = stream.step(Outbound::Nothing) {
            // rustls's alert says why: it leaves first (or not at all, if
            // the client is gone).
            let _ = std::future::poll_fn(|cx| stream.poll_send(cx)).await;
            return Err(error);
        }
        let done = !stream.conn.is_handshaking();
        stream.tickets_wait = done && stream.tickets_may_wait();
        if !stream.tickets_wait {
            std::future::poll_fn(|cx| stream.poll_send(cx)).await?;
        }
        if done {
            return Ok(stream);
        }
        if stream.eof {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
        }
        std::future::poll_fn(|cx| stream.poll_receive(cx)).await?;
    }
}

impl<S> TlsStream<S> {
    /// The connection's TLS facts: version, suite, the client's certificates,
    /// whether it resumed.
    pub fn session(&self) -> &CommonState {
        &self.conn
    }

    /// Whether what is left to send once the handshake is done may wait for
    /// the first write: in TLS 1.3 that is only session tickets (in TLS 1.2
    /// it may be the server's Finished, which the client waits for), and a
    /// request that came with the client's Finished is about to be answered.
    fn tickets_may_wait(&self) -> bool {
        self.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
            && !self.plaintext.is_empty()
            && !self.outgoing.is_empty()
    }

    /// Hands rustls the received bytes, keeps what it decrypted and what it
    /// wants sent, and encrypts `send` once it may: how many of `send`'s
    /// bytes it took.
    fn process(&mut self, send: Outbound<'_>) -> Result<usize, rustls::Error> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(self.incoming.data_mut());
            let state = match state {
                Ok(state) => state,
                Err(error) => {
                    self.incoming.consume(discard);
                    return Err(error);
                }
            };
            let mut done = None;
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        self.plaintext.extend(record.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut record) => {
                    encode(&mut record, &mut self.outgoing)?
                }
                // What is encoded leaves in order with what follows it.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::WriteTraffic(mut traffic) => {
                    done = Some(match send {
                        Outbound::Nothing => 0,
                        Outbound::Data(data) => {
                            encrypt(&mut traffic, &mut self.outgoing, Some(data))?;
                            data.len()
                        }
                        Outbound::CloseNotify => {
                            encrypt(&mut traffic, &mut self.outgoing, None)?;
                            0
                        }
                    });
                }
                // More bytes are needed, or both sides have closed.
                ConnectionState::BlockedHandshake | ConnectionState::Closed => done = Some(0),
                // Early data is off (`max_early_data_size` 0); a state a
                // later rustls adds is not one this stream can serve.
                _ => return Err(rustls::Error::General("unexpected TLS connection state".into())),
            }
            self.incoming.consume(discard);
            if let Some(taken) = done {
                return Ok(taken);
            }
        }
    }

    /// [`Self::process`], where a refusal breaks the connection for good:
    /// rustls's alert is queued to leave, and every later call fails
    /// without giving rustls the same bytes again.
    fn step(&mut self, send: Outbound<'_>) -> io::Result<usize> {
        self.check()?;
        self.process(send).map_err(|error| {
            self.failed = true;
            // After this side's close_notify, nothing more is sent.
            if !self.closing {
                self.encode_alert();
            }
            invalid_data(error)
        })
    }

    /// Fails once rustls has refused the connection.
    fn check(&self) -> io::Result<()> {
        match self.failed {
            true => Err(io::Error::new(io::ErrorKind::InvalidData, "the TLS connection failed")),
            false => Ok(()),
        }
    }

    /// After an error, moves what rustls queued (its alert) to `outgoing`,
    /// without letting it read the bytes that failed a second time.
    fn encode_alert(&mut self) {
        // While rustls holds records to send, it hands them out before it
        // reads anything.
        while self.conn.wants_write() {
            let status = self.conn.process_tls_records(self.incoming.data_mut());
            let Ok(ConnectionState::EncodeTlsData(mut record)) = status.state else { return };
            if encode(&mut record, &mut self.outgoing).is_err() {
                return;
            }
        }
    }

    /// Frees the buffers that hold nothing: the connection waits.
    fn release(&mut self) {
        self.incoming.release();
        self.outgoing.release();
        self.plaintext.release();
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Sends `outgoing` until the socket takes no more.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, self.outgoing.data()))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.consume(written);
        }
        Poll::Ready(Ok(()))
    }

    /// Receives once into `incoming`, with room for at least [`READ_SIZE`]
    /// bytes or as many as it holds already; a receive that has to wait
    /// gives the empty buffers back first.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let held = self.incoming.len();
        let room = held.max(READ_SIZE).min(MAX_INCOMING - held);
        if room == 0 {
            let error = rustls::Error::General("TLS records beyond what a message may take".into());
            return Poll::Ready(Err(invalid_data(error)));
        }
        let spare = self.incoming.spare(room);
        let limit = spare.len().min(MAX_INCOMING - held);
        let mut read = ReadBuf::new(&mut spare[..limit]);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Pending => {
                self.release();
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let received = read.filled().len();
                self.eof = received == 0;
                self.incoming.filled(received);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        loop {
            if !this.plaintext.is_empty() {
                let ready = this.plaintext.data();
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.plaintext.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A truncation attack looks like this: not an end of stream.
                let error =
                    io::Error::new(io::ErrorKind::UnexpectedEof, "TCP closed without close_notify");
                return Poll::Ready(Err(error));
            }
            // What rustls queued while reading (an alert) leaves without
            // waiting for the caller to write. (Its answer to a key update
            // waits for the next write, as RFC 8446 allows; so do tickets.)
            if !this.tickets_wait
                && let Poll::Ready(Err(error)) = this.poll_send(cx)
            {
                return Poll::Ready(Err(error));
            }
            ready!(this.poll_receive(cx))?;
            if let Err(error) = this.step(Outbound::Nothing) {
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(error));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // One write's records wait to leave at most (and the tickets, which
        // leave with them).
        if !this.tickets_wait {
            ready!(this.poll_send(cx))?;
        }
        this.tickets_wait = false;
        let data = &data[..data.len().min(MAX_WRITE)];
        let taken = this.step(Outbound::Data(data))?;
        if taken == 0 {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What the socket does not take now leaves on the next write or flush.
        if let Poll::Ready(Err(error)) = this.poll_send(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tickets_wait = false;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Sends close_notify, then closes the socket's sending half.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            this.tickets_wait = false;
            this.step(Outbound::CloseNotify)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Appends the record rustls has ready to `out`.
fn encode(
    record: &mut EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Buffer,
) -> Result<(), rustls::Error> {
    append(out, |room| {
        record.encode(room).map_err(|error| match error {
            EncodeError::InsufficientSize(size) => Fit::Needs(size.required_size),
            error => Fit::Failed(rustls::Error::General(error.to_string())),
        })
    })
}

/// Appends `data` encrypted to `out`, or close_notify if there is no `data`.
fn encrypt(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    out: &mut Buffer,
    data: Option<&[u8]>,
) -> Result<(), rustls::Error> {
    append(out, |room| {
        let result = match data {
            Some(data) => traffic.encrypt(data, room),
            None => traffic.queue_close_notify(room),
        };
        result.map_err(|error| match error {
            EncryptError::InsufficientSize(size) => Fit::Needs(size.required_size),
            error => Fit::Failed(rustls::Error::General(error.to_string())),
        })
    })
}

/// What a producer of TLS bytes said of the room it was given.
enum Fit {
    /// It needs this many bytes.
    Needs(usize),
    Failed(rustls::Error),
}

/// Appends to `buffer` what `produce` writes into the room it is given,
/// growing the room to what `produce` asks for.
fn append(
    buffer: &mut Buffer,
    mut produce: impl FnMut(&mut [u8]) -> Result<usize, Fit>,
) -> Result<(), rustls::Error> {
    let mut room = 0;
    loop {
        match produce(buffer.spare(room)) {
            Ok(written) => {
                buffer.filled(written);
                return Ok(());
            }
            Err(Fit::Needs(size)) if size > room => room = size,
            Err(Fit::Needs(_)) => {
                let error = "TLS output does not fit the room it asked for";
                return Err(rustls::Error::General(error.into()));
            }
            Err(Fit::Failed(error)) => return Err(error),
        }
    }
}

/// Bytes held, `start..end` of `room`. The room stays initialized (zeroed
/// once, when it grows), so filling it again costs no clearing: rustls
/// encrypts and reads into initialized slices only.
#[derive(Default)]
struct Buffer {
    room: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffer {
    fn data(&self) -> &[u8] {
        &self.room[self.start..self.end]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.room[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    /// The room after the bytes held, at least `at_least` long.
    fn spare(&mut self, at_least: usize) -> &mut [u8] {
        spare::take(&mut self.room);
        if self.room.len() - self.end < at_least && self.start > 0 {
            self.room.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.room.len() - self.end < at_least {
            self.room.resize(self.end + at_least, 0);
        }
        &mut self.room[self.end..]
    }

    /// `count` bytes of [`Self::spare`] now hold data.
    fn filled(&mut self, count: usize) {
        self.end += count;
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.spare(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        self.filled(bytes.len());
    }

    /// The first `count` bytes held are done with.
    fn consume(&mut self, count: usize) {
        self.start += count;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Gives the room away if it holds nothing.
    fn release(&mut self) {
        if self.is_empty() {
            spare::give(&mut self.room);
            (self.start, self.end) = (0, 0);
        }
    }
}

/// Buffers that connections waiting on this thread gave back, for the next
/// one that receives or sends: a connection moving data gives its buffers
/// back between bursts, and the allocator would otherwise return a large
/// one to the kernel and fault it in again at the next. A worker thread
/// serves one core and keeps enough for the connections streaming on it at
/// once, each at most a whole handshake's worth, held only after bursts.
mod spare {
    use std::cell::RefCell;

    const KEPT: usize = 16;
    const LARGEST: usize = super::MAX_INCOMING;

    thread_local! {
        static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// Gives `room` a spare one if it has none.
    pub(super) fn take(room: &mut Vec<u8>) {
        if room.capacity() == 0
            && let Some(spare) = BUFFERS.with_borrow_mut(Vec::pop)
        {
            *room = spare;
        }
    }

    /// Keeps `room` for another, or frees it. (What it held stays in it:
    /// only its taker writes it before reading it.)
    pub(super) fn give(room: &mut Vec<u8>) {
        let room = std::mem::take(room);
        if room.capacity() == 0 || room.capacity() > LARGEST {
            return;
        }
        BUFFERS.with_borrow_mut(|spares| {
            if spares.len() < KEPT {
                spares.push(room);
            }
        });
    }
}

fn invalid_data(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests;
