//! Reply functions: how a plugin answers an op, from any thread.

use std::ffi::{c_int, c_void};

use super::plugin::nbdkit_op;
use super::{guard, neg};
use crate::completion::{self, Outcome, ReplyError, Token};

fn reply(op: *mut nbdkit_op, outcome: Outcome) -> c_int {
    if op.is_null() {
        log::error!("nbdkit_reply*: NULL op");
        return neg(libc::EINVAL);
    }
    match completion::complete(Token(op as usize as u64), outcome) {
        Ok(()) => 0,
        Err(ReplyError::UnknownServer) => {
            log::warn!("reply to an op of a server that no longer exists; ignored");
            neg(libc::ESTALE)
        }
        Err(ReplyError::Closed) => {
            log::warn!("reply after the server loop ended; ignored");
            neg(libc::ESHUTDOWN)
        }
    }
}

/// Answers an op with success. For a read, the buffer given to `pread`
/// must hold the data by now.
///
/// Thread-safe: call from any thread, inside the I/O callback or later,
/// exactly once per op. It queues the reply for the event loop and returns
/// without waiting for the socket. After it returns the op handle and any
/// buffer the callback received are no longer the plugin's to touch.
///
/// Returns 0, or a negative errno when the reply could not be delivered
/// (-ESTALE: unknown op or server; -ESHUTDOWN: the server has stopped).
/// A second reply to the same op is detected by the loop, logged, and
/// ignored.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_reply(op: *mut nbdkit_op) -> c_int {
    guard("nbdkit_reply", neg(libc::EIO), || reply(op, Outcome::Done))
}

/// Answers a read op with `count` bytes from `data`, which are copied
/// before the call returns (so `data` stays the caller's). `count` must
/// equal the count given to `pread`; otherwise the client gets EIO.
/// Plugins that filled the buffer given to `pread` call `nbdkit_reply`
/// instead and save the copy.
///
/// Thread-safe, exactly once per op, like `nbdkit_reply`.
///
/// # Safety
/// `data` must point to `count` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_reply_read(op: *mut nbdkit_op, data: *const c_void, count: u32) -> c_int {
    guard("nbdkit_reply_read", neg(libc::EIO), || {
        if data.is_null() && count > 0 {
            log::error!("nbdkit_reply_read: NULL data; answering EIO");
            return reply(op, Outcome::Error(libc::EIO));
        }
        let bytes = if count == 0 {
            Vec::new()
        } else {
            // SAFETY: the caller promises `count` readable bytes at `data`.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), count as usize) }.to_vec()
        };
        reply(op, Outcome::Data(bytes))
    })
}

/// Answers an op with an error. `errnum` is a host errno (EIO, ENOSPC,
/// EROFS, ...); the client sees the nearest NBD error. 0 is taken as EIO.
///
/// Thread-safe, exactly once per op, like `nbdkit_reply`.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_reply_error(op: *mut nbdkit_op, errnum: c_int) -> c_int {
    guard("nbdkit_reply_error", neg(libc::EIO), || {
        let errnum = if errnum <= 0 { libc::EIO } else { errnum };
        reply(op, Outcome::Error(errnum))
    })
}
