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

    /// rustls hands a whole flight over as one list of records (ServerHello,
    /// ChangeCipherSpec, the encrypted rest): passed on, it leaves in one
    /// `writev`, where the default would send each record by itself.
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

/// PP2_TYPE_SSL and its sub-types (the PROXY protocol spec, section 2.2.5).
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// The client presented a certificate on this connection, and it verified.
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// Custom TLVs (0xE0-0xEF is reserved for applications): the client
/// certificate's SANs, one TLV per name, DNS names and URIs.
pub const PP2_TYPE_EDGEGATE_SAN_DNS: u8 = 0xE0;
pub const PP2_TYPE_EDGEGATE_SAN_URI: u8 = 0xE1;

/// A v2 header for the backend: the client's address, and the TLS version,
/// cipher, and certificate CN and SANs.
pub fn backend_header(
    client: SocketAddr,
    local: SocketAddr,
    tls_version: &str,
    cipher: &str,
    identity: &Identity,
) -> io::Result<Vec<u8>> {
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
    let mut ssl = vec![PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0, 0, 0, 0];
    let mut sub_tlv = |kind: u8, value: &[u8]| {
        ssl.push(kind);
        ssl.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
        ssl.extend_from_slice(&value[..value.len().min(usize::from(u16::MAX))]);
    };
    sub_tlv(PP2_SUBTYPE_SSL_VERSION, tls_version.as_bytes());
    sub_tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.as_bytes());
    if let Some(cn) = &identity.name.common_name {
        sub_tlv(PP2_SUBTYPE_SSL_CN, cn.as_bytes());
    }
    let mut builder = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (client, local),
    )
    .write_tlv(PP2_TYPE_SSL, &ssl)?;
    for name in &identity.name.dns {
        builder = builder.write_tlv(PP2_TYPE_EDGEGATE_SAN_DNS, name.as_bytes())?;
    }
    for uri in &identity.name.uris {
        builder = builder.write_tlv(PP2_TYPE_EDGEGATE_SAN_URI, uri.as_bytes())?;
    }
    builder.build()
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

    #[tokio::test]
    async fn v2_round_trips_with_tlvs() {
        let identity = Identity {
            name: ClientName {
                common_name: Some("partner".into()),
                dns: vec!["api.partner.example".into()],
                uris: vec!["spiffe://partner/ns/prod".into()],
            },
            ..Identity::default()
        };
        let client = "[2001:db8::7]:40000".parse().unwrap();
        let mut header = backend_header(
            client,
            "[2001:db8::1]:8443".parse().unwrap(),
            "TLSv1_3",
            "AES",
            &identity,
        )
        .unwrap();
        header.extend_from_slice(b"data");
        let parsed = v2::Header::try_from(&header[..header.len() - 4]).unwrap();
        let tlvs: Vec<_> = parsed.tlvs().map(Result::unwrap).collect();
        assert_eq!(tlvs[0].kind, PP2_TYPE_SSL);
        assert!(tlvs[0].value.windows(7).any(|w| w == b"partner"));
        assert_eq!(tlvs[1].kind, PP2_TYPE_EDGEGATE_SAN_DNS);
        assert_eq!(&tlvs[2].value[..], b"spiffe://partner/ns/prod");
        let (reported, rest) = read(&header, ProxyProtocol::V2).await.unwrap();
        assert_eq!(reported, Some(client));
        assert_eq!(rest, b"data");
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
}
