//! Server settings, fixed before the loop starts.

use std::sync::Arc;
use std::time::Duration;

use crate::protocol::handshake::TlsMode;
use crate::tls::TlsSettings;

/// Default cap on ops in flight per connection.
pub(crate) const DEFAULT_MAX_INFLIGHT: usize = 4096;
/// Default cap on bytes one connection may hold (payloads, read buffers,
/// unsent replies) before its requests stop being read: room for 64 reads
/// of 1 MiB in flight, and 16 such clients before the total is reached.
pub(crate) const DEFAULT_MAX_CONNECTION_BYTES: usize = 64 * 1024 * 1024;
/// Default cap on those bytes summed over every connection.
pub(crate) const DEFAULT_MAX_TOTAL_BYTES: usize = 1024 * 1024 * 1024;
/// Largest READ or WRITE by default, as nbdkit's: above qemu-nbd's 32 MiB,
/// so that clients sending 42 MiB requests (nbd-server's test suite) work.
pub(crate) const DEFAULT_MAX_REQUEST: u32 = 64 * 1024 * 1024;
/// The largest maximum a server may set: a request this size is held in
/// memory whole.
pub(crate) const MAX_REQUEST_LIMIT: u32 = 1 << 30;
/// Worker threads for a synchronous plugin, as nbdkit's default.
pub(crate) const DEFAULT_THREADS: usize = 16;
/// A client gets this long to finish the handshake (as qemu-nbd).
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    pub readonly: bool,
    pub export_name: String,
    pub export_description: Option<String>,
    pub max_inflight: usize,
    pub max_connection_bytes: usize,
    pub max_total_bytes: usize,
    /// 0 means no limit.
    pub max_connections: usize,
    /// Largest READ or WRITE, advertised in NBD_INFO_BLOCK_SIZE.
    pub max_request: u32,
    pub handshake_timeout: Option<Duration>,
    /// Answer the client with an error when the plugin takes longer.
    pub request_timeout: Option<Duration>,
    /// How long shutdown waits for the plugin before answering ESHUTDOWN.
    pub shutdown_grace: Option<Duration>,
    /// Worker threads for a synchronous plugin.
    pub threads: usize,
    /// Event loops (threads) serving connections; 1 is the classic model.
    pub loops: usize,
    pub tls_mode: TlsMode,
    pub tls_settings: TlsSettings,
    /// Built from `tls_settings` when the loop starts.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            readonly: false,
            export_name: String::new(),
            export_description: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_connection_bytes: DEFAULT_MAX_CONNECTION_BYTES,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            max_connections: 0,
            max_request: DEFAULT_MAX_REQUEST,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            request_timeout: None,
            shutdown_grace: None,
            threads: DEFAULT_THREADS,
            loops: 1,
            tls_mode: TlsMode::Off,
            tls_settings: TlsSettings::default(),
            tls: None,
        }
    }
}
