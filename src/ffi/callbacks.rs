//! A C plugin as the core's `Plugin`: every call into plugin code goes
//! through here.
//!
//! Both plugin APIs end up here: an asynchronous plugin's I/O callbacks are
//! called directly; a synchronous plugin's are queued to the worker pool.
//! Either way the op is finished through the completion queue.

use std::ffi::{CStr, CString, c_int, c_void};

use super::plugin::*;
use super::sync_plugin::nbdkit_plugin;
use super::worker_pool::{Job, SyncIo, ThreadModel, WorkerPool};
use crate::completion::Token;
use crate::plugin::{Handle, Io, IoRequest, Plugin, Started};
use crate::protocol::transmission::{ExportCaps, FuaMode};

/// A C plugin (either API) behind the core's `Plugin` trait.
pub(crate) struct CPlugin {
    /// Open, close, size and capabilities; for a synchronous plugin the I/O
    /// fields here are all None.
    raw: nbdkit_plugin_lowlevel,
    user_data: *mut c_void,
    pub name: String,
    /// Set for a synchronous plugin.
    pool: Option<WorkerPool>,
}

// SAFETY: the plugin's callbacks are only ever called from the one event-loop
// thread; the struct just carries the pointers there.
unsafe impl Send for CPlugin {}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn clear_errno() {
    // SAFETY: __errno_location always returns this thread's errno.
    unsafe { *libc::__errno_location() = 0 };
}

/// errno after a failed callback, EIO if it left none.
fn failure_errno() -> i32 {
    match errno() {
        0 => libc::EIO,
        e => e,
    }
}

impl CPlugin {
    /// # Safety
    /// `raw`'s function pointers must be valid for the life of the plugin.
    pub unsafe fn new(raw: nbdkit_plugin_lowlevel, user_data: *mut c_void) -> Result<CPlugin, &'static str> {
        if raw.get_size.is_none() || raw.pread.is_none() {
            return Err("plugin needs at least get_size and pread callbacks");
        }
        // SAFETY: forwarded from the caller.
        Ok(unsafe { CPlugin::new_common(raw, user_data) })
    }

    /// # Safety
    /// `sync`'s function pointers must be valid for the life of the plugin.
    pub unsafe fn new_sync(sync: &nbdkit_plugin, user_data: *mut c_void) -> Result<CPlugin, &'static str> {
        let model = ThreadModel::from_c(sync.thread_model).ok_or("unknown thread model")?;
        if sync.get_size.is_none() || sync.pread.is_none() {
            return Err("plugin needs at least get_size and pread callbacks");
        }
        let io = SyncIo {
            pread: sync.pread,
            pwrite: sync.pwrite,
            flush: sync.flush,
            trim: sync.trim,
            zero: sync.zero,
            cache: sync.cache,
            extents: sync.extents,
        };
        // SAFETY: all-zero is a valid struct of NULL pointers and None callbacks.
        let mut raw: nbdkit_plugin_lowlevel = unsafe { std::mem::zeroed() };
        raw.name = sync.name;
        raw.open = sync.open;
        raw.close = sync.close;
        raw.get_size = sync.get_size;
        raw.can_write = sync.can_write;
        raw.can_flush = sync.can_flush;
        raw.can_trim = sync.can_trim;
        raw.can_zero = sync.can_zero;
        raw.can_fua = sync.can_fua;
        raw.can_multi_conn = sync.can_multi_conn;
        raw.can_cache = sync.can_cache;
        raw.list_exports = sync.list_exports;
        // SAFETY: forwarded from the caller.
        let mut p = unsafe { CPlugin::new_common(raw, user_data) };
        p.pool = Some(WorkerPool::new(io, model));
        Ok(p)
    }

    /// # Safety
    /// As for [`CPlugin::new`], without the I/O checks.
    unsafe fn new_common(raw: nbdkit_plugin_lowlevel, user_data: *mut c_void) -> CPlugin {
        let name = if raw.name.is_null() {
            "plugin".to_string()
        } else {
            // SAFETY: the caller promised a valid C string.
            unsafe { CStr::from_ptr(raw.name) }.to_string_lossy().into_owned()
        };
        CPlugin { raw, user_data, name, pool: None }
    }

    /// Does the plugin offer this I/O at all?
    fn has(&self, io: Io) -> bool {
        if let Some(pool) = &self.pool {
            return pool.io().has(io);
        }
        let r = &self.raw;
        match io {
            Io::Read => r.pread.is_some(),
            Io::Write => r.pwrite.is_some(),
            Io::Flush => r.flush.is_some(),
            Io::Trim => r.trim.is_some(),
            Io::Zero => r.zero.is_some(),
            Io::Cache => r.cache.is_some(),
            Io::Extents => r.extents.is_some(),
        }
    }

    /// The plugin's block size constraints, checked, or the defaults.
    fn block_size(&self, h: Handle, max_request: u32) -> Result<(u32, u32, u32), i32> {
        let Some(f) = self.raw.block_size else { return Ok((1, 4096, max_request)) };
        let (mut min, mut pref, mut max) = (0u32, 0u32, 0u32);
        clear_errno();
        // SAFETY: plugin contract; the out pointers are live locals.
        if unsafe { f(h.0, &mut min, &mut pref, &mut max) } < 0 {
            return Err(failure_errno());
        }
        let valid = min.is_power_of_two()
            && min <= 65536
            && pref.is_power_of_two()
            && pref >= min
            && max >= min
            && max % min == 0;
        if !valid {
            log::error!("{}: invalid block sizes {min}/{pref}/{max}", self.name);
            return Err(libc::EINVAL);
        }
        // Above the server's limit, round down to a multiple of the minimum.
        let max = if max > max_request { max_request - max_request % min } else { max };
        Ok((min, pref.min(max.max(min)), max))
    }
}

