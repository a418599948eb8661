//! TLS towards a backend that wants it: the client config, with the
//! listener's client certificate when the backend asks for one.

use std::sync::Arc;

use rustls::{ClientConfig, crypto::CryptoProvider, pki_types::ServerName, sign::SigningKey};
use tokio_rustls::TlsConnector;

use super::{
    checks::{certified_key, served_versions},
    error::{Named, TlsError},
    material::{Material, certificates},
    server::{OneCertificate, root_store, versions},
};
use crate::config::{BackendTlsConfig, TlsVersion};

/// TLS towards the backend.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

pub(super) fn backend_tls(
    config: &BackendTlsConfig,
    provider: Arc<CryptoProvider>,
    material: &Material,
    key: Option<&Arc<dyn SigningKey>>,
) -> Result<BackendTls, TlsError> {
    let cas = certificates("backend_tls.ca", &config.ca, material)?;
    let roots = root_store("backend_tls.ca", &config.ca, cas)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(TlsVersion::Tls12))
        .map_err(|source| TlsError::Rustls { key: "backend_tls", source })?
        .with_root_certificates(roots);
    let client = match (&config.cert, &config.key, key) {
        (Some(cert), Some(key_path), Some(key)) => {
            let chain = certificates("backend_tls.cert", cert, material)?;
            served_versions("backend_tls.cert", cert, &chain)?;
            let certified = certified_key(
                chain,
                key,
                Named::new("backend_tls.cert", cert),
                Named::new("backend_tls.key", key_path),
            )?;
            builder.with_client_cert_resolver(Arc::new(OneCertificate(Arc::new(certified))))
        }
        _ => builder.with_no_client_auth(),
    };
    let server_name = ServerName::try_from(config.server_name.clone())
        .map_err(|_| TlsError::ServerName(config.server_name.clone()))?;
    Ok(BackendTls { connector: TlsConnector::from(Arc::new(client)), server_name })
}
