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

/// `zero` must fail fast with ENOTSUP rather than write zeroes slowly
/// (the client sent NBD_CMD_FLAG_FAST_ZERO).
pub const NBDKIT_FLAG_FAST_ZERO: u32 = 1 << 3;
/// `extents`: the client wants just one extent (NBD_CMD_FLAG_REQ_ONE).
pub const NBDKIT_FLAG_REQ_ONE: u32 = 1 << 2;

/// `nbdkit_extent.type` bit: the range is not allocated.
pub const NBDKIT_EXTENT_HOLE: u32 = 1 << 0;
/// `nbdkit_extent.type` bit: the range reads as zeroes.
pub const NBDKIT_EXTENT_ZERO: u32 = 1 << 1;

/// A run of bytes with one allocation state, in a reply to `extents` or
/// a sparse read. Extents follow each other from the op's offset.
///
/// cbindgen:field-names=[length, type]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nbdkit_extent {
    /// Bytes in this run (runs of 0 bytes are skipped).
    pub length: u64,
    /// NBDKIT_EXTENT_HOLE and/or NBDKIT_EXTENT_ZERO, or 0 for data.
    pub type_: u32,
}

/// The export list being built by a `list_exports` callback; add to it
/// with `nbdkit_add_export`. Valid only during that callback.
pub struct nbdkit_exports {
    _private: [u8; 0],
}

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
/// callback starts the work and returns at once. (`close` may also run in
/// `nbdkit_server_free`, on its caller's thread.)
///
/// I/O callbacks (`pread`, `pwrite`, `flush`, `trim`, `zero`, `cache`,
/// `extents`) receive the op first and the plugin's per-connection handle
/// second. What they return is a separate channel from the reply:
/// - 0: the plugin took the op and answers it exactly once with one of the
///   valid replies named below (inside the callback or later). Call the
///   reply function and then `return 0`; do not return its result.
/// - -1: the op failed at once with `errno` (EIO if the callback left
///   errno at 0). The library answers the client; the plugin must not
///   reply to the op, nor touch its buffer after returning.
/// - any other negative value, -E: the op failed at once with errno E
///   (`return -ENOSPC;`), as for -1. Values below -4095 mean EIO.
/// - a positive value is a plugin bug: it is logged as an error and the
///   client is answered EIO, but the op is kept (its buffer stays valid)
///   until the plugin replies to it, as the plugin may still do.
///
/// A NULL I/O callback means the command is not offered to clients.
///
/// Capability callbacks (`can_*`) return 1 (yes), 0 (no) or -1 (error:
/// the client cannot connect). A NULL capability callback answers from the
/// presence of the matching I/O callback.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbdkit_plugin_lowlevel {
    /// Short plugin name, used in logs. May be NULL.
    pub name: *const c_char,

    /// Opens the export for one client connection and returns the plugin's
    /// handle for it (any non-NULL pointer). Called once per connection, and
    /// also briefly when a client asks about an export (NBD_OPT_INFO).
    /// `readonly` is 1 when the server or connection is read-only.
    /// `export_name` is the export the client chose, valid only during the
    /// call. Return NULL with errno set to refuse the client, which is told
    /// why in the option's error message and logged at warning level:
    /// ENOENT gives NBD_REP_ERR_UNKNOWN (no such export); EPERM, EACCES or
    /// EROFS give NBD_REP_ERR_POLICY; EINVAL NBD_REP_ERR_INVALID;
    /// ESHUTDOWN NBD_REP_ERR_SHUTDOWN; anything else (EIO, ENOMEM, a
    /// backend that is down; errno 0 counts as EIO) NBD_REP_ERR_PLATFORM.
    /// If NULL, the handle is `user_data`.
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
    /// library and stays valid until the op is replied to. Its contents on
    /// entry are unspecified (buffers are reused): a reply that sends it
    /// must have filled all `count` bytes.
    /// Valid replies: `nbdkit_reply` or `nbdkit_reply_read_extents` (once
    /// `buf` is filled), `nbdkit_reply_read` (a copy from elsewhere),
    /// `nbdkit_reply_read_nocopy` (lent from elsewhere; `buf` goes unused),
    /// `nbdkit_reply_error`.
    pub pread: Option<
        unsafe extern "C" fn(
            op: *mut nbdkit_op,
            handle: *mut c_void,
            buf: *mut c_void,
            count: u32,
            offset: u64,
            flags: u32,
        ) -> c_int,
    >,
    /// Writes `count` bytes from `buf` at `offset`. `buf` stays valid until
    /// the op is replied to. `flags` may hold NBDKIT_FLAG_FUA.
    /// Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
    pub pwrite: Option<
        unsafe extern "C" fn(
            op: *mut nbdkit_op,
            handle: *mut c_void,
            buf: *const c_void,
            count: u32,
            offset: u64,
            flags: u32,
        ) -> c_int,
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
    /// disconnected, the server is shutting down, or the request timeout
    /// passed (the client was then answered ETIMEDOUT already). Called at
    /// most once per op, on the event-loop thread, for an op the loop has
    /// not yet seen a reply to: a reply the plugin sent from another thread
    /// just before may cross it, so an op may be cancelled after the
    /// plugin answered it (ignore such a cancel). A gateway can abort the
    /// upstream request. An op not yet answered must still be replied to
    /// exactly once (any reply will do; ECANCELED is customary); its buffer
    /// stays valid until then. May be NULL.
    pub cancel: Option<unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void)>,

    /// Reports allocation in `count` bytes at `offset` (NBD_CMD_BLOCK_STATUS
    /// with the base:allocation context). `flags` may hold NBDKIT_FLAG_REQ_ONE.
    /// If NULL, clients are not offered base:allocation.
    /// Valid replies: `nbdkit_reply_extents`, `nbdkit_reply_error`.
    pub extents: Option<
        unsafe extern "C" fn(op: *mut nbdkit_op, handle: *mut c_void, count: u32, offset: u64, flags: u32) -> c_int,
    >,
    /// Can `zero` honour NBDKIT_FLAG_FAST_ZERO (fail at once with ENOTSUP
    /// when zeroing would be slow)? Default: no, and the flag is not offered.
    pub can_fast_zero: Option<unsafe extern "C" fn(handle: *mut c_void) -> c_int>,
    /// Block size constraints: minimum (a power of 2, at most 64 KiB),
    /// preferred (a power of 2) and maximum (a multiple of the minimum; the
    /// library lowers it to the server's maximum request size, 64 MiB by
    /// default). Return 0 or -1. Requests breaking them are refused with
    /// EINVAL before the plugin sees them. Default 1 / 4096 / the server's
    /// maximum request size.
    pub block_size: Option<
        unsafe extern "C" fn(handle: *mut c_void, minimum: *mut u32, preferred: *mut u32, maximum: *mut u32) -> c_int,
    >,
    /// Lists the exports for NBD_OPT_LIST with `nbdkit_add_export`. Return
    /// 0 or -1. When set, every export name a client asks for is passed to
    /// `open` (which refuses unknown ones with ENOENT); "" still means the
    /// name set with `nbdkit_server_set_export_name`. When NULL, the server
    /// has the one export of that name.
    pub list_exports: Option<unsafe extern "C" fn(user_data: *mut c_void, exports: *mut nbdkit_exports) -> c_int>,
    /// The description of the open export (NBD_INFO_DESCRIPTION), or NULL.
    /// The string must stay valid until the handle is closed. Default: the
    /// server's description.
    pub export_description: Option<unsafe extern "C" fn(handle: *mut c_void) -> *const c_char>,
}

