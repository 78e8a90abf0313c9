//! Server settings, fixed before the loop starts.

use std::sync::Arc;
use std::time::Duration;

use crate::protocol::handshake::TlsMode;
use crate::tls::TlsSettings;

/// Default cap on ops in flight per connection.
pub(crate) const DEFAULT_MAX_INFLIGHT: usize = 4096;
/// Default cap on bytes one connection may hold (payloads, read buffers,
/// unsent replies) before its requests stop being read.
pub(crate) const DEFAULT_MAX_CONNECTION_BYTES: usize = 256 * 1024 * 1024;
/// Default cap on those bytes summed over every connection.
pub(crate) const DEFAULT_MAX_TOTAL_BYTES: usize = 1024 * 1024 * 1024;
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
    pub handshake_timeout: Option<Duration>,
    /// Answer the client with an error when the plugin takes longer.
    pub request_timeout: Option<Duration>,
    /// How long shutdown waits for the plugin before answering ESHUTDOWN.
    pub shutdown_grace: Option<Duration>,
    /// Worker threads for a synchronous plugin.
    pub threads: usize,
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
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            request_timeout: None,
            shutdown_grace: None,
            threads: DEFAULT_THREADS,
            tls_mode: TlsMode::Off,
            tls_settings: TlsSettings::default(),
            tls: None,
        }
    }
}
