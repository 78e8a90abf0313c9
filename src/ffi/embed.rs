//! Driving the server from the host's own event loop (like libfuse's
//! `fuse_session_fd` + `fuse_session_process_buf`), instead of giving it a
//! thread with `nbdkit_main_loop`.

use std::ffi::c_int;
use std::time::Duration;

use super::server::{Driver, Phase, nbdkit_server, server};
use super::{guard, neg};
use crate::errno::{self, Describe};
use crate::event_loop::run_guarded;

/// A descriptor that becomes readable whenever the server has work; watch
/// it in the host's loop (epoll, poll, asio `posix::stream_descriptor`) and
/// call `nbdkit_server_process` when it is. It stays valid until
/// `nbdkit_server_free`; do not read from it or close it.
///
/// Callable from the thread that owns the server, callbacks included.
/// Returns the descriptor, or a negative errno: -EINVAL for a NULL server,
/// -EBUSY while `nbdkit_main_loop` runs the server.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_fd(srv: *mut nbdkit_server) -> c_int {
    guard("nbdkit_server_fd", neg(libc::EIO), || {
        let Some(s) = server(srv) else { return neg(libc::EINVAL) };
        match s.with_phase("nbdkit_server_fd", |p| matches!(p, Phase::Running(Driver::MainLoop))) {
            Ok(false) => s.fd,
            Ok(true) => {
                log::error!("nbdkit_server_fd: nbdkit_main_loop is running this server; refused with EBUSY");
                neg(libc::EBUSY)
            }
            Err(e) => e,
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
/// threads are done with its ops), or a negative errno: -EBUSY at once
/// when called from inside one of the server's callbacks, from a second
/// thread while a call runs, or while `nbdkit_main_loop` runs the server;
/// -EIO after an internal error (logged; the server's memory is then kept
/// so that buffers the plugin holds stay valid); others when the server
/// cannot start.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_process(srv: *mut nbdkit_server) -> c_int {
    const NAME: &str = "nbdkit_server_process";
    guard(NAME, neg(libc::EIO), || {
        let Some(s) = server(srv) else { return neg(libc::EINVAL) };
        match s.with_phase(NAME, |p| match p {
            Phase::Finished(_) => Some(0),
            Phase::Failed => Some(neg(libc::EIO)),
            _ => None,
        }) {
            Ok(Some(r)) => return r,
            Ok(None) => {}
            Err(e) => return e,
        }
        let mut l = match s.take_loop(NAME, Driver::Process, |p| matches!(p, Phase::Setup(_) | Phase::Embedded(_))) {
            Ok(l) => l,
            Err(e) => return e,
        };
        if l.config.loops > 1 {
            log::error!("{NAME}: the server is set to {} loops; only nbdkit_main_loop runs several", l.config.loops);
            s.put_loop(Phase::Setup(l));
            return neg(libc::EINVAL);
        }
        // The phase lock is not held from here on: callbacks may call back
        // into the library and get its answer (often -EBUSY), not a deadlock.
        let turn = run_guarded(NAME, &mut l, |l| {
            l.start()?;
            l.step(Some(Duration::ZERO))
        });
        match turn {
            Ok(Ok(false)) => {
                s.put_loop(Phase::Embedded(l));
                1
            }
            Ok(Ok(true)) => {
                s.put_loop(Phase::Finished(l));
                0
            }
            Ok(Err(e)) => {
                log::error!("{NAME}: {}", Describe(&e));
                let started = l.started();
                s.put_loop(if started { Phase::Embedded(l) } else { Phase::Setup(l) });
                neg(errno::of(&e, libc::EIO))
            }
            Err(()) => {
                std::mem::forget(l);
                s.put_loop(Phase::Failed);
                neg(libc::EIO)
            }
        }
    })
}

/// Milliseconds until `nbdkit_server_process` must be called even if the
/// descriptor stays quiet (a timer is due), to pass to poll(2) or the
/// like. Ask again after every `nbdkit_server_process`. Callable from the
/// thread that owns the server.
///
/// Returns 0 or more: that many milliseconds; -1: no deadline, only
/// readiness of the descriptor matters (also once the server has
/// stopped); any other negative value is an error: -EINVAL for a NULL
/// server, -EBUSY from inside a callback or while `nbdkit_main_loop` runs
/// the server, -EIO after an internal error.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_timeout_ms(srv: *mut nbdkit_server) -> c_int {
    const NAME: &str = "nbdkit_server_timeout_ms";
    guard(NAME, neg(libc::EIO), || {
        let Some(s) = server(srv) else { return neg(libc::EINVAL) };
        let r = s.with_phase(NAME, |p| match p {
            Phase::Setup(l) | Phase::Embedded(l) => match l.timeout() {
                // Round up, so the host never wakes a hair early and spins.
                Some(t) => t.as_micros().div_ceil(1000).min(c_int::MAX as u128) as c_int,
                None => -1,
            },
            Phase::Finished(_) => -1,
            Phase::Running(_) => {
                log::error!("{NAME}: the server's loop is running; refused with EBUSY");
                neg(libc::EBUSY)
            }
            Phase::Failed => neg(libc::EIO),
        });
        r.unwrap_or_else(|e| e)
    })
}
