//! Server set-up, the main loop and shutdown.

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::net::ToSocketAddrs;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, ReentrantMutex};

use super::callbacks::CPlugin;
use super::plugin::nbdkit_plugin_lowlevel;
use super::sync_plugin::nbdkit_plugin;
use super::{guard, neg};
use crate::errno::{self, Describe};
use crate::event_loop::{EventLoop, Listener, Shared, request_global_shutdown, run_guarded};
use crate::siblings::Siblings;

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
    /// Re-entrant so that a call from inside one of this server's own
    /// callbacks (or the log callback) finds the phase borrowed and gets
    /// -EBUSY, where a plain mutex would deadlock.
    phase: ReentrantMutex<RefCell<Phase>>,
    pub(super) shared: Arc<Shared>,
    /// The loop's epoll descriptor, fixed for the server's life.
    pub(super) fd: c_int,
    /// The server's other loops, from `nbdkit_main_loop` until the server
    /// is freed (see `nbdkit_server_set_loops`).
    siblings: Mutex<Option<Arc<Siblings>>>,
}

/// Who drives a loop that is out of its `Phase` slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Driver {
    MainLoop,
    Process,
}

pub(super) enum Phase {
    Setup(EventLoop),
    /// The loop is taken out and running: under `nbdkit_main_loop`, or one
    /// `nbdkit_server_process` turn. Callbacks run now; nothing is locked.
    Running(Driver),
    /// The host drives the loop with `nbdkit_server_process`.
    Embedded(EventLoop),
    /// Kept until `nbdkit_server_free`: ops the plugin still holds live here.
    Finished(#[allow(dead_code)] EventLoop),
    /// The loop panicked. Its memory was leaked on purpose: the plugin may
    /// still be filling buffers of ops it holds.
    Failed,
}

impl Server {
    /// Runs `f` on the phase. A call made while the phase is already in
    /// use on this thread (from a callback) is refused with -EBUSY.
    pub(super) fn with_phase<R>(&self, name: &str, f: impl FnOnce(&mut Phase) -> R) -> Result<R, c_int> {
        let lock = self.phase.lock();
        let Ok(mut phase) = lock.try_borrow_mut() else {
            log::error!("{name}: called from inside a callback of this server; refused with EBUSY");
            return Err(neg(libc::EBUSY));
        };
        Ok(f(&mut phase))
    }

    /// Takes the loop out to run it, leaving `Running(driver)` behind.
    /// `want` picks the phases it may come from.
    pub(super) fn take_loop(&self, name: &str, driver: Driver, want: fn(&Phase) -> bool) -> Result<EventLoop, c_int> {
        self.with_phase(name, |p| {
            if !want(p) {
                log::error!("{name}: {}; refused with EBUSY", p.describe());
                return Err(neg(libc::EBUSY));
            }
            match std::mem::replace(p, Phase::Running(driver)) {
                Phase::Setup(l) | Phase::Embedded(l) | Phase::Finished(l) => Ok(l),
                other => {
                    *p = other;
                    Err(neg(libc::EBUSY))
                }
            }
        })?
    }

    /// Puts a loop back after it ran.
    pub(super) fn put_loop(&self, phase: Phase) {
        // Only the driver that took the loop puts it back: the slot holds
        // `Running`, which no other call replaces.
        let lock = self.phase.lock();
        *lock.borrow_mut() = phase;
    }
}

impl Phase {
    fn describe(&self) -> &'static str {
        match self {
            Phase::Setup(_) => "the server is still being set up",
            Phase::Running(Driver::MainLoop) => "nbdkit_main_loop is running this server",
            Phase::Running(Driver::Process) => "nbdkit_server_process is running this server",
            Phase::Embedded(_) => "the server is driven by nbdkit_server_process",
            Phase::Finished(_) => "the server has stopped",
            Phase::Failed => "the server stopped after an internal error",
        }
    }
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
        s.with_phase(name, |p| match p {
            Phase::Setup(l) => f(l),
            other => {
                log::error!("{name}: {}; set-up calls must come before the loop starts", other.describe());
                neg(libc::EBUSY)
            }
        })
        .unwrap_or_else(|e| e)
    })
}