/// The Rust side of `nbdkit_exports`.
#[derive(Default)]
pub(crate) struct ExportList {
    pub items: Vec<(String, String)>,
}

/// Most exports one list may hold: the whole list goes into one reply.
const MAX_EXPORTS: usize = 10_000;

/// Adds an export to the list a `list_exports` callback is building.
/// `name` must be at most 4096 bytes of UTF-8; `description` may be NULL.
/// Both are copied. Call only from inside `list_exports`, on its thread.
///
/// Returns 0, or -EINVAL (bad arguments) or -E2BIG (more than 10000 exports).
///
/// # Safety
/// `exports` must be the pointer `list_exports` received; the strings must
/// be NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_add_export(
    exports: *mut nbdkit_exports,
    name: *const c_char,
    description: *const c_char,
) -> c_int {
    super::guard("nbdkit_add_export", -libc::EIO, || {
        // SAFETY: the caller passes the list it was given.
        let Some(list) = (unsafe { exports.cast::<ExportList>().as_mut() }) else { return -libc::EINVAL };
        let text = |p: *const c_char| -> Option<String> {
            // SAFETY: the caller passes NUL-terminated strings.
            let s = unsafe { std::ffi::CStr::from_ptr(p) }.to_str().ok()?;
            (s.len() <= 4096).then(|| s.to_string())
        };
        if name.is_null() {
            return -libc::EINVAL;
        }
        let Some(name) = text(name) else { return -libc::EINVAL };
        let description = if description.is_null() { Some(String::new()) } else { text(description) };
        let Some(description) = description else { return -libc::EINVAL };
        if list.items.len() >= MAX_EXPORTS {
            return -libc::E2BIG;
        }
        list.items.push((name, description));
        0
    })
}
