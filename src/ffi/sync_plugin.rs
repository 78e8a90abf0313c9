//! The synchronous plugin struct: ordinary blocking callbacks, run by a
//! worker pool the library owns.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void};

use super::plugin::nbdkit_exports;

/// Only one client connection at a time; others wait before the handshake.
/// Implies NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS.
pub const NBDKIT_THREAD_MODEL_SERIALIZE_CONNECTIONS: c_int = 0;
/// One I/O callback at a time in the whole server.
pub const NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS: c_int = 1;
/// One I/O callback at a time per connection (handle); connections overlap.
pub const NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS: c_int = 2;
/// Any number of I/O callbacks at once, on any handle.
pub const NBDKIT_THREAD_MODEL_PARALLEL: c_int = 3;

/// The callbacks of a synchronous plugin (the classic nbdkit shape).
///
/// Pass it to `nbdkit_server_new_sync` with `sizeof` of the struct, like
/// `nbdkit_plugin_lowlevel`; everything else about the server is the same.
///
/// `open`, `close`, `get_size` and the `can_*` callbacks have the same
/// meaning as in `nbdkit_plugin_lowlevel` and run on the event-loop thread:
/// keep them quick. The I/O callbacks run on the library's worker threads
/// (see `nbdkit_server_set_threads`), as many at once as `thread_model`
/// allows. They block as long as they need, and return 0, or -1 with an
/// error set by `nbdkit_set_error` or left in `errno` (EIO if neither).
/// Buffers are valid only during the call. A NULL I/O callback means the
/// command is not offered to clients.
#[repr(C)]
pub struct nbdkit_plugin {
    /// Short plugin name, used in logs. May be NULL.
    pub name: *const c_char,
    /// As in `nbdkit_plugin_lowlevel`.
    pub open: Option<
        unsafe extern "C" fn(user_data: *mut c_void, readonly: c_int, export_name: *const c_char) -> *mut c_void,
    >,
    /// As in `nbdkit_plugin_lowlevel`.
    pub close: Option<unsafe extern "C" fn(handle: *mut c_void)>,
    /// As in `nbdkit_plugin_lowlevel`. Required.
    pub get_size: Option<unsafe extern "C" fn(handle: *mut c_void) -> i64>,
    /// As in `nbdkit_plugin_lowlevel`.
    pub can_write: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// As in `nbdkit_plugin_lowlevel`.
    pub can_flush: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// As in `nbdkit_plugin_lowlevel`.
    pub can_trim: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// As in `nbdkit_plugin_lowlevel`.
    pub can_zero: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// As in `nbdkit_plugin_lowlevel`.
    pub can_fua: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// As in `nbdkit_plugin_lowlevel`.
    pub can_multi_conn: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// As in `nbdkit_plugin_lowlevel`.
    pub can_cache: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,

