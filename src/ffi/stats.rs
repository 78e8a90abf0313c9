//! Reading the server's counters.

use std::ffi::c_int;
use std::sync::atomic::Ordering::Relaxed;

use super::server::{nbdkit_server, server};
use super::{guard, neg};
use crate::stats::{COMMANDS, LATENCY_BUCKETS};

/// A snapshot of a server's counters. New fields are only appended; pass
/// `sizeof` of the struct you compiled against to `nbdkit_server_stats`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct nbdkit_stats {
    /// Client connections open now.
    pub connections: u64,
    /// Client connections accepted since the server started.
    pub connections_total: u64,
    /// Requests handed to the plugin and not yet released by it.
    pub requests_in_flight: u64,
    /// Requests received, by NBD command number (NBD_CMD_READ = 0,
    /// WRITE = 1, DISC = 2, FLUSH = 3, TRIM = 4, CACHE = 5,
    /// WRITE_ZEROES = 6, BLOCK_STATUS = 7), refused ones included.
    pub requests: [u64; 8],
    /// Data bytes sent to clients by successful reads.
    pub bytes_read: u64,
    /// Data bytes received from clients in writes handed to the plugin.
    pub bytes_written: u64,
    /// Requests answered with an error (refused, failed or timed out).
    pub errors: u64,
    /// Reply latency: entry i counts replies that took 2^i to 2^(i+1)
    /// microseconds from request to reply.
    pub latency_us_log2: [u64; 32],
}

/// Fills `out` (of `size` bytes, normally `sizeof *out`) with the server's
/// counters. A larger `size` (a program built against a newer header)
/// gets the fields this library does not know set to 0. Thread-safe:
/// call from any thread (callbacks included) at any time while the server
/// exists. Each counter is exact; together they are a snapshot taken
/// while the server keeps running.
///
/// Returns 0 or a negative errno.
///
/// # Safety
/// `out` must point to `size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_stats(srv: *mut nbdkit_server, out: *mut nbdkit_stats, size: usize) -> c_int {
    guard("nbdkit_server_stats", neg(libc::EIO), || {
        let Some(s) = server(srv) else { return neg(libc::EINVAL) };
        if out.is_null() {
            return neg(libc::EINVAL);
        }
        let st = &s.shared.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        let snap = nbdkit_stats {
            connections: load(&st.connections),
            connections_total: load(&st.connections_total),
            requests_in_flight: load(&st.in_flight),
            requests: std::array::from_fn::<u64, COMMANDS, _>(|i| load(&st.requests[i])),
            bytes_read: load(&st.bytes_read),
            bytes_written: load(&st.bytes_written),
            errors: load(&st.errors),
            latency_us_log2: std::array::from_fn::<u64, LATENCY_BUCKETS, _>(|i| load(&st.latency[i])),
        };
        let n = size.min(std::mem::size_of::<nbdkit_stats>());
        // SAFETY: `out` has `size` writable bytes; we copy at most that.
        unsafe { std::ptr::copy_nonoverlapping((&snap as *const nbdkit_stats).cast::<u8>(), out.cast::<u8>(), n) };
        if size > n {
            // A caller built against a newer header: fields we do not know read 0.
            // SAFETY: bytes n..size of `out` are writable (the caller's size).
            unsafe { std::ptr::write_bytes(out.cast::<u8>().add(n), 0, size - n) };
        }
        0
    })
}
