//! The C plugin struct and the constants its callbacks use.

use std::ffi::{c_char, c_int, c_void};

/// An NBD request in flight, handed to an I/O callback.
///
/// It is an opaque token, not a pointer to memory: never dereference it.
/// It stays valid until exactly one of `nbdkit_reply`, `nbdkit_reply_read`
/// or `nbdkit_reply_error` is called with it, from any thread, inside the
/// callback or later. A second reply, or a reply after the client went
/// away or the server ended, is detected and logged, and does no harm.
pub struct nbdkit_op {
    _private: [u8; 0],
}

/// The write was requested with FUA: it must be on stable storage when
/// the op is replied to. Only passed when `can_fua` returns NBDKIT_FUA_NATIVE.
pub const NBDKIT_FLAG_FUA: u32 = 1 << 1;
/// `zero` may punch a hole instead of writing zeroes (the client did not
/// send NBD_CMD_FLAG_NO_HOLE).
pub const NBDKIT_FLAG_MAY_TRIM: u32 = 1 << 0;

/// `can_fua` result: FUA is not offered to clients.
pub const NBDKIT_FUA_NONE: c_int = 0;
/// `can_fua` result: the library emulates FUA by calling `flush` after the
/// write completes and replying only once the flush completes.
pub const NBDKIT_FUA_EMULATE: c_int = 1;
/// `can_fua` result: the plugin honours NBDKIT_FLAG_FUA itself.
pub const NBDKIT_FUA_NATIVE: c_int = 2;

/// The callbacks of an asynchronous plugin (the low-level API).
///
/// Pass it to `nbdkit_server_new` together with `sizeof` of the struct the
/// plugin was compiled against: fields are only ever appended, and fields
/// an older plugin does not know are treated as NULL.
///
/// Every callback runs on the event-loop thread and must not block: an I/O
/// callback starts the work and returns at once.
///
/// I/O callbacks (`pread`, `pwrite`, `flush`, `trim`, `zero`, `cache`)
/// receive the op first and the plugin's per-connection handle second.
/// Returning 0 means the plugin took the op and will answer it exactly once
/// with one of the valid replies named below. Returning -1 means the op
/// failed at once: the library answers the client with `errno` (EIO if the
/// callback left errno at 0), and the plugin must not reply to that op.
/// A NULL I/O callback means the command is not offered to clients.
///
/// Capability callbacks (`can_*`) return 1 (yes), 0 (no) or -1 (error:
/// the client cannot connect). A NULL capability callback answers from the
/// presence of the matching I/O callback.
#[repr(C)]
pub struct nbdkit_plugin_lowlevel {
    /// Short plugin name, used in logs. May be NULL.
    pub name: *const c_char,

    /// Opens the export for one client connection and returns the plugin's
    /// handle for it (any non-NULL pointer). Called once per connection, and
    /// also briefly when a client asks about an export (NBD_OPT_INFO).
    /// `readonly` is 1 when the server or connection is read-only.
    /// `export_name` is the export the client chose, valid only during the
    /// call. Return NULL (with errno set, ENOENT for an unknown export) to
    /// refuse the client. If NULL, the handle is `user_data`.
    pub open: Option<
        unsafe extern "C" fn(user_data: *mut c_void, readonly: c_int, export_name: *const c_char) -> *mut c_void,
    >,
    /// Releases a handle from `open`. Called once every op of the connection
    /// has been replied to, so no op ever outlives its handle. May be NULL.
    pub close: Option<unsafe extern "C" fn(handle: *mut c_void)>,
    /// Size of the export in bytes, or -1 on error. Required.
    pub get_size: Option<unsafe extern "C" fn(handle: *mut c_void) -> i64>,

    /// Can clients write? Default: `pwrite` is not NULL.
    pub can_write: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// Can clients flush? Default: `flush` is not NULL.
    pub can_flush: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// Can clients trim? Default: `trim` is not NULL.
    pub can_trim: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// Can clients write zeroes? Default: `zero` is not NULL.
    pub can_zero: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// One of NBDKIT_FUA_NONE, NBDKIT_FUA_EMULATE, NBDKIT_FUA_NATIVE, or -1.
    /// Default: NBDKIT_FUA_EMULATE when the export can flush, else NONE.
    pub can_fua: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// Do all connections see the same data, so that a flush on one covers
    /// writes completed on another? Default: no.
    pub can_multi_conn: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// Can clients ask to prefetch? Default: `cache` is not NULL.
    pub can_cache: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,

    /// Reads `count` bytes at `offset` into `buf`. `buf` is owned by the
    /// library and stays valid until the op is replied to.
    /// Valid replies: `nbdkit_reply` (once `buf` is filled),
    /// `nbdkit_reply_read`, `nbdkit_reply_error`.
    pub pread: Option<
        unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void, buf: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int,
    >,
    /// Writes `count` bytes from `buf` at `offset`. `buf` stays valid until
    /// the op is replied to. `flags` may hold NBDKIT_FLAG_FUA.
    /// Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
    pub pwrite: Option<
        unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void, buf: *const c_void, count: u32, offset: u64, flags: u32) -> c_int,
    >,
    /// Makes every write completed so far durable.
    /// Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
    pub flush: Option<unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void, flags: u32) -> c_int>,
    /// Discards a range; it may read back as anything afterwards.
    /// `flags` may hold NBDKIT_FLAG_FUA.
    /// Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
    pub trim: Option<
        unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int,
    >,
    /// Writes zeroes to a range. `flags` may hold NBDKIT_FLAG_MAY_TRIM and
    /// NBDKIT_FLAG_FUA.
    /// Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
    pub zero: Option<
        unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int,
    >,
    /// Prefetches a range (NBD_CMD_CACHE).
    /// Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
    pub cache: Option<
        unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int,
    >,

    /// Tells the plugin that nobody wants `op` any more: its client
    /// disconnected, or the server is shutting down. Called at most once per
    /// op, on the event-loop thread, while the op is still unanswered. A
    /// gateway can abort the upstream request. The op must still be replied
    /// to exactly once (any reply will do; ECANCELED is customary). May be NULL.
    pub cancel: Option<unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void)>,
}
