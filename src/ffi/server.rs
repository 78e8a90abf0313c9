//! Server set-up, the main loop and shutdown.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::ToSocketAddrs;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::plugin::nbdkit_plugin_lowlevel;
use super::sync_plugin::nbdkit_plugin;
use super::{guard, neg};
use crate::event_loop::{request_global_shutdown, EventLoop, Listener, Shared};
use crate::plugin::Plugin;

/// An NBD server: a plugin, its listening sockets and settings.
///
/// Create it with `nbdkit_server_new`, configure it, run it with
/// `nbdkit_main_loop`, then release it with `nbdkit_server_free`.
/// Set-up functions are for the thread that owns the server, before the
/// loop runs; `nbdkit_server_shutdown` is the one call meant for other
/// threads.
pub struct nbdkit_server {
    _private: [u8; 0],
}

pub(super) struct Server {
    pub(super) phase: Mutex<Phase>,
    pub(super) shared: Arc<Shared>,
}

pub(super) enum Phase {
    Setup(EventLoop),
    /// `nbdkit_main_loop` has the loop.
    Running,
    /// The host drives the loop with `nbdkit_server_process`.
    Embedded(EventLoop),
    /// Kept until `nbdkit_server_free`: ops the plugin still holds live here.
    Finished(#[allow(dead_code)] EventLoop),
}

pub(super) fn server<'a>(p: *const nbdkit_server) -> Option<&'a Server> {
    // SAFETY: a non-NULL pointer from C is one nbdkit_server_new returned
    // and nbdkit_server_free has not released (the API contract).
    unsafe { p.cast::<Server>().as_ref() }
}

fn c_str<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// Runs `f` on the server's settings while it is still being set up.
pub(super) fn with_setup(srv: *mut nbdkit_server, name: &str, f: impl FnOnce(&mut EventLoop) -> c_int) -> c_int {
    guard(name, neg(libc::EIO), || {
        let Some(s) = server(srv) else {
            log::error!("{name}: NULL server");
            return neg(libc::EINVAL);
        };
        match &mut *s.phase.lock() {
            Phase::Setup(l) => f(l),
            _ => {
                log::error!("{name}: the server is running or has run");
                neg(libc::EBUSY)
            }
        }
    })
}

/// Creates a server for `plugin`.
///
/// `plugin_size` is `sizeof(struct nbdkit_plugin_lowlevel)` as the plugin
/// was compiled: callbacks the plugin's header did not have are NULL.
/// The struct is copied; `user_data` is passed to `open` and never touched
/// by the library.
///
/// Returns NULL on error (logged): missing `get_size` or `pread`, or a
/// plugin built against a newer header with callbacks this library lacks.
/// Callable from any thread; that thread then owns the server's set-up.
/// Free with `nbdkit_server_free`.
///
/// # Safety
/// `plugin` must point to `plugin_size` readable bytes; its `name` and
/// callbacks must stay valid until the server is freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_new(
    plugin: *const nbdkit_plugin_lowlevel,
    plugin_size: usize,
    user_data: *mut c_void,
) -> *mut nbdkit_server {
    guard("nbdkit_server_new", std::ptr::null_mut(), || {
        // SAFETY: forwarded from the caller.
        let Some(raw) = (unsafe { copy_versioned("nbdkit_server_new", plugin, plugin_size) }) else {
            return std::ptr::null_mut();
        };
        // SAFETY: the caller vouches for the callbacks.
        new_server("nbdkit_server_new", unsafe { Plugin::new(raw, user_data) })
    })
}

/// Creates a server for a synchronous plugin: the same server as
/// `nbdkit_server_new` (every other function applies unchanged), with the
/// plugin's I/O callbacks run on library-owned worker threads as its
/// `thread_model` allows.
///
/// `plugin_size` is `sizeof(struct nbdkit_plugin)` as the plugin was
/// compiled. Returns NULL on error (logged). Free with `nbdkit_server_free`.
///
/// # Safety
/// As for `nbdkit_server_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_new_sync(
    plugin: *const nbdkit_plugin,
    plugin_size: usize,
    user_data: *mut c_void,
) -> *mut nbdkit_server {
    guard("nbdkit_server_new_sync", std::ptr::null_mut(), || {
        // SAFETY: forwarded from the caller.
        let Some(raw) = (unsafe { copy_versioned("nbdkit_server_new_sync", plugin, plugin_size) }) else {
            return std::ptr::null_mut();
        };
        // SAFETY: the caller vouches for the callbacks.
        new_server("nbdkit_server_new_sync", unsafe { Plugin::new_sync(&raw, user_data) })
    })
}

