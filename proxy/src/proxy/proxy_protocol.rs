//! PROXY protocol: reading the header a load balancer puts in front of a
//! connection (v1 text or v2 binary, via the `ppp` codec), and writing a v2
//! header with TLS details for the backend.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use ppp::{HeaderResult, PartialResult as _, v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use crate::{config::ProxyProtocol, tls::Identity};

/// The largest header accepted: v1 is at most 107 bytes, and v2's TLVs from
/// a load balancer are small (AWS: a VPC endpoint id).
const MAX_HEADER_BYTES: usize = 1024;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("connection closed before the PROXY header was complete")]
    Truncated,
    #[error("not a valid PROXY protocol header: {0}")]
    Invalid(String),
    #[error("PROXY protocol {found} header where {expected:?} is configured")]
    WrongVersion { found: &'static str, expected: ProxyProtocol },
    #[error("PROXY header longer than {MAX_HEADER_BYTES} bytes")]
    TooLong,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads a PROXY header and returns the client address it reports (`None`
/// for `UNKNOWN`/`LOCAL`, e.g. the load balancer's own health checks), and the
/// stream with any bytes read past the header put back in front.
pub async fn read_header<S: AsyncRead + Unpin>(
    mut stream: S,
    mode: ProxyProtocol,
) -> Result<(Option<SocketAddr>, Prefixed<S>), HeaderError> {
    let mut buffer = Vec::with_capacity(256);
    loop {
        let mut chunk = [0u8; 256];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(HeaderError::Truncated);
        }
        buffer.extend_from_slice(&chunk[..read]);
        let parsed = HeaderResult::parse(&buffer);
        if parsed.is_incomplete() {
            if buffer.len() > MAX_HEADER_BYTES {
                return Err(HeaderError::TooLong);
            }
            continue;
        }
        let (client, length) = match parsed {
            HeaderResult::V1(Ok(header)) => {
                if mode == ProxyProtocol::V2 {
                    return Err(HeaderError::WrongVersion { found: "v1", expected: mode });
                }
                let client = match header.addresses {
                    v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    v1::Addresses::Unknown => None,
                };
                (client, header.header.len())
            }
            HeaderResult::V2(Ok(header)) => {
                if mode == ProxyProtocol::V1 {
                    return Err(HeaderError::WrongVersion { found: "v2", expected: mode });
                }
                let client = match (header.command, header.addresses) {
                    (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    _ => None,
                };
                (client, header.header.len())
            }
            HeaderResult::V1(Err(e)) => return Err(HeaderError::Invalid(e.to_string())),
            HeaderResult::V2(Err(e)) => return Err(HeaderError::Invalid(e.to_string())),
        };
        buffer.drain(..length);
        return Ok((client, Prefixed { prefix: buffer, position: 0, inner: stream }));
    }
}

/// A stream with some bytes, already read from it, put back in front.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    position: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// A stream with nothing put back.
    pub fn plain(inner: S) -> Self {
        Self { prefix: Vec::new(), position: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.position < self.prefix.len() {
            let rest = &self.prefix[self.position..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.position += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    /// hyper (the metrics endpoint) hands a response's head and body over as
    /// one list of buffers: passed on, they leave in one `writev`, where the
    /// default would send each by itself.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// PP2_TYPE_SSL and its sub-types (the PROXY protocol spec, section 2.2.6:
/// HAProxy's doc/proxy-protocol.txt).
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// The client's certificate, X.509 ASN.1 DER, a sub-type of PP2_TYPE_SSL
/// like the above; optional ("the frontend may choose to omit this TLV").
/// In the spec since its 2026/01/15 revision; go-proxyproto reads it.
const PP2_SUBTYPE_SSL_CLIENT_CERT: u8 = 0x28;
/// The client presented a certificate on this connection, and it verified.
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;
/// Custom TLVs (0xE0-0xEF is reserved for applications): the client
/// certificate's SANs, one TLV per name, DNS names and URIs.
pub const PP2_TYPE_EDGEGATE_SAN_DNS: u8 = 0xE0;
pub const PP2_TYPE_EDGEGATE_SAN_URI: u8 = 0xE1;

/// A TLV's type (1 byte) and length (2 bytes) before its value.
const TLV_HEADER_BYTES: usize = 3;
/// The bytes after the 16-byte fixed part of a v2 header (addresses and
/// TLVs) are counted in 16 bits. They include the whole SSL TLV, so a
/// certificate within this limit also fits the 16-bit lengths of the SSL
/// TLV and of its own sub-TLV.
const MAX_PAYLOAD_BYTES: usize = u16::MAX as usize;

/// What the backend is told about the client's TLS connection.
pub struct ClientTls<'a> {
    pub version: &'a str,
    pub cipher: &'a str,
    pub identity: &'a Identity,
    /// The verified leaf certificate the client presented, DER.
    pub certificate: Option<&'a [u8]>,
    /// The session was resumed: the certificate was presented when it
    /// began, not on this connection.
    pub resumed: bool,
}

/// A v2 header for the backend, and whether the client's certificate had
/// to be left out of it.
#[derive(Debug)]
pub struct BackendHeader {
    pub bytes: Vec<u8>,
    /// The certificate did not fit the header's 16-bit length beside the
    /// other TLVs: the header went without it rather than cut it short.
    pub certificate_omitted: bool,
}

/// A v2 header for the backend: the client's address; the TLS version,
/// cipher, certificate CN and the certificate itself in PP2_TYPE_SSL; the
/// certificate's SANs in edgegate's TLVs.
pub fn backend_header(
    client: SocketAddr,
    local: SocketAddr,
    tls: &ClientTls<'_>,
) -> io::Result<BackendHeader> {
    // Mixed families (an IPv4 client on an IPv6 socket) are mapped to IPv6.
    let (client, local) = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V6(l)) => {
            (SocketAddr::from((c.ip().to_ipv6_mapped(), c.port())), SocketAddr::V6(l))
        }
        (SocketAddr::V6(c), SocketAddr::V4(l)) => {
            (SocketAddr::V6(c), SocketAddr::from((l.ip().to_ipv6_mapped(), l.port())))
        }
        pair => pair,
    };
    let addresses = v2::Addresses::from((client, local));
    // The spec's client bits: the certificate came over this connection,
    // or (resumed) over the session it belongs to.
    let presented = if tls.resumed { PP2_CLIENT_CERT_SESS } else { PP2_CLIENT_CERT_CONN };
    let mut ssl = vec![PP2_CLIENT_SSL | presented, 0, 0, 0, 0];
    push_tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, tls.version.as_bytes())?;
    push_tlv(&mut ssl, PP2_SUBTYPE_SSL_CIPHER, tls.cipher.as_bytes())?;
    if let Some(cn) = &tls.identity.name.common_name {
        push_tlv(&mut ssl, PP2_SUBTYPE_SSL_CN, cn.as_bytes())?;
    }
    let names = &tls.identity.name;
    let sans = names.dns.iter().map(|name| (PP2_TYPE_EDGEGATE_SAN_DNS, name.as_bytes()));
    let sans = sans.chain(names.uris.iter().map(|uri| (PP2_TYPE_EDGEGATE_SAN_URI, uri.as_bytes())));

    // Sizes from the values at hand, checked: a certificate that would
    // overflow the length is left out, never cut.
    let without_certificate = sans
        .clone()
        .try_fold(addresses.len() + TLV_HEADER_BYTES + ssl.len(), |sum, (_, value)| {
            sum.checked_add(TLV_HEADER_BYTES + value.len())
        })
        .ok_or(io::ErrorKind::InvalidInput)?;
    let with_certificate =
        |der: &[u8]| without_certificate.checked_add(TLV_HEADER_BYTES)?.checked_add(der.len());
    let certificate = tls
        .certificate
        .filter(|der| with_certificate(der).is_some_and(|size| size <= MAX_PAYLOAD_BYTES));
    let payload = certificate.and_then(with_certificate).unwrap_or(without_certificate);
    let ssl_length = ssl.len() + certificate.map_or(0, |der| TLV_HEADER_BYTES + der.len());

    // The SSL TLV is written in pieces so that the certificate is copied
    // once, into the header, not first into `ssl`.
    let mut builder = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        addresses,
    )
    .reserve_capacity(payload - addresses.len())
    .write_payload(PP2_TYPE_SSL)?
    .write_payload(u16_length(ssl_length)?)?
    .write_payload(ssl.as_slice())?;
    if let Some(der) = certificate {
        builder = builder
            .write_payload(PP2_SUBTYPE_SSL_CLIENT_CERT)?
            .write_payload(u16_length(der.len())?)?
            .write_payload(der)?;
    }
    for (kind, value) in sans {
        builder = builder.write_tlv(kind, value)?;
    }
    Ok(BackendHeader {
        bytes: builder.build()?,
        certificate_omitted: tls.certificate.is_some() && certificate.is_none(),
    })
}

/// Appends a TLV to `buffer`; a value too long for its 16-bit length is an
/// error, not cut short.
fn push_tlv(buffer: &mut Vec<u8>, kind: u8, value: &[u8]) -> io::Result<()> {
    buffer.push(kind);
    buffer.extend_from_slice(&u16_length(value.len())?.to_be_bytes());
    buffer.extend_from_slice(value);
    Ok(())
}

fn u16_length(length: usize) -> io::Result<u16> {
    u16::try_from(length).map_err(|_| io::ErrorKind::InvalidInput.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ClientName;

    async fn read(
        bytes: &[u8],
        mode: ProxyProtocol,
    ) -> Result<(Option<SocketAddr>, Vec<u8>), HeaderError> {
        let (client, mut rest) = read_header(bytes, mode).await?;
        let mut remainder = Vec::new();
        rest.read_to_end(&mut remainder).await?;
        Ok((client, remainder))
    }

    /// A TLS flight of several records goes out in one write, not one each.
    #[tokio::test]
    async fn a_vectored_write_reaches_the_socket_whole() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sending = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut receiving, _) = listener.accept().await.unwrap();
        let mut stream = Prefixed::plain(sending);
        assert!(stream.is_write_vectored());
        let records: [&[u8]; 3] = [b"server hello", b"ccs", b"encrypted rest"];
        let slices = records.map(io::IoSlice::new);
        let written = stream.write_vectored(&slices).await.unwrap();
        assert_eq!(written, records.concat().len(), "one call took every record");
        drop(stream);
        let mut received = Vec::new();
        receiving.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, records.concat());
    }

    #[tokio::test]
    async fn v1_reports_the_client_and_keeps_what_follows() {
        let input = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 8443\r\n\x16\x03\x01";
        let (client, rest) = read(input, ProxyProtocol::Any).await.unwrap();
        assert_eq!(client, Some("203.0.113.7:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");
    }

    fn partner() -> Identity {
        Identity {
            name: ClientName {
                common_name: Some("partner".into()),
                dns: vec!["api.partner.example".into()],
                uris: vec!["spiffe://partner/ns/prod".into()],
            },
            ..Identity::default()
        }
    }

    /// Stands in for a DER certificate: the header carries it as opaque bytes.
    fn certificate(length: usize) -> Vec<u8> {
        (0..length).map(|i| (i % 251) as u8).collect()
    }

    fn header_for(identity: &Identity, certificate: Option<&[u8]>) -> BackendHeader {
        header_for_session(identity, certificate, false)
    }

    fn header_for_session(
        identity: &Identity,
        certificate: Option<&[u8]>,
        resumed: bool,
    ) -> BackendHeader {
        let tls = ClientTls { version: "TLSv1_3", cipher: "AES", identity, certificate, resumed };
        backend_header(
            "[2001:db8::7]:40000".parse().unwrap(),
            "[2001:db8::1]:8443".parse().unwrap(),
            &tls,
        )
        .unwrap()
    }

    /// PP2_TYPE_SSL's sub-TLVs, after checking that they fill its value
    /// exactly, as a strict backend would.
    fn ssl_sub_tlvs(header: &v2::Header<'_>) -> Vec<(u8, Vec<u8>)> {
        let ssl = header.tlvs().map(Result::unwrap).find(|t| t.kind == PP2_TYPE_SSL).unwrap();
        assert_eq!(ssl.value[0], PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN);
        assert_eq!(ssl.value[1..5], [0; 4], "verify: 0, the certificate verified");
        let mut rest = &ssl.value[5..];
        let mut subs = Vec::new();
        while !rest.is_empty() {
            let length = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
            let end = TLV_HEADER_BYTES + length;
            assert!(end <= rest.len(), "sub-TLV {:#x} overruns PP2_TYPE_SSL", rest[0]);
            subs.push((rest[0], rest[TLV_HEADER_BYTES..end].to_vec()));
            rest = &rest[end..];
        }
        subs
    }

    fn sub_tlv(subs: &[(u8, Vec<u8>)], kind: u8) -> Option<&[u8]> {
        subs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.as_slice())
    }

    /// The header's length field: what follows its 16-byte fixed part.
    fn length_field(bytes: &[u8]) -> usize {
        usize::from(u16::from_be_bytes([bytes[14], bytes[15]]))
    }

    #[tokio::test]
    async fn v2_round_trips_with_tlvs() {
        let identity = partner();
        let der = certificate(1200);
        let BackendHeader { bytes, certificate_omitted } = header_for(&identity, Some(&der));
        assert!(!certificate_omitted);
        assert_eq!(bytes.len(), 16 + length_field(&bytes));
        let header = v2::Header::try_from(&bytes[..]).unwrap();
        let tlvs: Vec<_> = header.tlvs().map(Result::unwrap).collect();
        assert_eq!(
            tlvs.iter().map(|t| t.kind).collect::<Vec<_>>(),
            [PP2_TYPE_SSL, PP2_TYPE_EDGEGATE_SAN_DNS, PP2_TYPE_EDGEGATE_SAN_URI]
        );
        assert_eq!(&tlvs[1].value[..], b"api.partner.example");
        assert_eq!(&tlvs[2].value[..], b"spiffe://partner/ns/prod");
        let subs = ssl_sub_tlvs(&header);
        assert_eq!(sub_tlv(&subs, PP2_SUBTYPE_SSL_VERSION), Some(&b"TLSv1_3"[..]));
        assert_eq!(sub_tlv(&subs, PP2_SUBTYPE_SSL_CIPHER), Some(&b"AES"[..]));
        assert_eq!(sub_tlv(&subs, PP2_SUBTYPE_SSL_CN), Some(&b"partner"[..]));
        assert_eq!(sub_tlv(&subs, PP2_SUBTYPE_SSL_CLIENT_CERT), Some(&der[..]));

        // Our reader takes headers of at most MAX_HEADER_BYTES (from a load
        // balancer): the round trip goes without the certificate.
        let mut bytes = header_for(&identity, None).bytes;
        bytes.extend_from_slice(b"data");
        let (reported, rest) = read(&bytes, ProxyProtocol::V2).await.unwrap();
        assert_eq!(reported, Some("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(rest, b"data");
    }

    /// Without a certificate the header is as before: no empty sub-TLV.
    #[test]
    fn no_certificate_no_certificate_tlv() {
        let BackendHeader { bytes, certificate_omitted } = header_for(&partner(), None);
        assert!(!certificate_omitted);
        let subs = ssl_sub_tlvs(&v2::Header::try_from(&bytes[..]).unwrap());
        assert_eq!(
            subs.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CIPHER, PP2_SUBTYPE_SSL_CN]
        );
    }

    /// The header's length is 16 bits: the largest certificate that fits is
    /// sent whole, one byte more and the header goes without it, and either
    /// way the rest of the header is what it would be without one.
    #[test]
    fn a_certificate_too_large_for_the_header_is_left_out_not_cut() {
        let identity = partner();
        let plain = header_for(&identity, None).bytes;
        let room = usize::from(u16::MAX) - length_field(&plain) - TLV_HEADER_BYTES;

        let largest = certificate(room);
        let fits = header_for(&identity, Some(&largest));
        assert!(!fits.certificate_omitted);
        assert_eq!(length_field(&fits.bytes), usize::from(u16::MAX));
        assert_eq!(fits.bytes.len(), 16 + usize::from(u16::MAX));
        let header = v2::Header::try_from(&fits.bytes[..]).unwrap();
        let subs = ssl_sub_tlvs(&header);
        assert_eq!(sub_tlv(&subs, PP2_SUBTYPE_SSL_CLIENT_CERT), Some(&largest[..]));
        assert_eq!(header.tlvs().count(), 3);

        for length in [room + 1, 70_000] {
            let oversized = certificate(length);
            let header = header_for(&identity, Some(&oversized));
            assert!(header.certificate_omitted, "{length} bytes");
            assert_eq!(header.bytes, plain, "{length} bytes: the header without a certificate");
        }
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 8443\r\n";
        assert!(matches!(read(v1, ProxyProtocol::V2).await, Err(HeaderError::WrongVersion { .. })));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n\r\n", ProxyProtocol::Any).await,
            Err(HeaderError::Invalid(_))
        ));
        assert!(matches!(
            read(b"PROXY TCP4 203.0", ProxyProtocol::Any).await,
            Err(HeaderError::Truncated)
        ));
    }

    #[test]
    fn a_resumed_session_says_the_certificate_came_with_the_session() {
        let identity = partner();
        for (resumed, presented) in [(false, PP2_CLIENT_CERT_CONN), (true, PP2_CLIENT_CERT_SESS)] {
            let header = header_for_session(&identity, Some(&certificate(300)), resumed);
            let parsed = v2::Header::try_from(header.bytes.as_slice()).unwrap();
            let ssl = parsed.tlvs().map(Result::unwrap).find(|t| t.kind == PP2_TYPE_SSL).unwrap();
            assert_eq!(ssl.value[0], PP2_CLIENT_SSL | presented, "resumed: {resumed}");
        }
    }
}
