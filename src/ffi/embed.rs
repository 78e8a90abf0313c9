//! Driving the server from the host's own event loop (like libfuse's
//! `fuse_session_fd` + `fuse_session_process_buf`), instead of giving it a
//! thread with `nbdkit_main_loop`.

use std::ffi::c_int;
use std::time::Duration;

use super::server::{nbdkit_server, server, Phase};
use super::{guard, neg};

/// A descriptor that becomes readable whenever the server has work; watch
/// it in the host's loop (epoll, poll, asio `posix::stream_descriptor`) and
/// call `nbdkit_server_process` when it is. It stays valid until
/// `nbdkit_server_free`; do not read from it or close it.
///
/// Set-up thread only. Returns the descriptor, or a negative errno
/// (-EBUSY while `nbdkit_main_loop` runs).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_fd(srv: *mut nbdkit_server) -> c_int {
    guard("nbdkit_server_fd", neg(libc::EIO), || {
        let Some(s) = server(srv) else { return neg(libc::EINVAL) };
        match &*s.phase.lock() {
            Phase::Setup(l) | Phase::Embedded(l) | Phase::Finished(l) => l.fd(),
            Phase::Running => neg(libc::EBUSY),
        }
    })
}

/// Does whatever work is ready (accepting, reading, replying, timers)
/// without blocking, and returns. The first call starts the server.
/// Plugin callbacks run inside this call, on the calling thread, which
/// must be the same every time.
///
/// Returns 1 while the server runs, 0 once a requested shutdown has
/// completed (stop watching the descriptor; free the server when your
/// threads are done with its ops), or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_process(srv: *mut nbdkit_server) -> c_int {
    guard("nbdkit_server_process", neg(libc::EIO), || {
        let Some(s) = server(srv) else { return neg(libc::EINVAL) };
        let mut phase = s.phase.lock();
        let l = match &mut *phase {
            Phase::Setup(_) => {
                let Phase::Setup(mut l) = std::mem::replace(&mut *phase, Phase::Running) else { unreachable!() };
                if let Err(e) = l.start() {
                    log::error!("nbdkit_server_process: {e}");
                    *phase = Phase::Setup(l);
                    return neg(e.raw_os_error().unwrap_or(libc::EIO));
                }
                *phase = Phase::Embedded(l);
                let Phase::Embedded(l) = &mut *phase else { unreachable!() };
                l
            }
            Phase::Embedded(l) => l,
            Phase::Finished(_) => return 0,
            Phase::Running => return neg(libc::EBUSY),
        };
        match l.step(Some(Duration::ZERO)) {
            Ok(false) => 1,
            Ok(true) => {
                let Phase::Embedded(l) = std::mem::replace(&mut *phase, Phase::Running) else { unreachable!() };
                *phase = Phase::Finished(l);
                0
            }
            Err(e) => {
                log::error!("nbdkit_server_process: {e}");
                neg(e.raw_os_error().unwrap_or(libc::EIO))
            }
        }
    })
}

/// Milliseconds until `nbdkit_server_process` must be called even if the
/// descriptor stays quiet (a timeout is due), or -1 if only readiness
/// matters. Ask again after every `nbdkit_server_process`. Set-up thread only.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_timeout_ms(srv: *mut nbdkit_server) -> c_int {
    guard("nbdkit_server_timeout_ms", -1, || {
        let Some(s) = server(srv) else { return -1 };
        match &*s.phase.lock() {
            Phase::Setup(l) | Phase::Embedded(l) => match l.timeout() {
                // Round up, so the host never wakes a hair early and spins.
                Some(t) => t.as_micros().div_ceil(1000).min(c_int::MAX as u128) as c_int,
                None => -1,
            },
            _ => -1,
        }
    })
}
