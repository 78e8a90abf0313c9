//! TLS settings (NBD_OPT_STARTTLS) and the client certificate for `open`.

use std::ffi::{CStr, c_char, c_int};
use std::path::Path;

use super::server::{nbdkit_server, with_setup};
use super::{guard, neg};
use crate::errno::Describe;
use crate::protocol::handshake::TlsMode;
use crate::tls::{Origin, TlsSettings};

/// No TLS: NBD_OPT_STARTTLS is refused (the default).
pub const NBDKIT_TLS_OFF: c_int = 0;
/// Clients may start TLS, or stay in plaintext.
pub const NBDKIT_TLS_ALLOW: c_int = 1;
/// Clients must start TLS first: every other option is answered
/// NBD_REP_ERR_TLS_REQD, and not even the export list is shown before.
pub const NBDKIT_TLS_REQUIRE: c_int = 2;

/// Sets the TLS mode (NBDKIT_TLS_*). A mode other than OFF needs
/// certificates (`nbdkit_server_set_tls_certificates` or
/// `nbdkit_server_set_tls_pem`); `nbdkit_main_loop` fails without them.
/// Set-up thread only. Returns 0 or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_tls(srv: *mut nbdkit_server, mode: c_int) -> c_int {
    with_setup(srv, "nbdkit_server_set_tls", |l| {
        l.config.tls_mode = match mode {
            NBDKIT_TLS_OFF => TlsMode::Off,
            NBDKIT_TLS_ALLOW => TlsMode::Allow,
            NBDKIT_TLS_REQUIRE => TlsMode::Require,
            _ => return neg(libc::EINVAL),
        };
        0
    })
}

/// Loads the server's certificate and key from a directory laid out as
/// nbdkit, qemu and libnbd expect: `server-cert.pem` (the chain, leaf
/// first) and `server-key.pem`, plus `ca-cert.pem` if present (used to
/// verify clients, see `nbdkit_server_set_tls_verify_peer`). The files
/// are read and checked now (PEM syntax, the key matching the
/// certificate, a key type and size the TLS stack accepts: RSA of 2048
/// bits or more, ECDSA, Ed25519); an error names the file and the reason
/// in the log. Set-up thread only. Returns 0, or a negative errno: the
/// file's errno (ENOENT, EACCES) when it cannot be read, EINVAL when its
/// contents are refused; the settings are then unchanged.
///
/// # Safety
/// `dir` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_set_tls_certificates(srv: *mut nbdkit_server, dir: *const c_char) -> c_int {
    with_setup(srv, "nbdkit_server_set_tls_certificates", |l| {
        if dir.is_null() {
            return neg(libc::EINVAL);
        }
        // SAFETY: the caller passes a NUL-terminated string.
        let dir = Path::new(unsafe { CStr::from_ptr(dir) }.to_str().unwrap_or(""));
        let name = |f: &str| dir.join(f).display().to_string();
        let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| (name(f), e));
        let (cert, key) = match (read("server-cert.pem"), read("server-key.pem")) {
            (Ok(c), Ok(k)) => (c, k),
            (Err((file, e)), _) | (_, Err((file, e))) => {
                log::error!("TLS: cannot read {file}: {}", Describe(&e));
                return neg(e.raw_os_error().unwrap_or(libc::EINVAL));
            }
        };
        let read = |f: &str| std::fs::read(dir.join(f));
        let settings = TlsSettings {
            certificate_chain: cert,
            private_key: key,
            client_ca: read("ca-cert.pem").ok(),
            verify_peer: l.config.tls_settings.verify_peer,
            origin: Origin {
                certificate_chain: name("server-cert.pem"),
                private_key: name("server-key.pem"),
                client_ca: name("ca-cert.pem"),
            },
        };
        adopt(l, settings)
    })
}

/// Takes new TLS settings once they pass `TlsSettings::check`.
fn adopt(l: &mut crate::event_loop::EventLoop, settings: TlsSettings) -> c_int {
    match settings.check() {
        Ok(()) => {
            l.config.tls_settings = settings;
            0
        }
        Err(e) => {
            log::error!("TLS: {}", Describe(&e));
            neg(libc::EINVAL)
        }
    }
}

/// Sets the server's certificate chain and key, and optionally the CA
/// for client verification, from PEM text in memory (copied). `ca_pem`
/// may be NULL. They are checked now, as by
/// `nbdkit_server_set_tls_certificates`. Set-up thread only. Returns 0,
/// or -EINVAL (logged with the reason) when they are refused.
///
/// # Safety
/// Each non-NULL argument must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_set_tls_pem(
    srv: *mut nbdkit_server,
    certificate_chain_pem: *const c_char,
    private_key_pem: *const c_char,
    ca_pem: *const c_char,
) -> c_int {
    with_setup(srv, "nbdkit_server_set_tls_pem", |l| {
        if certificate_chain_pem.is_null() || private_key_pem.is_null() {
            return neg(libc::EINVAL);
        }
        // SAFETY: the caller passes NUL-terminated strings.
        let bytes = |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_bytes().to_vec();
        let settings = TlsSettings {
            certificate_chain: bytes(certificate_chain_pem),
            private_key: bytes(private_key_pem),
            client_ca: (!ca_pem.is_null()).then(|| bytes(ca_pem)),
            verify_peer: l.config.tls_settings.verify_peer,
            origin: Origin::default(),
        };
        adopt(l, settings)
    })
}

/// Requires TLS clients to present a certificate signed by the CA
/// (`ca-cert.pem`, or `ca_pem`) when `verify` is non-zero: mutual TLS.
/// Others fail the TLS handshake. Set-up thread only. Returns 0 or a
/// negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_tls_verify_peer(srv: *mut nbdkit_server, verify: c_int) -> c_int {
    with_setup(srv, "nbdkit_server_set_tls_verify_peer", |l| {
        l.config.tls_settings.verify_peer = verify != 0;
        0
    })
}

/// The verified certificate (DER) the TLS client presented, for access
/// control. Only meaningful inside the plugin's `open` callback, on its
/// thread. `len` (if not NULL) receives its size.
///
/// Returns the certificate's bytes, valid until `open` returns; NULL
/// outside `open`, and when the client did not use TLS or sent no
/// certificate.
///
/// # Safety
/// `len` must be NULL or point to a writable size_t.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_tls_peer_certificate(len: *mut usize) -> *const u8 {
    guard("nbdkit_tls_peer_certificate", std::ptr::null(), || {
        let (p, n) = crate::tls::peer_certificate();
        if !len.is_null() {
            // SAFETY: the caller passes NULL or a writable size_t.
            unsafe { *len = n };
        }
        p
    })
}
