//! Routing the library's log to the host.

use std::ffi::{c_char, c_int, c_void};

use super::guard;

/// Log levels passed to the log callback (and accepted as the maximum).
pub const NBDKIT_LOG_ERROR: c_int = 1;
pub const NBDKIT_LOG_WARN: c_int = 2;
pub const NBDKIT_LOG_INFO: c_int = 3;
/// Names each option and command as it is handled (NBD_OPT_GO, NBD_CMD_READ).
pub const NBDKIT_LOG_DEBUG: c_int = 4;
pub const NBDKIT_LOG_TRACE: c_int = 5;

/// Sends the library's log messages to `callback` instead of stderr, for
/// messages up to `max_level` (NBDKIT_LOG_*; 0 silences everything).
/// NULL restores stderr. Process-wide; call it before creating servers.
///
/// The callback may be called from any thread (the loop thread, worker
/// threads, threads calling reply functions), concurrently; `message` is
/// valid only during the call. It must not call back into the library.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_set_log_callback(
    callback: Option<unsafe extern "C" fn(user_data: *mut c_void, level: c_int, message: *const c_char)>,
    user_data: *mut c_void,
    max_level: c_int,
) {
    guard("nbdkit_set_log_callback", (), || crate::logging::set_sink(callback, user_data, max_level))
}
