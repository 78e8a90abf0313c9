//! TLS set-up with rustls: certificates from PEM, optional client
//! verification, and the client certificate shown to the plugin's `open`.

use std::cell::Cell;
use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// PEM material and policy, as set by the host.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    pub certificate_chain: Vec<u8>,
    pub private_key: Vec<u8>,
    /// CA certificates client certificates must chain to (mutual TLS).
    pub client_ca: Option<Vec<u8>>,
    pub verify_peer: bool,
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

impl TlsSettings {
    /// The rustls server configuration these settings describe.
    pub fn build(&self) -> io::Result<Arc<rustls::ServerConfig>> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.certificate_chain)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(format!("server certificate: {e}")))?;
        if chain.is_empty() {
            return Err(invalid("no server certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.private_key).map_err(|e| invalid(format!("server key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(invalid)?;
        let builder = if self.verify_peer {
            let ca = self.client_ca.as_ref().ok_or_else(|| invalid("verifying clients needs a CA certificate"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                roots.add(cert.map_err(|e| invalid(format!("CA certificate: {e}")))?).map_err(invalid)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(invalid)?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).map_err(invalid)?;
        Ok(Arc::new(config))
    }
}

thread_local! {
    /// The verified client certificate of the connection whose `open` is
    /// running on this (the loop) thread.
    static PEER_CERTIFICATE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Runs `f` (a call to the plugin's `open`) with `cert` visible through
/// `nbdkit_tls_peer_certificate`.
pub fn with_peer_certificate<R>(cert: Option<&[u8]>, f: impl FnOnce() -> R) -> R {
    let value = cert.map_or((std::ptr::null(), 0), |c| (c.as_ptr(), c.len()));
    PEER_CERTIFICATE.with(|p| p.set(value));
    let r = f();
    PEER_CERTIFICATE.with(|p| p.set((std::ptr::null(), 0)));
    r
}

/// The certificate set by [`with_peer_certificate`], if any.
pub fn peer_certificate() -> (*const u8, usize) {
    PEER_CERTIFICATE.with(|p| p.get())
}
