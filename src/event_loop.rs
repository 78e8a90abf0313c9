//! The mio event loop: accepts clients, drives connections, applies
//! completions. Everything here runs on the one thread that called
//! `nbdkit_main_loop`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, UnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token as MioToken};
use slab::Slab;

use crate::completion::{self, Completion, Completions, OpTable};
use crate::config::Config;
use crate::conn::stream::{interrupted, would_block, Stream};
use crate::conn::{Connection, Ctx, Next, Op};
use crate::plugin::Plugin;

const WAKER: MioToken = MioToken(0);
const SHUTDOWN: MioToken = MioToken(1);
const FIRST_LISTENER: usize = 2;
const MAX_LISTENERS: usize = 64;
const FIRST_CONN: usize = FIRST_LISTENER + MAX_LISTENERS;
/// How long shutdown waits for clients to take their last replies.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

pub enum Listener {
    Tcp(TcpListener),
    /// The path is unlinked when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Replies are small and latency-bound: never wait to coalesce.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Listener::Tcp(l) => l,
            Listener::Unix(l, _) => l,
        }
    }
}

/// Process-wide shutdown, safe to request from a signal handler: bump the
/// epoch and poke an eventfd that every server's poll watches.
static SHUTDOWN_EPOCH: AtomicU64 = AtomicU64::new(0);
static SHUTDOWN_FD: OnceLock<OwnedFd> = OnceLock::new();

fn shutdown_fd() -> io::Result<RawFd> {
    if let Some(fd) = SHUTDOWN_FD.get() {
        return Ok(fd.as_raw_fd());
    }
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // A racing thread may have won; either fd works, the loser is closed.
    Ok(SHUTDOWN_FD.get_or_init(|| owned).as_raw_fd())
}