/// Copies a plugin struct the caller compiled at `size` bytes: fields it
/// lacks read as zero (NULL); fields we lack must be zero in its copy.
///
/// # Safety
/// `p` must be NULL or point to `size` readable bytes; `T` must be a
/// `repr(C)` struct for which all-zero bytes are valid.
unsafe fn copy_versioned<T>(name: &str, p: *const T, size: usize) -> Option<T> {
    crate::logging::init();
    if p.is_null() {
        log::error!("{name}: NULL plugin");
        return None;
    }
    let ours = std::mem::size_of::<T>();
    // SAFETY: the caller promises `size` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), size) };
    if bytes.len() > ours && bytes[ours..].iter().any(|&b| b != 0) {
        log::error!("{name}: plugin uses callbacks this library does not have; upgrade the library");
        return None;
    }
    // SAFETY: all-zero is valid for T (caller's promise).
    let mut out: T = unsafe { std::mem::zeroed() };
    let n = bytes.len().min(ours);
    // SAFETY: both ranges are valid for n bytes and do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut out as *mut T).cast::<u8>(), n) };
    Some(out)
}

fn new_server(name: &str, plugin: Result<Plugin, &'static str>) -> *mut nbdkit_server {
    let made = plugin.map_err(|e| e.to_string()).and_then(|p| EventLoop::new(p).map_err(|e| e.to_string()));
    match made {
        Ok(l) => {
            let shared = l.shared.clone();
            Box::into_raw(Box::new(Server { phase: Mutex::new(Phase::Setup(l)), shared })).cast()
        }
        Err(e) => {
            log::error!("{name}: {e}");
            std::ptr::null_mut()
        }
    }
}

/// Releases a server. NULL is ignored. Must not be called while
/// `nbdkit_main_loop` runs on it, nor twice. Ops of this server replied
/// to afterwards are ignored (the reply returns -ESTALE).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_free(srv: *mut nbdkit_server) {
    guard("nbdkit_server_free", (), || {
        if !srv.is_null() {
            // SAFETY: srv came from Box::into_raw in nbdkit_server_new.
            drop(unsafe { Box::from_raw(srv.cast::<Server>()) });
        }
    })
}

/// Listens on a Unix socket at `path`. A stale socket file there is
/// replaced; any other file is an error. The path is removed when the
/// loop ends. Set-up thread only, before `nbdkit_main_loop`.
///
/// Returns 0 or a negative errno.
///
/// # Safety
/// `path` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_listen_unix(srv: *mut nbdkit_server, path: *const c_char) -> c_int {
    with_setup(srv, "nbdkit_server_listen_unix", |l| {
        let Some(path) = c_str(path).map(PathBuf::from) else { return neg(libc::EINVAL) };
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&path);
        }
        let listener = match mio::net::UnixListener::bind(&path) {
            Ok(u) => u,
            Err(e) => {
                log::error!("cannot listen on {}: {e}", path.display());
                return neg(e.raw_os_error().unwrap_or(libc::EIO));
            }
        };
        match l.add_listener(Listener::Unix(listener, Some(path))) {
            Ok(()) => 0,
            Err(e) => neg(e.raw_os_error().unwrap_or(libc::EINVAL)),
        }
    })
}

/// Listens on TCP `host`:`port` (IPv4 or IPv6; a name listens on every
/// address it resolves to; NULL means all IPv4 addresses). `port` 0 picks
/// a free port. Set-up thread only, before `nbdkit_main_loop`.
///
/// Returns the port listened on (> 0), or a negative errno.
///
/// # Safety
/// `host` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_listen_tcp(srv: *mut nbdkit_server, host: *const c_char, port: u16) -> c_int {
    with_setup(srv, "nbdkit_server_listen_tcp", |l| {
        let host = if host.is_null() { "0.0.0.0" } else { c_str(host).unwrap_or("") };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<_> = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                log::error!("cannot resolve {host}: {e}");
                return neg(libc::EINVAL);
            }
        };
        let mut bound = 0;
        for mut addr in addrs {
            if bound != 0 {
                addr.set_port(bound);
            }
            match mio::net::TcpListener::bind(addr) {
                Ok(t) => {
                    bound = t.local_addr().map(|a| a.port()).unwrap_or(port);
                    if let Err(e) = l.add_listener(Listener::Tcp(t)) {
                        return neg(e.raw_os_error().unwrap_or(libc::EINVAL));
                    }
                }
                Err(e) => {
                    log::error!("cannot listen on {addr}: {e}");
                    return neg(e.raw_os_error().unwrap_or(libc::EIO));
                }
            }
        }
        if bound == 0 { neg(libc::EADDRNOTAVAIL) } else { bound as c_int }
    })
}