impl Plugin for CPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    /// Does the plugin report allocation (base:allocation)?
    fn has_extents(&self) -> bool {
        self.has(Io::Extents)
    }

    /// Does the plugin list its own exports?
    fn lists_exports(&self) -> bool {
        self.raw.list_exports.is_some()
    }

    /// The plugin's export list, for NBD_OPT_LIST.
    fn list_exports(&self) -> Result<Vec<(String, String)>, i32> {
        let Some(list_exports) = self.raw.list_exports else { return Ok(Vec::new()) };
        let mut list = crate::ffi::plugin::ExportList::default();
        clear_errno();
        // SAFETY: plugin contract; `list` outlives the call.
        let r = unsafe { list_exports(self.user_data, (&mut list as *mut crate::ffi::plugin::ExportList).cast()) };
        if r < 0 { Err(failure_errno()) } else { Ok(list.items) }
    }

    /// The open export's own description, if the plugin gives one.
    fn export_description(&self, h: Handle) -> Option<String> {
        let f = self.raw.export_description?;
        // SAFETY: plugin contract: NULL or a C string valid while h is open.
        let p = unsafe { f(h.0) };
        if p.is_null() {
            return None;
        }
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        (s.len() <= 4096).then(|| s.into_owned())
    }

    fn open(&self, readonly: bool, export_name: &str) -> Result<Handle, i32> {
        let Some(open) = self.raw.open else { return Ok(Handle(self.user_data)) };
        let name = CString::new(export_name).map_err(|_| libc::EINVAL)?;
        clear_errno();
        // SAFETY: plugin contract; `name` outlives the call.
        let h = unsafe { open(self.user_data, readonly as c_int, name.as_ptr()) };
        if h.is_null() { Err(failure_errno()) } else { Ok(Handle(h)) }
    }

    fn close(&self, h: Handle) {
        if let Some(close) = self.raw.close {
            // SAFETY: plugin contract; each handle is closed once.
            unsafe { close(h.0) };
        }
    }

    /// Asks every capability once, for a connection that just opened `h`.
    /// Requests are capped at `max_request` bytes (the server's setting).
    fn caps(&self, h: Handle, readonly: bool, max_request: u32) -> Result<ExportCaps, i32> {
        clear_errno();
        // SAFETY: get_size presence checked in new().
        let size = unsafe { (self.raw.get_size.unwrap())(h.0) };
        if size < 0 {
            return Err(failure_errno());
        }
        let ask = |cb: Option<unsafe extern "C" fn(*mut c_void) -> c_int>, default: bool| -> Result<bool, i32> {
            match cb {
                None => Ok(default),
                // SAFETY: plugin contract.
                Some(f) => match unsafe { f(h.0) } {
                    r if r < 0 => Err(failure_errno()),
                    r => Ok(r > 0),
                },
            }
        };
        let raw = &self.raw;
        let writable = !readonly && self.has(Io::Write) && ask(raw.can_write, true)?;
        let can_flush = self.has(Io::Flush) && ask(raw.can_flush, true)?;
        let fua = match raw.can_fua {
            None if can_flush => FuaMode::Emulate,
            None => FuaMode::None,
            // SAFETY: plugin contract.
            Some(f) => match unsafe { f(h.0) } {
                NBDKIT_FUA_NONE => FuaMode::None,
                NBDKIT_FUA_EMULATE if can_flush => FuaMode::Emulate,
                NBDKIT_FUA_EMULATE => FuaMode::None,
                NBDKIT_FUA_NATIVE => FuaMode::Native,
                _ => return Err(failure_errno()),
            },
        };
        let can_zero = writable && self.has(Io::Zero) && ask(raw.can_zero, true)?;
        Ok(ExportCaps {
            size: size as u64,
            writable,
            can_flush,
            can_trim: writable && self.has(Io::Trim) && ask(raw.can_trim, true)?,
            can_zero,
            can_fast_zero: can_zero && ask(raw.can_fast_zero, false)?,
            block_size: self.block_size(h, max_request)?,
            base_allocation: false,
            extended_headers: false,
            can_cache: self.has(Io::Cache) && ask(raw.can_cache, true)?,
            can_multi_conn: ask(raw.can_multi_conn, false)?,
            fua,
            structured_replies: false,
        })
    }

    /// Tells the plugin an op is no longer wanted (it must still reply).
    fn cancel(&self, token: Token, h: Handle) {
        if let Some(cancel) = self.raw.cancel {
            // SAFETY: plugin contract; the op is live and unanswered.
            unsafe { cancel(token.0 as usize as *mut nbdkit_op, h.0) };
        }
    }

    /// Hands an op to the plugin. `buf` is the read buffer or write payload.
    /// `conn` is the connection's serial (thread models serialize by it).
    #[allow(clippy::too_many_arguments)]
    fn start(&self, rq: IoRequest) -> Started {
        let IoRequest { io, token, conn, handle: h, buf, count, offset, flags } = rq;
        if let Some(pool) = &self.pool {
            pool.submit(Job { token, conn, io, handle: h, buf: buf.as_mut_ptr(), count, offset, flags });
            return Started::Taken;
        }
        let op = token.0 as usize as *mut nbdkit_op;
        let r = &self.raw;
        clear_errno();
        // SAFETY: plugin contract. Callbacks are present: validation only
        // lets through commands whose callback exists. `buf` lives in the op
        // table until the op's reply, as the API promises.
        let status = unsafe {
            match io {
                Io::Read => r.pread.unwrap()(op, h.0, buf.as_mut_ptr().cast(), count, offset, flags),
                Io::Write => r.pwrite.unwrap()(op, h.0, buf.as_ptr().cast(), count, offset, flags),
                Io::Flush => r.flush.unwrap()(op, h.0, flags),
                Io::Trim => r.trim.unwrap()(op, h.0, count, offset, flags),
                Io::Zero => r.zero.unwrap()(op, h.0, count, offset, flags),
                Io::Cache => r.cache.unwrap()(op, h.0, count, offset, flags),
                Io::Extents => r.extents.unwrap()(op, h.0, count, offset, flags),
            }
        };
        started(status)
    }

    fn serializes_connections(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| p.model() == ThreadModel::SerializeConnections)
    }

    fn start_workers(&mut self, n: usize) -> std::io::Result<()> {
        match self.pool.as_mut() {
            Some(p) => p.start(n),
            None => Ok(()),
        }
    }

    fn stop_workers(&mut self) {
        if let Some(p) = self.pool.as_mut() {
            p.stop();
        }
    }

    fn for_another_loop(&self) -> Option<Box<dyn Plugin>> {
        if self.pool.is_some() {
            return None;
        }
        let copy = CPlugin { raw: self.raw, user_data: self.user_data, name: self.name.clone(), pool: None };
        Some(Box::new(copy))
    }
}

/// Largest errno a callback may return negated (as the kernel's MAX_ERRNO).
const MAX_ERRNO: c_int = 4095;

/// What an I/O callback's return value says (see `nbdkit_plugin_lowlevel`),
/// read with errno still as the callback left it: 0 taken, -1 errno, -E
/// that errno, positive a bug.
fn started(status: c_int) -> Started {
    match status {
        0 => Started::Taken,
        -1 => Started::Failed(failure_errno()),
        s if (-MAX_ERRNO..-1).contains(&s) => Started::Failed(-s),
        s if s < 0 => Started::Failed(libc::EIO),
        s => Started::Misuse(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_status_values() {
        assert_eq!(started(0), Started::Taken);
        assert_eq!(started(-libc::ENOSPC), Started::Failed(libc::ENOSPC));
        assert_eq!(started(-100_000), Started::Failed(libc::EIO));
        assert_eq!(started(1), Started::Misuse(1));
        clear_errno();
        assert_eq!(started(-1), Started::Failed(libc::EIO), "-1 with errno 0 is EIO");
    }
}