fn set_errno(e: i32) {
    // SAFETY: __errno_location always returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// Creates a server for `plugin`.
///
/// `plugin_size` is `sizeof(struct nbdkit_plugin_lowlevel)` as the plugin
/// was compiled: callbacks the plugin's header did not have are NULL.
/// The struct is copied; `user_data` is passed to `open` and never touched
/// by the library.
///
/// Returns NULL on error, logged and with `errno` set: EINVAL for a NULL
/// plugin or one missing `get_size` or `pread`; ENOTSUP for a plugin built
/// against a newer header with callbacks this library lacks; EMFILE,
/// ENOMEM and the like when the loop's descriptors cannot be made.
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
    guard_new("nbdkit_server_new", || {
        // SAFETY: forwarded from the caller.
        let Some(raw) = (unsafe { copy_versioned("nbdkit_server_new", plugin, plugin_size) }) else {
            return std::ptr::null_mut();
        };
        // SAFETY: the caller vouches for the callbacks.
        new_server("nbdkit_server_new", unsafe { CPlugin::new(raw, user_data) })
    })
}

/// Creates a server for a synchronous plugin: the same server as
/// `nbdkit_server_new` (every other function applies unchanged), with the
/// plugin's I/O callbacks run on library-owned worker threads as its
/// `thread_model` allows.
///
/// `plugin_size` is `sizeof(struct nbdkit_plugin)` as the plugin was
/// compiled. Callable from any thread; that thread then owns the
/// server's set-up. Free with `nbdkit_server_free`.
///
/// Returns NULL on error, logged and with `errno` set as for
/// `nbdkit_server_new` (EINVAL also for an unknown thread model).
///
/// # Safety
/// As for `nbdkit_server_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_server_new_sync(
    plugin: *const nbdkit_plugin,
    plugin_size: usize,
    user_data: *mut c_void,
) -> *mut nbdkit_server {
    guard_new("nbdkit_server_new_sync", || {
        // SAFETY: forwarded from the caller.
        let Some(raw) = (unsafe { copy_versioned("nbdkit_server_new_sync", plugin, plugin_size) }) else {
            return std::ptr::null_mut();
        };
        // SAFETY: the caller vouches for the callbacks.
        new_server("nbdkit_server_new_sync", unsafe { CPlugin::new_sync(&raw, user_data) })
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
        set_errno(libc::EINVAL);
        return None;
    }
    let ours = std::mem::size_of::<T>();
    // SAFETY: the caller promises `size` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), size) };
    if bytes.len() > ours && bytes[ours..].iter().any(|&b| b != 0) {
        log::error!("{name}: plugin uses callbacks this library does not have; upgrade the library");
        set_errno(libc::ENOTSUP);
        return None;
    }
    // SAFETY: all-zero is valid for T (caller's promise).
    let mut out: T = unsafe { std::mem::zeroed() };
    let n = bytes.len().min(ours);
    // SAFETY: both ranges are valid for n bytes and do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut out as *mut T).cast::<u8>(), n) };
    Some(out)
}

/// Runs a constructor body: a panic gives NULL with errno EIO.
fn guard_new(name: &str, body: impl FnOnce() -> *mut nbdkit_server) -> *mut nbdkit_server {
    let p = guard(name, std::ptr::null_mut(), body);
    if p.is_null() && std::io::Error::last_os_error().raw_os_error().unwrap_or(0) == 0 {
        set_errno(libc::EIO);
    }
    p
}

fn new_server(name: &str, plugin: Result<CPlugin, &'static str>) -> *mut nbdkit_server {
    let plugin = match plugin {
        Ok(p) => p,
        Err(e) => {
            log::error!("{name}: {e}");
            set_errno(libc::EINVAL);
            return std::ptr::null_mut();
        }
    };
    match EventLoop::new(Box::new(plugin)) {
        Ok(l) => {
            let shared = l.shared.clone();
            let fd = l.fd();
            Box::into_raw(Box::new(Server {
                phase: ReentrantMutex::new(RefCell::new(Phase::Setup(l))),
                shared,
                fd,
                siblings: Mutex::new(None),
            }))
            .cast()
        }
        Err(e) => {
            log::error!("{name}: cannot create the event loop: {}", Describe(&e));
            set_errno(errno::of(&e, libc::EIO));
            std::ptr::null_mut()
        }
    }
}

/// Releases a server. NULL is ignored. Ops of this server replied to
/// afterwards are ignored (the reply returns -ESTALE). Call it once, from
/// the thread that owns the server, after `nbdkit_main_loop` returned (or
/// `nbdkit_server_process` returned 0 or was never called). Called while
/// the loop runs (from a callback, or from another thread during
/// `nbdkit_main_loop`) it logs an error and frees nothing.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_free(srv: *mut nbdkit_server) {
    guard("nbdkit_server_free", (), || {
        let Some(s) = server(srv) else { return };
        let running = s.with_phase("nbdkit_server_free", |p| matches!(p, Phase::Running(_))).unwrap_or(true);
        if running {
            log::error!("nbdkit_server_free: the server's loop is running; not freed");
            return;
        }
        // Taken out first: a plugin's close on a loop being released may
        // call nbdkit_server_shutdown, which takes this lock.
        let siblings = s.siblings.lock().take();
        if let Some(siblings) = siblings {
            siblings.release();
        }
        // SAFETY: srv came from Box::into_raw in nbdkit_server_new, and no
        // call of ours is using it (the loop is not running).
        drop(unsafe { Box::from_raw(srv.cast::<Server>()) });
    })
}