/// Listens on the sockets systemd passed when socket-activating this
/// process (LISTEN_PID / LISTEN_FDS, from fd 3), Unix or TCP. Set-up
/// thread only, before `nbdkit_main_loop`.
///
/// Returns how many sockets were taken (0 when the process was not
/// socket-activated), or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_listen_systemd(srv: *mut nbdkit_server) -> c_int {
    with_setup(srv, "nbdkit_server_listen_systemd", |l| {
        let listeners = match crate::adopt::systemd_listeners() {
            Ok(v) => v,
            Err(e) => {
                log::error!("socket activation: {e}");
                return neg(e.raw_os_error().unwrap_or(libc::EINVAL));
            }
        };
        let n = listeners.len() as c_int;
        for listener in listeners {
            if let Err(e) = l.add_listener(listener) {
                return neg(e.raw_os_error().unwrap_or(libc::EINVAL));
            }
        }
        n
    })
}

/// Serves one client already connected on socket `fd` (Unix or TCP), for
/// example fd 0 of a server started as a client's subprocess over a
/// socketpair. The server takes ownership of `fd`. If the server has no
/// listening socket, the loop ends when that client disconnects. Set-up
/// thread only, before `nbdkit_main_loop`.
///
/// Returns 0 or a negative errno (-ENOTSOCK and the like for a pipe or file).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_serve_fd(srv: *mut nbdkit_server, fd: c_int) -> c_int {
    with_setup(srv, "nbdkit_server_serve_fd", |l| match crate::adopt::connected_stream(fd) {
        Ok(stream) => {
            l.add_connection(stream);
            0
        }
        Err(e) => {
            log::error!("nbdkit_server_serve_fd: fd {fd}: {e}");
            neg(e.raw_os_error().unwrap_or(libc::EINVAL))
        }
    })
}

/// Serves the export read-only when `readonly` is non-zero (the plugin's
/// `open` gets readonly=1). Set-up thread only. Returns 0 or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_readonly(srv: *mut nbdkit_server, readonly: c_int) -> c_int {
    with_setup(srv, "nbdkit_server_set_readonly", |l| {
        l.config.readonly = readonly != 0;
        0
    })
}

/// Names the export (default ""). Clients asking for "" get this export;
/// any other name is refused with NBD_REP_ERR_UNKNOWN. The string is
/// copied. Set-up thread only. Returns 0 or a negative errno.
///
/// # Safety
/// `name` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_set_export_name(srv: *mut nbdkit_server, name: *const c_char) -> c_int {
    with_setup(srv, "nbdkit_server_set_export_name", |l| match c_str(name) {
        Some(n) if n.len() <= 4096 => {
            l.config.export_name = n.to_string();
            0
        }
        _ => neg(libc::EINVAL),
    })
}

/// Sets the export's description, shown by `nbdinfo` (NBD_INFO_DESCRIPTION
/// and NBD_OPT_LIST). NULL removes it. The string is copied. Set-up
/// thread only. Returns 0 or a negative errno.
///
/// # Safety
/// `description` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_set_export_description(srv: *mut nbdkit_server, description: *const c_char) -> c_int {
    with_setup(srv, "nbdkit_server_set_export_description", |l| {
        if description.is_null() {
            l.config.export_description = None;
            return 0;
        }
        match c_str(description) {
            Some(d) if d.len() <= 4096 => {
                l.config.export_description = Some(d.to_string());
                0
            }
            _ => neg(libc::EINVAL),
        }
    })
}

/// Caps the ops one connection may have in flight (default 4096). When a
/// connection reaches it, the server stops reading its requests until
/// replies go out: back-pressure, never dropped requests. Set-up thread
/// only. Returns 0, or -EINVAL for 0.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_max_inflight(srv: *mut nbdkit_server, max_ops: u32) -> c_int {
    with_setup(srv, "nbdkit_server_set_max_inflight", |l| {
        if max_ops == 0 {
            return neg(libc::EINVAL);
        }
        l.config.max_inflight = max_ops as usize;
        0
    })
}

/// Sets how many worker threads run a synchronous plugin's callbacks
/// (default 16, like nbdkit). Ignored for asynchronous plugins, which get
/// no threads from the library. Set-up thread only. Returns 0, or -EINVAL for 0.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_threads(srv: *mut nbdkit_server, threads: u32) -> c_int {
    with_setup(srv, "nbdkit_server_set_threads", |l| {
        if threads == 0 {
            return neg(libc::EINVAL);
        }
        l.config.threads = threads as usize;
        0
    })
}

/// Caps the connections served at once (0, the default, means no cap).
/// Clients over the cap are accepted and closed at once. Set-up thread
/// only. Returns 0 or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_max_connections(srv: *mut nbdkit_server, max_connections: u32) -> c_int {
    with_setup(srv, "nbdkit_server_set_max_connections", |l| {
        l.config.max_connections = max_connections as usize;
        0
    })
}

