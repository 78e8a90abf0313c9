//! Reply functions: how a plugin answers an op, from any thread.

use std::ffi::{c_int, c_void};

use super::plugin::{nbdkit_extent, nbdkit_op};
use super::{guard, neg};
use crate::completion::{self, Outcome, ReplyError, Token};
use crate::loan::Loan;

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
/// Returns 0 once the reply is queued, or a negative errno when it could
/// not be: -EINVAL for NULL, -ESTALE when the op's server was freed,
/// -ESHUTDOWN when its loop has stopped. A second reply to an op, or one
/// with a made-up handle of a live server, is queued (0), then found out
/// by the loop, logged, and ignored.
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
/// Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
/// negative errno as `nbdkit_reply` does.
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

/// Answers a read op with `count` bytes at `data`, sent from there without
/// a copy: the zero-copy twin of `nbdkit_reply_read`, for data the plugin
/// already holds (a cache page, a network buffer, a memory-mapped file).
/// `count` must equal the count given to `pread`; otherwise the client
/// gets EIO.
///
/// The bytes are lent, not given: they must stay readable until the
/// library calls `release(release_ctx)`; a change made to them before that
/// may reach the client. The library calls it exactly once, whatever
/// becomes of the reply: once the bytes are written to the connection (the
/// socket, or TLS records), or when the reply is dropped (client gone, op
/// already answered, misuse, server stopped or freed). That may happen
/// before this function returns, whatever it returns, so do not hold a
/// lock here that `release` takes. `release` may run on any thread
/// (normally the event loop's), must not block, and may be NULL when there
/// is nothing to give back. The buffer given to `pread` is then left unused.
///
/// Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
/// negative errno as `nbdkit_reply` does.
///
/// # Safety
/// `data` must point to `count` readable bytes until `release` is called.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_reply_read_nocopy(
    op: *mut nbdkit_op,
    data: *const c_void,
    count: u32,
    release: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
    release_ctx: *mut c_void,
) -> c_int {
    // SAFETY: the caller lends `count` bytes at `data` until release.
    let loan = unsafe { Loan::new(data.cast::<u8>(), count as usize, release, release_ctx) };
    guard("nbdkit_reply_read_nocopy", neg(libc::EIO), move || {
        if data.is_null() && count > 0 {
            log::error!("nbdkit_reply_read_nocopy: NULL data; answering EIO");
            drop(loan);
            return reply(op, Outcome::Error(libc::EIO));
        }
        reply(op, Outcome::Lent(loan))
    })
}

/// Answers an op with an error. `errnum` is a host errno (EIO, ENOSPC,
/// EROFS, ...); the client sees the nearest NBD error. 0 is taken as EIO.
///
/// Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
/// negative errno as `nbdkit_reply` does.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_reply_error(op: *mut nbdkit_op, errnum: c_int) -> c_int {
    guard("nbdkit_reply_error", neg(libc::EIO), || {
        let errnum = if errnum <= 0 { libc::EIO } else { errnum };
        reply(op, Outcome::Error(errnum))
    })
}

/// Answers a block-status op (`extents` callback) with `n` extents that
/// follow each other from the op's offset. They are copied before the call
/// returns. The library trims them to the requested range (one extent for
/// NBDKIT_FLAG_REQ_ONE) and skips empty ones; none left covering the
/// offset answers EIO. At most 65536 are sent; the client asks again for
/// the rest.
///
/// Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
/// negative errno as `nbdkit_reply` does.
///
/// # Safety
/// `extents` must point to `n` readable `nbdkit_extent`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_reply_extents(op: *mut nbdkit_op, extents: *const nbdkit_extent, n: usize) -> c_int {
    guard("nbdkit_reply_extents", neg(libc::EIO), || {
        // SAFETY: forwarded from the caller.
        match unsafe { copy_extents(extents, n) } {
            Some(v) => reply(op, Outcome::Extents(v)),
            None => reply(op, Outcome::Error(libc::EIO)),
        }
    })
}

/// Answers a read op whose buffer holds the data, saying which parts are
/// holes: extents with NBDKIT_EXTENT_ZERO are sent to the client as holes
/// (no data on the wire) when structured replies are on; otherwise, or
/// when the client asked for one chunk (DF), the library zeroes them in
/// the buffer and sends it whole. The extents must cover exactly the
/// read's count. They are copied before the call returns.
///
/// Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
/// negative errno as `nbdkit_reply` does.
///
/// # Safety
/// `extents` must point to `n` readable `nbdkit_extent`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_reply_read_extents(
    op: *mut nbdkit_op,
    extents: *const nbdkit_extent,
    n: usize,
) -> c_int {
    guard("nbdkit_reply_read_extents", neg(libc::EIO), || {
        // SAFETY: forwarded from the caller.
        match unsafe { copy_extents(extents, n) } {
            Some(v) => reply(op, Outcome::SparseRead(v)),
            None => reply(op, Outcome::Error(libc::EIO)),
        }
    })
}

/// Most extents a reply may carry from the plugin.
const MAX_EXTENTS_IN: usize = 1 << 20;

/// # Safety
/// `p` must point to `n` readable extents (or be NULL with n == 0).
unsafe fn copy_extents(p: *const nbdkit_extent, n: usize) -> Option<Vec<(u64, u32)>> {
    if p.is_null() || n == 0 || n > MAX_EXTENTS_IN {
        log::error!("plugin misuse: {n} extents at {p:?}; answering EIO");
        return None;
    }
    // SAFETY: the caller promises n readable extents.
    let slice = unsafe { std::slice::from_raw_parts(p, n) };
    Some(slice.iter().map(|e| (e.length, e.type_)).collect())
}
