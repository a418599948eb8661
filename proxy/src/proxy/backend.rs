//! The backend leg: connect within `connect_timeout`, TLS with verification
//! when `[listener.backend_tls]` says so, and the PROXY v2 header that tells
//! the backend who the client is.

use std::net::SocketAddr;

use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::warn;

use super::{
    Settings,
    connection::Stream,
    proxy_protocol::{self, ClientTls},
};
use crate::config::SendProxyProtocol;

/// Opens the connection to the backend for `client`'s relay, or says why not.
pub(super) async fn connect(
    settings: &Settings,
    client: SocketAddr,
    local: SocketAddr,
    tls: &ClientTls<'_>,
) -> Result<Box<dyn Stream>, String> {
    let config = &settings.config;
    let connect = async {
        let stream = TcpStream::connect(settings.backend_addrs.as_slice())
            .await
            .map_err(|e| format!("backend {}: {e}", config.backend))?;
        let _ = stream.set_nodelay(true);
        let mut backend: Box<dyn Stream> = match &settings.tls.backend {
            Some(tls) => Box::new(
                tls.connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| format!("backend {} TLS: {e}", config.backend))?,
            ),
            None => Box::new(stream),
        };
        if config.send_proxy_protocol == SendProxyProtocol::V2 {
            let header = proxy_protocol::backend_header(client, local, tls)
                .map_err(|e| format!("PROXY header: {e}"))?;
            // Only a certificate the client CA issued gets this far, and a
            // backend that authorizes by it will refuse this client: the
            // operator must be able to see why.
            if header.certificate_omitted {
                warn!(
                    listener = %config.name,
                    client = %client,
                    subject = %tls.identity.subject,
                    certificate_bytes = tls.certificate.map_or(0, <[u8]>::len),
                    "PROXY v2 header sent without the client certificate \
                     (PP2_SUBTYPE_SSL_CLIENT_CERT): with the other TLVs it would pass \
                     the header's limit of 65535 bytes after the first 16"
                );
            }
            backend
                .write_all(&header.bytes)
                .await
                .map_err(|e| format!("backend {}: {e}", config.backend))?;
        }
        Ok(backend)
    };
    tokio::time::timeout(config.connect_timeout, connect).await.unwrap_or_else(|_| {
        Err(format!(
            "backend {}: no connection within {:?}",
            config.backend, config.connect_timeout
        ))
    })
}
