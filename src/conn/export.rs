//! Export selection for the handshake, backed by the plugin: which
//! export a name means, opening it, and why a client was refused.

use super::Ctx;
use crate::config::Config;
use crate::errno::Errno;
use crate::plugin::{Handle, Plugin};
use crate::protocol::consts::*;
use crate::protocol::handshake::{ExportInfo, ExportResolver, Purpose, Refusal};
use crate::protocol::transmission::ExportCaps;

/// Export selection for the handshake, backed by the plugin.
pub(super) struct Resolver<'a, 'b> {
    pub(super) ctx: &'a mut Ctx<'b>,
    pub(super) handle: &'a mut Option<Handle>,
    pub(super) caps: &'a mut Option<ExportCaps>,
    /// The TLS client certificate, shown to the plugin's `open`.
    pub(super) peer_certificate: Option<&'a [u8]>,
}

impl ExportResolver for Resolver<'_, '_> {
    fn resolve(&mut self, name: &str, purpose: Purpose) -> Result<ExportInfo, Refusal> {
        let config = self.ctx.config;
        let plugin = self.ctx.plugin;
        let name = canonical_export(config, plugin, name).map_err(|code| {
            log::info!("refused export {name:?}: no such export");
            Refusal { code, message: format!("no export named {name:?}") }
        })?;
        let handle = crate::tls::with_peer_certificate(self.peer_certificate, || plugin.open(config.readonly, name))
            .map_err(|errno| refusal(name, "open", errno))?;
        let caps = match plugin.caps(handle, config.readonly, config.max_request) {
            Ok(c) => c,
            Err(e) => {
                plugin.close(handle);
                return Err(refusal(name, "asking its size and capabilities", e));
            }
        };
        let info = ExportInfo {
            name: name.to_string(),
            description: plugin.export_description(handle).or_else(|| config.export_description.clone()),
            size: caps.size,
            flags: caps.transmission_flags(),
            block_size: caps.block_size,
        };
        match purpose {
            Purpose::Info => plugin.close(handle),
            Purpose::Go => {
                if let Some(old) = self.handle.replace(handle) {
                    plugin.close(old);
                }
                *self.caps = Some(caps);
            }
        }
        Ok(info)
    }

    fn list(&mut self) -> Vec<(String, String)> {
        let c = self.ctx.config;
        if !self.ctx.plugin.lists_exports() {
            return vec![(c.export_name.clone(), c.export_description.clone().unwrap_or_default())];
        }
        self.ctx.plugin.list_exports().unwrap_or_else(|e| {
            log::warn!("list_exports failed: {}", Errno(e));
            Vec::new()
        })
    }

    fn contexts(&mut self, name: &str) -> Result<Vec<(u32, &'static str)>, u32> {
        canonical_export(self.ctx.config, self.ctx.plugin, name)?;
        let mut v = Vec::new();
        if self.ctx.plugin.has_extents() {
            v.push((CONTEXT_BASE_ALLOCATION_ID, CONTEXT_BASE_ALLOCATION));
        }
        Ok(v)
    }
}

/// How a client learns that the plugin refused export `name` in `what`
/// with `errno`: the nearest NBD_REP_ERR_* code, the reason in words,
/// and a warning in the log (an outage must not look like a typo).
fn refusal(name: &str, what: &str, errno: i32) -> Refusal {
    // NBD has no code for "the server failed": a backend that is down,
    // out of memory or full gets PLATFORM, and the message says which.
    let code = match errno {
        libc::ENOENT => REP_ERR_UNKNOWN,
        libc::EPERM | libc::EACCES | libc::EROFS => REP_ERR_POLICY,
        libc::EINVAL => REP_ERR_INVALID,
        libc::ESHUTDOWN => REP_ERR_SHUTDOWN,
        _ => REP_ERR_PLATFORM,
    };
    let errno = if errno == 0 { libc::EIO } else { errno };
    let message = format!("export {name:?}: {what} failed: {}", Errno(errno));
    if code == REP_ERR_UNKNOWN {
        log::info!("refused {message}");
    } else {
        log::warn!("refused {message}");
    }
    Refusal { code, message }
}

/// The export a client's name stands for: "" is the default export; other
/// names must be the configured one, unless the plugin lists its own
/// exports (then its `open` judges them).
fn canonical_export<'n>(config: &'n Config, plugin: &dyn Plugin, name: &'n str) -> Result<&'n str, u32> {
    if name.is_empty() {
        Ok(&config.export_name)
    } else if name == config.export_name || plugin.lists_exports() {
        Ok(name)
    } else {
        Err(REP_ERR_UNKNOWN)
    }
}