/// Caps the memory clients can make the server hold: request payloads,
/// read buffers and unsent replies, per connection (default 256 MiB) and
/// over all connections (default 1 GiB). A connection at its cap, or any
/// connection holding memory while the total is at its cap, gets no new
/// request read until replies go out; one connection at a time that holds
/// nothing may still start one, so no client starves. A request may thus
/// overshoot a cap by its own size (at most 32 MiB). A WRITE payload, once
/// started, is received to its end; its buffer grows with what the client
/// actually sent, so a client stalling mid-payload holds at most that (cap
/// connections with `nbdkit_server_set_max_connections` to bound those).
/// 0 keeps a default. Set-up thread only. Returns 0 or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_memory_limits(srv: *mut nbdkit_server, per_connection: usize, total: usize) -> c_int {
    with_setup(srv, "nbdkit_server_set_memory_limits", |l| {
        if per_connection != 0 {
            l.config.max_connection_bytes = per_connection;
        }
        if total != 0 {
            l.config.max_total_bytes = total;
        }
        0
    })
}

/// A client must finish the handshake within `ms` milliseconds or be
/// disconnected (default 10000; 0 means no limit). Set-up thread only.
/// Returns 0 or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_handshake_timeout_ms(srv: *mut nbdkit_server, ms: u32) -> c_int {
    with_setup(srv, "nbdkit_server_set_handshake_timeout_ms", |l| {
        l.config.handshake_timeout = (ms > 0).then(|| Duration::from_millis(ms as u64));
        0
    })
}

/// When the plugin has not replied to an op within `ms` milliseconds, the
/// client is answered with an error (EIO on the wire) and the plugin's
/// late reply becomes a logged no-op. The op's buffer stays valid until
/// that late reply. 0 (the default) means no timeout. Set-up thread only.
/// Returns 0 or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_request_timeout_ms(srv: *mut nbdkit_server, ms: u32) -> c_int {
    with_setup(srv, "nbdkit_server_set_request_timeout_ms", |l| {
        l.config.request_timeout = (ms > 0).then(|| Duration::from_millis(ms as u64));
        0
    })
}

/// How long shutdown waits for the plugin to answer ops in flight before
/// answering their clients ESHUTDOWN and returning from
/// `nbdkit_main_loop`. Negative (the default) waits for every reply.
/// Ops still unanswered then are released by `nbdkit_server_free`, which
/// must therefore come after the plugin has stopped touching them.
/// Set-up thread only. Returns 0 or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_shutdown_grace_ms(srv: *mut nbdkit_server, ms: i64) -> c_int {
    with_setup(srv, "nbdkit_server_set_shutdown_grace_ms", |l| {
        l.config.shutdown_grace = (ms >= 0).then(|| Duration::from_millis(ms as u64));
        0
    })
}

/// Runs the server on the calling thread until `nbdkit_server_shutdown` or
/// `nbdkit_shutdown`. On shutdown it stops accepting clients and reading
/// requests, waits for every op in flight to be replied to and for the
/// replies to reach clients, closes every connection, and returns.
///
/// All plugin callbacks run on this thread. Call it once per server.
/// Returns 0 after a clean shutdown, or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_main_loop(srv: *mut nbdkit_server) -> c_int {
    guard("nbdkit_main_loop", neg(libc::EIO), || {
        let Some(s) = server(srv) else { return neg(libc::EINVAL) };
        let mut event_loop = match std::mem::replace(&mut *s.phase.lock(), Phase::Running) {
            Phase::Setup(l) => l,
            other => {
                *s.phase.lock() = other;
                log::error!("nbdkit_main_loop: the server is running or has run");
                return neg(libc::EBUSY);
            }
        };
        let result = event_loop.run();
        *s.phase.lock() = Phase::Finished(event_loop);
        match result {
            Ok(()) => 0,
            Err(e) => {
                log::error!("event loop failed: {e}");
                neg(e.raw_os_error().unwrap_or(libc::EIO))
            }
        }
    })
}

/// Asks one server's loop to shut down (see `nbdkit_main_loop`) and
/// returns at once. Thread-safe: call it from any thread, any number of
/// times, before or while the loop runs.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_shutdown(srv: *mut nbdkit_server) -> c_int {
    guard("nbdkit_server_shutdown", neg(libc::EIO), || match server(srv) {
        Some(s) => {
            s.shared.request_stop();
            0
        }
        None => neg(libc::EINVAL),
    })
}

/// Asks every server in the process to shut down and returns at once.
/// Async-signal-safe: meant to be called from a SIGINT/SIGTERM handler
/// (it only does an atomic add and a write(2)). Also callable from any
/// thread. Servers created afterwards are not affected.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_shutdown() {
    request_global_shutdown();
}
