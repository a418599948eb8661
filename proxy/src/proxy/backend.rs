//! The backend leg: connect within `connect_timeout`, TLS with verification
//! when `[listener.backend_tls]` says so, and the PROXY v2 header that tells
//! the backend who the client is.

use std::net::SocketAddr;

use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::{Settings, connection::Stream, proxy_protocol};
use crate::{config::SendProxyProtocol, tls::Identity};

/// Opens the connection to the backend for `client`'s relay, or says why not.
pub(super) async fn connect(
    settings: &Settings,
    client: SocketAddr,
    local: SocketAddr,
    version: &str,
    cipher: &str,
    identity: &Identity,
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
            let header = proxy_protocol::backend_header(client, local, version, cipher, identity)
                .map_err(|e| format!("PROXY header: {e}"))?;
            backend
                .write_all(&header)
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
