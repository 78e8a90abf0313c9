//! Routing the library's log to the host, and the host's lines into it.

use std::ffi::{CStr, c_char, c_int, c_void};

use super::{guard, neg};

/// Log level: failures and plugin misuse (the callback's `level`, and a
/// maximum to pass to `nbdkit_set_log_callback`).
pub const NBDKIT_LOG_ERROR: c_int = 1;
/// Log level: what an operator should look at (refused exports, request
/// timeouts, second replies). The default maximum.
pub const NBDKIT_LOG_WARN: c_int = 2;
/// Log level: the server starting and stopping.
pub const NBDKIT_LOG_INFO: c_int = 3;
/// Log level: each connection, option and command as it is handled
/// (NBD_OPT_GO, NBD_CMD_READ).
pub const NBDKIT_LOG_DEBUG: c_int = 4;
/// Log level: everything, down to single steps of a request.
pub const NBDKIT_LOG_TRACE: c_int = 5;

/// Sends the library's log messages to `callback` instead of stderr, for
/// messages up to `max_level` (NBDKIT_LOG_*; 0 silences everything).
/// NULL restores stderr. Process-wide; call it before creating servers.
///
/// The callback may be called from any thread (the loop thread, worker
/// threads, threads calling reply functions), concurrently; `message` is
/// valid only during the call. Lines about one client start with
/// `conn N: `. The callback must not call `nbdkit_set_log_callback` (that
/// call is ignored, with a line on stderr); lines it logs with
/// `nbdkit_log` go to stderr.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_set_log_callback(
    callback: Option<unsafe extern "C" fn(user_data: *mut c_void, level: c_int, message: *const c_char)>,
    user_data: *mut c_void,
    max_level: c_int,
) {
    guard("nbdkit_set_log_callback", (), || {
        if !crate::logging::set_sink(callback, user_data, max_level) {
            eprintln!("nbdkit-async: error: nbdkit_set_log_callback called from inside the log callback; ignored");
        }
    })
}

/// Logs `message` at `level` (NBDKIT_LOG_*) through the library's log:
/// the callback set with `nbdkit_set_log_callback`, or stderr. For plugins
/// and wrappers whose lines belong beside the library's. The string is
/// copied. Thread-safe: call from any thread, callbacks included.
///
/// Returns 0 (also when the level filters the line out), or -EINVAL for
/// a NULL message or a level outside 1-5.
///
/// # Safety
/// `message` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_log(level: c_int, message: *const c_char) -> c_int {
    guard("nbdkit_log", neg(libc::EIO), || {
        crate::logging::init();
        let Some(level) = crate::logging::level_of(level) else { return neg(libc::EINVAL) };
        if message.is_null() {
            return neg(libc::EINVAL);
        }
        // SAFETY: the caller passes a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
        log::log!(level, "{text}");
        0
    })
}
