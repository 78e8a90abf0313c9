//! Server settings, fixed before the loop starts.

/// Default cap on ops in flight per connection.
pub(crate) const DEFAULT_MAX_INFLIGHT: usize = 4096;
/// Default cap on bytes held per connection (payloads, read buffers, unsent replies).
pub(crate) const DEFAULT_MAX_INFLIGHT_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub readonly: bool,
    pub export_name: String,
    pub export_description: Option<String>,
    pub max_inflight: usize,
    pub max_inflight_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            readonly: false,
            export_name: String::new(),
            export_description: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
        }
    }
}