    /// Reads `count` bytes at `offset` into `buf` (whose contents on entry
    /// are unspecified: fill all of it). Required.
    pub pread: Option<
        unsafe extern "C" fn(handle: *mut c_void, buf: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int,
    >,
    /// Writes `count` bytes from `buf` at `offset`; `flags` may hold NBDKIT_FLAG_FUA.
    pub pwrite: Option<
        unsafe extern "C" fn(handle: *mut c_void, buf: *const c_void, count: u32, offset: u64, flags: u32) -> c_int,
    >,
    /// Makes every completed write durable.
    pub flush: Option<unsafe extern "C" fn(handle: *mut c_void, flags: u32) -> c_int>,
    /// Discards a range; `flags` may hold NBDKIT_FLAG_FUA.
    pub trim: Option<unsafe extern "C" fn(handle: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int>,
    /// Writes zeroes; `flags` may hold NBDKIT_FLAG_MAY_TRIM and NBDKIT_FLAG_FUA.
    pub zero: Option<unsafe extern "C" fn(handle: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int>,
    /// Prefetches a range.
    pub cache: Option<unsafe extern "C" fn(handle: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int>,

    /// One of NBDKIT_THREAD_MODEL_*; the library enforces it. 0 (zero
    /// initialisation) is the safest, SERIALIZE_CONNECTIONS.
    pub thread_model: c_int,

    /// Reports allocation in `count` bytes at `offset` (NBD_CMD_BLOCK_STATUS,
    /// base:allocation) by calling `nbdkit_add_extent` for consecutive
    /// ranges from `offset` on; it may stop early (the client asks again)
    /// and may describe more than asked. `flags` may hold
    /// NBDKIT_FLAG_REQ_ONE (one extent is enough). Runs on a worker thread
    /// like the other I/O callbacks; returns 0, or -1 with an error as they
    /// do. If NULL, clients are not offered base:allocation.
    pub extents: Option<
        unsafe extern "C" fn(
            handle: *mut c_void,
            count: u32,
            offset: u64,
            flags: u32,
            extents: *mut nbdkit_extents_builder,
        ) -> c_int,
    >,
    /// As in `nbdkit_plugin_lowlevel`: lists the exports (NBD_OPT_LIST)
    /// with `nbdkit_add_export`, on the event-loop thread.
    pub list_exports: Option<unsafe extern "C" fn(user_data: *mut c_void, exports: *mut nbdkit_exports) -> c_int>,
}

/// The extents a synchronous `extents` callback is building; add to it
/// with `nbdkit_add_extent`. Valid only during that callback.
pub struct nbdkit_extents_builder {
    _private: [u8; 0],
}

/// The Rust side of `nbdkit_extents_builder`: lengths and types from the
/// request's offset on.
pub(crate) struct ExtentsBuilder {
    /// Where the next extent must start.
    pub(crate) next: u64,
    pub(crate) items: Vec<(u64, u32)>,
}

/// Most extents one callback may add: more than a reply carries.
const MAX_ADDED_EXTENTS: usize = 1 << 20;

/// Adds the range `offset`..`offset + length` with allocation `type_`
/// (NBDKIT_EXTENT_HOLE and/or NBDKIT_EXTENT_ZERO, or 0 for data) to the
/// extents an `extents` callback is building. Ranges must follow each
/// other without gaps; a range that starts before the next expected
/// offset is trimmed to it (so a plugin may report from an aligned start).
/// Call only from inside the `extents` callback, on its thread.
///
/// Returns 0, or -EINVAL (NULL, a gap, or after more than a million
/// extents: the client asks again for the rest).
///
/// # Safety
/// `extents` must be the pointer the `extents` callback received.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_add_extent(
    extents: *mut nbdkit_extents_builder,
    offset: u64,
    length: u64,
    type_: u32,
) -> c_int {
    super::guard("nbdkit_add_extent", -libc::EIO, || {
        // SAFETY: the caller passes the builder it was given.
        let Some(b) = (unsafe { extents.cast::<ExtentsBuilder>().as_mut() }) else { return -libc::EINVAL };
        let Some(end) = offset.checked_add(length) else { return -libc::EINVAL };
        if offset > b.next {
            log::error!("nbdkit_add_extent: a gap from {} to {offset}; refused", b.next);
            return -libc::EINVAL;
        }
        if end <= b.next {
            return 0; // all of it before what is asked
        }
        if b.items.len() >= MAX_ADDED_EXTENTS {
            return -libc::EINVAL;
        }
        b.items.push((end - b.next, type_));
        b.next = end;
        0
    })
}

thread_local! {
    /// Error set by `nbdkit_set_error` during a synchronous callback.
    static LAST_ERROR: Cell<c_int> = const { Cell::new(0) };
}

/// Takes (and clears) the error a synchronous callback set, if any.
pub(crate) fn take_error() -> c_int {
    LAST_ERROR.with(|e| e.replace(0))
}

/// Sets the error a synchronous I/O callback reports when it returns -1
/// (otherwise `errno` is used, then EIO). Call it on the thread running
/// the callback, before returning. Has no effect elsewhere.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_set_error(errnum: c_int) {
    LAST_ERROR.with(|e| e.set(errnum));
}
