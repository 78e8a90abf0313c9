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
    /// Where each came from (a file name), for error messages.
    pub origin: Origin,
}

/// The names errors give the certificate, key and CA.
#[derive(Debug, Clone)]
pub struct Origin {
    pub certificate_chain: String,
    pub private_key: String,
    pub client_ca: String,
}

impl Default for Origin {
    fn default() -> Self {
        Origin {
            certificate_chain: "the certificate chain PEM".into(),
            private_key: "the private key PEM".into(),
            client_ca: "the CA PEM".into(),
        }
    }
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

impl TlsSettings {
    fn chain(&self) -> io::Result<Vec<CertificateDer<'static>>> {
        let origin = &self.origin.certificate_chain;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.certificate_chain)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(format!("{origin}: not a PEM certificate: {e}")))?;
        if chain.is_empty() {
            return Err(invalid(format!("{origin}: no certificate in it")));
        }
        Ok(chain)
    }

    fn key(&self) -> io::Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(&self.private_key)
            .map_err(|e| invalid(format!("{}: not a PEM private key: {e}", self.origin.private_key)))
    }

    fn roots(&self) -> io::Result<Option<rustls::RootCertStore>> {
        let Some(ca) = self.client_ca.as_ref() else { return Ok(None) };
        let origin = &self.origin.client_ca;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca) {
            let cert = cert.map_err(|e| invalid(format!("{origin}: not a PEM certificate: {e}")))?;
            roots.add(cert).map_err(|e| invalid(format!("{origin}: {e}")))?;
        }
        Ok(Some(roots))
    }

    /// Checks the certificate, key and CA as soon as they are set, so that
    /// a bad file is reported by the call that names it.
    pub fn check(&self) -> io::Result<()> {
        self.roots()?;
        self.server_config(false).map(|_| ())
    }

    /// The rustls server configuration these settings describe.
    pub fn build(&self) -> io::Result<Arc<rustls::ServerConfig>> {
        self.server_config(self.verify_peer).map(Arc::new)
    }

    fn server_config(&self, verify_peer: bool) -> io::Result<rustls::ServerConfig> {
        let (chain, key) = (self.chain()?, self.key()?);
        // aws-lc-rs, not ring: ring refuses RSA moduli that are not a
        // multiple of 512 bits, such as GnuTLS certtool's old 2432-bit default.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Loaded once on its own, so that an unusable key is named as such.
        provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| invalid(format!("{}: unusable private key: {e}", self.origin.private_key)))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(invalid)?;
        let builder = if verify_peer {
            let roots =
                self.roots()?.ok_or_else(|| invalid("verifying clients needs a CA certificate (ca-cert.pem)"))?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(invalid)?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder.with_single_cert(chain, key).map_err(|e| {
            let o = &self.origin;
            invalid(format!("{} with {}: {e}", o.certificate_chain, o.private_key))
        })
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
