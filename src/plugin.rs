//! The library's view of a C plugin: opening exports, asking capabilities
//! and starting I/O. Every call into plugin code goes through here.

use std::ffi::{c_int, c_void, CStr, CString};

use crate::completion::Token;
use crate::ffi::plugin::*;
use crate::protocol::transmission::{ExportCaps, FuaMode};

/// The plugin's per-connection handle from `open`.
#[derive(Clone, Copy, Debug)]
pub struct Handle(pub *mut c_void);

/// The I/O an op asks of the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    Cache,
}

pub struct Plugin {
    raw: nbdkit_plugin_lowlevel,
    user_data: *mut c_void,
    pub name: String,
}

// SAFETY: the plugin's callbacks are only ever called from the one event-loop
// thread; the struct just carries the pointers there.
unsafe impl Send for Plugin {}

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

impl Plugin {
    /// # Safety
    /// `raw`'s function pointers must be valid for the life of the plugin.
    pub unsafe fn new(raw: nbdkit_plugin_lowlevel, user_data: *mut c_void) -> Result<Plugin, &'static str> {
        if raw.get_size.is_none() || raw.pread.is_none() {
            return Err("plugin needs at least get_size and pread callbacks");
        }
        let name = if raw.name.is_null() {
            "plugin".to_string()
        } else {
            // SAFETY: the caller promised a valid C string.
            unsafe { CStr::from_ptr(raw.name) }.to_string_lossy().into_owned()
        };
        Ok(Plugin { raw, user_data, name })
    }

    pub fn open(&self, readonly: bool, export_name: &str) -> Result<Handle, i32> {
        let Some(open) = self.raw.open else { return Ok(Handle(self.user_data)) };
        let name = CString::new(export_name).map_err(|_| libc::EINVAL)?;
        clear_errno();
        // SAFETY: plugin contract; `name` outlives the call.
        let h = unsafe { open(self.user_data, readonly as c_int, name.as_ptr()) };
        if h.is_null() { Err(failure_errno()) } else { Ok(Handle(h)) }
    }

    pub fn close(&self, h: Handle) {
        if let Some(close) = self.raw.close {
            // SAFETY: plugin contract; each handle is closed once.
            unsafe { close(h.0) };
        }
    }

    /// Asks every capability once, for a connection that just opened `h`.
    pub fn caps(&self, h: Handle, readonly: bool, structured_replies: bool) -> Result<ExportCaps, i32> {
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
        let writable = !readonly && raw.pwrite.is_some() && ask(raw.can_write, true)?;
        let can_flush = raw.flush.is_some() && ask(raw.can_flush, true)?;
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
        Ok(ExportCaps {
            size: size as u64,
            writable,
            can_flush,
            can_trim: writable && raw.trim.is_some() && ask(raw.can_trim, true)?,
            can_zero: writable && raw.zero.is_some() && ask(raw.can_zero, true)?,
            can_cache: raw.cache.is_some() && ask(raw.can_cache, true)?,
            can_multi_conn: ask(raw.can_multi_conn, false)?,
            fua,
            structured_replies,
        })
    }

    /// Tells the plugin an op is no longer wanted (it must still reply).
    pub fn cancel(&self, token: Token, h: Handle) {
        if let Some(cancel) = self.raw.cancel {
            // SAFETY: plugin contract; the op is live and unanswered.
            unsafe { cancel(token.0 as usize as *mut nbdkit_op, h.0) };
        }
    }

    /// Hands an op to the plugin. `buf` is the read buffer or write payload.
    /// `Err(errno)` means the plugin refused it at once and will not reply.
    pub fn start(&self, io: Io, token: Token, h: Handle, buf: &mut [u8], count: u32, offset: u64, flags: u32) -> Result<(), i32> {
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
            }
        };
        if status == 0 { Ok(()) } else { Err(failure_errno()) }
    }
}