/// Async-signal-safe: one atomic add and one write(2).
pub fn request_global_shutdown() {
    SHUTDOWN_EPOCH.fetch_add(1, Ordering::SeqCst);
    if let Some(fd) = SHUTDOWN_FD.get() {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local to an eventfd we never close.
        unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// What other threads may touch: the completion queue and the stop flag.
pub struct Shared {
    pub id: usize,
    pub completions: Arc<Completions>,
    pub stop: AtomicBool,
    epoch: u64,
}

impl Shared {
    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || SHUTDOWN_EPOCH.load(Ordering::SeqCst) != self.epoch
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.completions.wake();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        completion::unregister(self.id);
    }
}

pub struct EventLoop {
    poll: Poll,
    pub shared: Arc<Shared>,
    pub plugin: Plugin,
    pub config: Config,
    listeners: Vec<Listener>,
}

impl EventLoop {
    pub fn new(plugin: Plugin) -> io::Result<EventLoop> {
        let poll = Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKER)?;
        let fd = shutdown_fd()?;
        poll.registry().register(&mut SourceFd(&fd), SHUTDOWN, Interest::READABLE)?;
        let completions = Arc::new(Completions::new(waker));
        let id = completion::register(completions.clone())
            .ok_or_else(|| io::Error::other("too many servers in this process"))?;
        let shared = Arc::new(Shared {
            id,
            completions,
            stop: AtomicBool::new(false),
            epoch: SHUTDOWN_EPOCH.load(Ordering::SeqCst),
        });
        Ok(EventLoop { poll, shared, plugin, config: Config::default(), listeners: Vec::new() })
    }

    pub fn add_listener(&mut self, mut l: Listener) -> io::Result<()> {
        if self.listeners.len() == MAX_LISTENERS {
            return Err(io::Error::other("too many listeners"));
        }
        let token = MioToken(FIRST_LISTENER + self.listeners.len());
        self.poll.registry().register(l.source(), token, Interest::READABLE)?;
        self.listeners.push(l);
        Ok(())
    }

    /// Serves until shutdown, then drains in-flight ops and returns.
    pub fn run(&mut self) -> io::Result<()> {
        let mut state = LoopState {
            conns: Slab::new(),
            ops: OpTable::new(self.shared.id),
            next_serial: 1,
            again: Vec::new(),
            completed: Vec::new(),
            stopping_since: None,
        };
        let mut events = Events::with_capacity(1024);
        log::info!("{}: serving", self.plugin.name);
        loop {
            let timeout = if state.again.is_empty() { None } else { Some(Duration::ZERO) };
            let timeout = if state.stopping_since.is_some() { Some(Duration::from_millis(100)) } else { timeout };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
            let mut touched: Vec<usize> = std::mem::take(&mut state.again);
            for event in events.iter() {
                match event.token() {
                    WAKER | SHUTDOWN => {}
                    MioToken(t) if t < FIRST_CONN => self.accept(t - FIRST_LISTENER, &mut state),
                    MioToken(t) => {
                        let key = t - FIRST_CONN;
                        if let Some(c) = state.conns.get_mut(key) {
                            if event.is_readable() || event.is_read_closed() || event.is_error() {
                                c.readable();
                            }
                            if event.is_writable() || event.is_write_closed() || event.is_error() {
                                c.writable();
                            }
                            touched.push(key);
                        }
                    }
                }
            }
            self.apply_completions(&mut state, &mut touched);
            if state.stopping_since.is_none() && self.shared.stop_requested() {
                self.begin_shutdown(&mut state);
                touched.extend(state.conns.iter().map(|(k, _)| k));
            }
            touched.sort_unstable();
            touched.dedup();
            for key in touched {
                self.service(key, &mut state);
            }
            if let Some(since) = state.stopping_since {
                if state.ops.len() == 0 && (state.conns.is_empty() || since.elapsed() > SHUTDOWN_FLUSH_TIMEOUT) {
                    for (_, c) in state.conns.iter_mut() {
                        c.close(&self.plugin);
                    }
                    state.conns.clear();
                    break;
                }
            }
        }
        self.shared.completions.close();
        log::info!("{}: stopped", self.plugin.name);
        Ok(())
    }

    fn accept(&mut self, index: usize, state: &mut LoopState) {
        loop {
            let Some(listener) = self.listeners.get(index) else { return };
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: log and keep serving the others.
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            let key = state.conns.vacant_key();
            let serial = state.next_serial;
            state.next_serial += 1;
            let mut conn = Connection::new(key, serial, stream);
            let stream = conn.stream_mut().expect("new connection");
            if let Err(e) = self.poll.registry().register(stream, MioToken(FIRST_CONN + key), Interest::READABLE | Interest::WRITABLE) {
                log::warn!("cannot register connection: {e}");
                continue;
            }
            state.conns.insert(conn);
            state.again.push(key);
        }
    }

    fn apply_completions(&mut self, state: &mut LoopState, touched: &mut Vec<usize>) {
        self.shared.completions.drain_into(&mut state.completed);
        let mut completed = std::mem::take(&mut state.completed);
        for Completion { token, outcome } in completed.drain(..) {
            let Some(op) = state.ops.get(token) else {
                log::warn!("reply to an op that was already answered or never existed; ignored (double reply?)");
                continue;
            };
            let (key, serial) = (op.conn, op.conn_serial);
            let conn = match state.conns.get_mut(key) {
                Some(c) if c.serial == serial => c,
                _ => {
                    log::error!("op without its connection; dropping it");
                    state.ops.remove(token);
                    continue;
                }
            };
            let mut ctx = Ctx { plugin: &self.plugin, config: &self.config, ops: &mut state.ops };
            conn.complete(token, outcome, &mut ctx);
            touched.push(key);
        }
        state.completed = completed;
    }

    fn service(&mut self, key: usize, state: &mut LoopState) {
        let Some(conn) = state.conns.get_mut(key) else { return };
        let mut ctx = Ctx { plugin: &self.plugin, config: &self.config, ops: &mut state.ops };
        let next = conn.service(&mut ctx);
        conn.flush();
        if next == Next::Again {
            state.again.push(key);
        }
        if conn.finished() {
            let mut conn = state.conns.remove(key);
            if let Some(s) = conn.stream_mut() {
                let _ = self.poll.registry().deregister(s);
            }
            conn.close(&self.plugin);
            log::debug!("connection {} finished", conn.serial);
        }
    }

    fn begin_shutdown(&mut self, state: &mut LoopState) {
        log::info!("{}: shutting down, {} ops in flight", self.plugin.name, state.ops.len());
        state.stopping_since = Some(Instant::now());
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(l.source());
        }
        for (_, c) in state.conns.iter_mut() {
            c.stop_reading();
        }
    }
}

struct LoopState {
    conns: Slab<Connection>,
    ops: OpTable<Op>,
    next_serial: u64,
    /// Connections to service on the next turn without waiting for an event.
    again: Vec<usize>,
    completed: Vec<Completion>,
    stopping_since: Option<Instant>,
}