/// Listens on a Unix socket at `path`. A stale socket file there (one no
/// server answers on) is replaced; a socket a live server answers on gives
/// -EADDRINUSE, and so does any other file. The path is removed when the
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
            // A socket nobody answers on is left over from a server that
            // died; one that answers belongs to a live server.
            match mio::net::UnixStream::connect(&path) {
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {}
                _ => {
                    log::error!("cannot listen on {}: a server is listening there", path.display());
                    return neg(libc::EADDRINUSE);
                }
            }
        }
        let listener = match mio::net::UnixListener::bind(&path) {
            Ok(u) => u,
            Err(e) => {
                log::error!("cannot listen on {}: {}", path.display(), Describe(&e));
                return neg(errno::of(&e, libc::EIO));
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
                    log::error!("cannot listen on {addr}: {}", Describe(&e));
                    return neg(errno::of(&e, libc::EIO));
                }
            }
        }
        if bound == 0 { neg(libc::EADDRNOTAVAIL) } else { bound as c_int }
    })
}

/// Listens on the sockets systemd passed when socket-activating this
/// process (LISTEN_PID / LISTEN_FDS, from fd 3), Unix or TCP. The sockets
/// are taken once per process: the call clears LISTEN_PID, LISTEN_FDS
/// and LISTEN_FDNAMES, as sd_listen_fds(3) does when asked to unset the
/// environment, and later calls (for
/// this or another server) take none. Set-up thread only, before
/// `nbdkit_main_loop`.
///
/// Returns how many sockets were taken (0 when the process was not
/// socket-activated or they were taken already), or a negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_listen_systemd(srv: *mut nbdkit_server) -> c_int {
    with_setup(srv, "nbdkit_server_listen_systemd", |l| {
        let listeners = match crate::adopt::systemd_listeners() {
            Ok(v) => v,
            Err(e) => {
                log::error!("socket activation: {}", Describe(&e));
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
            log::error!("nbdkit_server_serve_fd: fd {fd}: {}", Describe(&e));
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
pub unsafe extern "C" fn nbdkit_server_set_export_description(
    srv: *mut nbdkit_server,
    description: *const c_char,
) -> c_int {
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

/// Sets the largest READ or WRITE a client may send, in bytes (default
/// 64 MiB, as nbdkit; at least 512, at most 1 GiB). It is advertised to
/// clients as the maximum block size (NBD_INFO_BLOCK_SIZE); a plugin's
/// `block_size` maximum above it is lowered to it. Larger requests are
/// refused with EINVAL (a client sending a larger payload with extended
/// headers is disconnected). Set-up thread only. Returns 0, or -EINVAL
/// for a size outside 512 bytes to 1 GiB.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_max_request_size(srv: *mut nbdkit_server, bytes: u32) -> c_int {
    with_setup(srv, "nbdkit_server_set_max_request_size", |l| {
        if !(512..=crate::config::MAX_REQUEST_LIMIT).contains(&bytes) {
            log::error!("nbdkit_server_set_max_request_size: {bytes} is outside 512 bytes to 1 GiB");
            return neg(libc::EINVAL);
        }
        l.config.max_request = bytes;
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

/// Serves connections from `loops` event loops, each on a thread of its
/// own, instead of one (the default), so that a server with many clients
/// uses more than one core. New connections go to the loops in turn, and
/// each connection stays on its loop: its `open`, I/O callbacks, `cancel`
/// and `close` all run on that loop's thread. What changes for the plugin:
/// callbacks of different connections run at once on different threads,
/// so state they share (an export table, a cache, the `list_exports` data)
/// must be thread-safe; a reply may be given from any thread as before.
/// `nbdkit_main_loop` runs the first loop on its caller's thread and starts
/// the others; `nbdkit_server_process` serves one loop only and refuses a
/// server set to more. At `nbdkit_server_free`, the `close` of a connection
/// whose ops the plugin still held runs on its own loop's thread. The memory limit over all connections is shared out
/// evenly between the loops. Set-up thread only.
///
/// Returns 0; -EINVAL for 0 or more than 64; -ENOTSUP for a synchronous
/// plugin (give it more threads with `nbdkit_server_set_threads`).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_loops(srv: *mut nbdkit_server, loops: u32) -> c_int {
    with_setup(srv, "nbdkit_server_set_loops", |l| {
        if !(1..=64).contains(&loops) {
            log::error!("nbdkit_server_set_loops: {loops} is not between 1 and 64");
            return neg(libc::EINVAL);
        }
        if loops > 1 && l.plugin.for_another_loop().is_none() {
            log::error!("nbdkit_server_set_loops: a synchronous plugin runs on one loop; give it threads instead");
            return neg(libc::ENOTSUP);
        }
        l.config.loops = loops as usize;
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
/// read buffers and unsent replies, per connection (default 64 MiB) and
/// over all connections (default 1 GiB). A connection at its cap, or any
/// connection holding memory while the total is at its cap, gets no new
/// request read until replies go out; one connection at a time that holds
/// nothing may still start one (a turn that passes on after it stalls for
/// a second), so no client starves. A WRITE payload, once started, is
/// received to its end: each connection receiving one may overshoot a cap
/// by that request's size (see `nbdkit_server_set_max_request_size`); its
/// buffer grows with what the client actually sent, so a client stalling
/// mid-payload holds at most that (cap connections with
/// `nbdkit_server_set_max_connections` to bound those). Independently, a
/// client whose unsent replies pass 4 MiB gets no new request read until
/// it reads them. 0 keeps a default. Set-up thread only. Returns 0 or a
/// negative errno.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_set_memory_limits(
    srv: *mut nbdkit_server,
    per_connection: usize,
    total: usize,
) -> c_int {
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
/// requests, waits for every op in flight to be answered (by the plugin,
/// or with ESHUTDOWN once the shutdown grace has passed) and for the
/// replies to reach clients, closes every connection, and returns.
///
/// `open`, `close`, the capability callbacks and an async plugin's I/O
/// callbacks run on this thread (see the header's opening comment for the
/// rest). Call it once per server, from the thread that owns it.
///
/// Returns 0 after a clean shutdown, -EBUSY at once when the loop is
/// already running (a second call, from any thread or from a callback) or
/// has run, -EIO after an internal error (logged; the server's memory is
/// then kept so that buffers the plugin holds stay valid), or another
/// negative errno when the loop could not start (a listening socket, TLS).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_main_loop(srv: *mut nbdkit_server) -> c_int {
    const NAME: &str = "nbdkit_main_loop";
    guard(NAME, neg(libc::EIO), || {
        let Some(s) = server(srv) else {
            log::error!("{NAME}: NULL server");
            return neg(libc::EINVAL);
        };
        let mut event_loop = match s.take_loop(NAME, Driver::MainLoop, |p| matches!(p, Phase::Setup(_))) {
            Ok(l) => l,
            Err(e) => return e,
        };
        if event_loop.config.loops > 1 {
            match Siblings::start(&mut event_loop) {
                Ok(siblings) => *s.siblings.lock() = Some(Arc::new(siblings)),
                Err(e) => {
                    log::error!("{NAME}: cannot start the other event loops: {}", Describe(&e));
                    s.put_loop(Phase::Finished(event_loop));
                    return neg(errno::of(&e, libc::EIO));
                }
            }
        }
        let ran = run_guarded(NAME, &mut event_loop, |l| l.run());
        // The other loops end with this one (also when it ended by itself,
        // its last client gone), and before this call returns.
        let siblings = s.siblings.lock().clone();
        let others = siblings.map_or(Ok(()), |sib| {
            sib.stop();
            sib.wait()
        });
        match ran {
            Ok(result) => {
                s.put_loop(Phase::Finished(event_loop));
                match result.and(others) {
                    Ok(()) => 0,
                    Err(e) => {
                        log::error!("event loop failed: {}", Describe(&e));
                        neg(errno::of(&e, libc::EIO))
                    }
                }
            }
            Err(()) => {
                std::mem::forget(event_loop);
                s.put_loop(Phase::Failed);
                neg(libc::EIO)
            }
        }
    })
}

/// Asks one server's loop to shut down (see `nbdkit_main_loop`) and
/// returns at once without waiting for it. Thread-safe: call it from any
/// thread (callbacks included), any number of times, before, while or
/// after the loop runs; a loop not yet started stops as soon as it starts.
///
/// Returns 0 when the request is recorded, or -EINVAL for a NULL server.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_server_shutdown(srv: *mut nbdkit_server) -> c_int {
    guard("nbdkit_server_shutdown", neg(libc::EIO), || match server(srv) {
        Some(s) => {
            s.shared.request_stop();
            if let Some(siblings) = s.siblings.lock().clone() {
                siblings.stop();
            }
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

#[cfg(test)]
mod tests {
    //! A panic inside the loop must not free what the plugin still holds.

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::io::{Read, Write};
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

    use super::*;
    use crate::ffi::plugin::nbdkit_op;
    use crate::protocol::consts::{CLIENT_FLAG_NO_ZEROES, CMD_READ, IHAVEOPT, OPT_EXPORT_NAME, REQUEST_MAGIC};

    /// Notes whether the block at WATCHED is ever freed.
    struct Watching;
    static WATCHED: AtomicUsize = AtomicUsize::new(0);
    static FREED: AtomicBool = AtomicBool::new(false);
    static HELD_OP: AtomicUsize = AtomicUsize::new(0);

    // SAFETY: forwards to the system allocator; only observes frees.
    unsafe impl GlobalAlloc for Watching {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if ptr as usize == WATCHED.load(SeqCst) {
                FREED.store(true, SeqCst);
            }
            // SAFETY: forwarded.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Watching = Watching;

    unsafe extern "C" fn size(_: *mut c_void) -> i64 {
        1 << 20
    }

    /// Holds the op and its buffer, as an async plugin filling it from
    /// another thread would.
    unsafe extern "C" fn pread(op: *mut nbdkit_op, _: *mut c_void, buf: *mut c_void, _: u32, _: u64, _: u32) -> c_int {
        WATCHED.store(buf as usize, SeqCst);
        HELD_OP.store(op as usize, SeqCst);
        0
    }

    /// Fixed newstyle, NBD_OPT_EXPORT_NAME "", a 4 KiB READ, and once the
    /// plugin holds it, another (a new loop turn with an op in flight).
    fn client(mut s: UnixStream) -> UnixStream {
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&CLIENT_FLAG_NO_ZEROES.to_be_bytes()).unwrap();
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&opt).unwrap();
        let mut export = [0u8; 10];
        s.read_exact(&mut export).unwrap();
        let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&CMD_READ.to_be_bytes());
        req.extend_from_slice(&1u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        s.write_all(&req).unwrap();
        while WATCHED.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        s.write_all(&req).unwrap();
        s
    }

    #[test]
    fn a_panic_in_the_loop_keeps_the_plugins_buffers() {
        // SAFETY: all-zero is a valid plugin struct (NULL callbacks).
        let mut p: nbdkit_plugin_lowlevel = unsafe { std::mem::zeroed() };
        p.get_size = Some(size);
        p.pread = Some(pread);
        // SAFETY: a valid struct of the size given.
        let srv = unsafe { nbdkit_server_new(&p, std::mem::size_of_val(&p), std::ptr::null_mut()) };
        assert!(!srv.is_null());
        let (ours, theirs) = UnixStream::pair().unwrap();
        assert_eq!(nbdkit_server_serve_fd(srv, ours.into_raw_fd()), 0);
        let peer = std::thread::spawn(move || client(theirs));
        crate::event_loop::tests::PANIC_WITH_OPS.store(true, SeqCst);
        assert_eq!(nbdkit_main_loop(srv), -libc::EIO, "the loop reports the internal error");
        let _peer = peer.join().unwrap();
        let buf = WATCHED.load(SeqCst);
        assert_ne!(buf, 0, "pread ran");
        assert!(!FREED.load(SeqCst), "the read buffer was freed under the plugin");
        assert_eq!(nbdkit_main_loop(srv), -libc::EBUSY);
        nbdkit_server_free(srv);
        assert!(!FREED.load(SeqCst), "nbdkit_server_free freed the read buffer");
        // The plugin may still fill it, and answer: refused, harmlessly.
        // SAFETY: the buffer was kept (leaked) on purpose; 4096 bytes.
        unsafe { std::ptr::write_bytes(buf as *mut u8, 0x5a, 4096) };
        let op = HELD_OP.load(SeqCst) as *mut nbdkit_op;
        assert!(crate::ffi::reply::nbdkit_reply(op) < 0);
    }
}
