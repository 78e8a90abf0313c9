//! The mio event loop: accepts clients, drives connections, applies
//! completions. Everything here runs on the one thread that called
//! `nbdkit_main_loop`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, UnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token as MioToken};
use slab::Slab;

use crate::budget::{Budget, ConnId};
use crate::buffers::BufferPool;
use crate::completion::{self, Completion, Completions, OpTable, Token};
use crate::config::Config;
use crate::conn::stream::{Stream, interrupted, would_block};
use crate::conn::{Connection, Ctx, Next, Op};
use crate::deadlines::Deadlines;
use crate::plugin::Plugin;
use crate::protocol::handshake::TlsMode;
use crate::stats::Stats;

const WAKER: MioToken = MioToken(0);
const SHUTDOWN: MioToken = MioToken(1);
const FIRST_LISTENER: usize = 2;
const MAX_LISTENERS: usize = 64;
const FIRST_CONN: usize = FIRST_LISTENER + MAX_LISTENERS;
/// How long shutdown waits for clients to take their last replies.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a stopping loop re-checks its limits.
const STOPPING_TICK: Duration = Duration::from_millis(50);
/// How long the connection allowed past the memory budget may sit on a
/// half-received WRITE before the next connection gets the turn.
const EXEMPT_STALL: Duration = Duration::from_secs(1);
/// Kernel send buffer asked for each client socket (Linux doubles it).
/// The default (~200 KiB) sends 1 MiB read replies in pieces, each a write
/// and an epoll round trip (a third fewer MiB/s); much more than this lets
/// a thousand small replies sit unread in the socket, every one of them a
/// command in flight that libnbd walks past for each reply it takes
/// (fio at QD 1024 then costs 40 % more CPU per IO and completes fewer).
const SEND_BUFFER: i32 = 512 * 1024;
/// Pause before accepting again after EMFILE and the like.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

pub enum Listener {
    Tcp(TcpListener),
    /// A path we bound is unlinked when the listener is dropped; one we
    /// were handed (socket activation) is not ours to remove.
    Unix(UnixListener, Option<PathBuf>),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(path)) = self {
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

/// Runs one stretch of the loop, `f`, so that a panic inside it can never
/// free memory the plugin may still hold: the loop is then abandoned
/// (sockets closed, memory leaked) and `Err(-EIO)` returned.
pub(crate) fn run_guarded<T>(name: &str, l: &mut EventLoop, f: impl FnOnce(&mut EventLoop) -> T) -> Result<T, ()> {
    match catch_unwind(AssertUnwindSafe(|| f(l))) {
        Ok(v) => Ok(v),
        Err(payload) => {
            log::error!(
                "internal error in {name}: {}; the server stops, and its memory is kept (leaked) because the plugin may still use op buffers",
                panic_message(&payload)
            );
            // Best effort: clients see their sockets close rather than hang.
            let _ = catch_unwind(AssertUnwindSafe(|| l.abandon()));
            Err(())
        }
    }
}

/// What a panic said.
pub(crate) fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
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
    /// One for the whole server: every loop of it counts here.
    pub stats: Arc<Stats>,
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
    events: Events,
    pub shared: Arc<Shared>,
    pub plugin: Box<dyn Plugin>,
    pub config: Config,
    listeners: Vec<Listener>,
    state: LoopState,
}

/// Connections the first loop accepted for another loop of the server.
pub struct Handoff {
    /// None once that loop has ended: it takes no more.
    streams: Mutex<Option<Vec<Stream>>>,
    completions: Arc<Completions>,
}

impl Handoff {
    /// Hands `stream` over; gives it back if that loop has ended.
    fn give(&self, stream: Stream) -> Result<(), Stream> {
        match &mut *self.streams.lock() {
            Some(queue) => queue.push(stream),
            None => return Err(stream),
        }
        self.completions.wake();
        Ok(())
    }

    fn take(&self) -> Vec<Stream> {
        self.streams.lock().as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// That loop has ended (or failed): streams still queued are closed,
    /// and later ones are served elsewhere.
    pub fn close(&self) {
        drop(self.streams.lock().take());
    }
}

/// What a loop other than the first is made of; it is built on its own
/// thread, since a loop never changes threads.
pub struct SiblingParts {
    pub plugin: Box<dyn Plugin>,
    pub config: Config,
    pub stats: Arc<Stats>,
    /// This loop's number (1..loops), for distinct connection serials.
    pub index: usize,
}

impl EventLoop {
    pub fn new(plugin: Box<dyn Plugin>) -> io::Result<EventLoop> {
        EventLoop::with_stats(plugin, Arc::new(Stats::default()))
    }

    /// Another loop of the server `parts` describe; also returns where the
    /// first loop hands it connections and how to stop it.
    pub fn sibling(parts: SiblingParts) -> io::Result<(EventLoop, Arc<Handoff>)> {
        let mut l = EventLoop::with_stats(parts.plugin, parts.stats)?;
        l.config = parts.config;
        l.state.next_serial = 1 + parts.index as u64;
        l.state.is_sibling = true;
        let handoff =
            Arc::new(Handoff { streams: Mutex::new(Some(Vec::new())), completions: l.shared.completions.clone() });
        l.state.handoff = Some(handoff.clone());
        Ok((l, handoff))
    }

    /// Makes the first loop hand new connections round-robin to `siblings`
    /// as well as serve them itself.
    pub fn share_with(&mut self, siblings: Vec<Arc<Handoff>>) {
        self.state.siblings = siblings;
    }

    fn with_stats(plugin: Box<dyn Plugin>, stats: Arc<Stats>) -> io::Result<EventLoop> {
        let poll = Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKER)?;
        let fd = shutdown_fd()?;
        poll.registry().register(&mut SourceFd(&fd), SHUTDOWN, Interest::READABLE)?;
        let completions = Arc::new(Completions::new(waker));
        let id = completion::register(completions.clone())
            .ok_or_else(|| io::Error::other("too many servers in this process"))?;
        let shared = Arc::new(Shared {
            id,
            stats,
            completions,
            stop: AtomicBool::new(false),
            epoch: SHUTDOWN_EPOCH.load(Ordering::SeqCst),
        });
        let state = LoopState { ops: OpTable::new(id), next_serial: 1, ..LoopState::default() };
        Ok(EventLoop {
            poll,
            events: Events::with_capacity(1024),
            shared,
            plugin,
            config: Config::default(),
            listeners: Vec::new(),
            state,
        })
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
        self.start()?;
        while !self.step(None)? {}
        Ok(())
    }

    /// Prepares to serve: timers and, for a synchronous plugin, workers.
    /// Idempotent.
    pub fn start(&mut self) -> io::Result<()> {
        if self.state.started {
            return Ok(());
        }
        if self.config.tls_mode != TlsMode::Off {
            self.config.tls = Some(self.config.tls_settings.build()?);
        }
        self.state.handshakes = self.config.handshake_timeout.map(Deadlines::new);
        self.state.requests = self.config.request_timeout.map(Deadlines::new);
        self.state.budget = Budget::new(self.config.max_total_bytes / self.config.loops);
        // Started only once the workers run: a failure here is retried by
        // the next call rather than leaving a server that answers nothing.
        self.plugin.start_workers(self.config.threads)?;
        self.state.started = true;
        for stream in std::mem::take(&mut self.state.pending) {
            self.admit(stream, Instant::now());
        }
        log::info!("{}: serving", self.plugin.name());
        Ok(())
    }

    /// Whether `start` has run.
    pub fn started(&self) -> bool {
        self.state.started
    }

    /// After an internal error: closes every socket and refuses further
    /// replies, but frees no op, so buffers the plugin holds stay valid.
    /// The caller then leaks the loop.
    pub fn abandon(&mut self) {
        if let Some(handoff) = &self.state.handoff {
            handoff.close();
        }
        self.shared.completions.close();
        self.listeners.clear();
        for (_, c) in self.state.conns.iter_mut() {
            c.break_off("server stopped after an internal error");
        }
    }

    /// The epoll descriptor: readable whenever `step` has work.
    pub fn fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    /// How long until `step` must run even without readiness (timers).
    pub fn timeout(&self) -> Option<Duration> {
        self.poll_timeout(Instant::now())
    }

    /// One turn of the loop: waits up to `max_wait` (None: as long as the
    /// timers allow), handles what is ready, and returns true once shutdown
    /// has completed.
    pub fn step(&mut self, max_wait: Option<Duration>) -> io::Result<bool> {
        if self.state.finished {
            return Ok(true);
        }
        let mut timeout = match (self.poll_timeout(Instant::now()), max_wait) {
            (Some(t), Some(m)) => Some(t.min(m)),
            (t, m) => t.or(m),
        };
        if timeout != Some(Duration::ZERO) && !self.shared.completions.may_sleep() {
            timeout = Some(Duration::ZERO); // replies came in since the last drain
        }
        let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        let polled = self.poll.poll(&mut events, timeout);
        let result = match polled {
            Ok(()) => Ok(self.handle(&events)),
            Err(e) if interrupted(&e) => Ok(false),
            Err(e) => Err(e),
        };
        self.events = events;
        if result.as_ref().is_ok_and(|&done| done) {
            self.finish();
        } else if max_wait == Some(Duration::ZERO) && !self.shared.completions.may_sleep() {
            // Driven by a host loop, which now waits on our descriptor:
            // replies already queued must make it readable.
            self.shared.completions.wake();
        }
        result
    }

    /// Handles one batch of readiness events, then completions and timers.
    fn handle(&mut self, events: &Events) -> bool {
        #[cfg(test)]
        if tests::PANIC_WITH_OPS.load(Ordering::SeqCst) && self.state.ops.len() > 0 {
            panic!("injected by a test");
        }
        let now = Instant::now();
        if let Some(handoff) = self.state.handoff.clone() {
            for stream in handoff.take() {
                self.admit(stream, now);
            }
        }
        let mut touched = std::mem::take(&mut self.state.touched);
        touched.clear();
        touched.append(&mut self.state.again);
        for event in events.iter() {
            match event.token() {
                WAKER | SHUTDOWN => {}
                MioToken(t) if t < FIRST_CONN => self.accept(t - FIRST_LISTENER, now),
                MioToken(t) => {
                    let key = t - FIRST_CONN;
                    if let Some(c) = self.state.conns.get_mut(key) {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            c.readable(event.is_read_closed() || event.is_error());
                        }
                        if event.is_writable() || event.is_write_closed() || event.is_error() {
                            c.writable();
                        }
                        touched.push(key);
                    }
                }
            }
        }
        if self.state.accept_retry.is_some_and(|at| at <= now) {
            self.state.accept_retry = None;
            for i in 0..self.listeners.len() {
                self.accept(i, now);
            }
        }
        self.apply_completions(now, &mut touched);
        self.expire(now, &mut touched);
        if let Some((conn, at)) = self.exempt_stall_deadline() {
            if at <= now {
                // Its client stopped sending mid-WRITE: the next connection
                // gets the turn, and those the cap paused must hear of it.
                self.state.budget.release_exempt(conn);
                touched.append(&mut self.state.starved);
            }
        }
        // With no listener, the last client leaving ends the server (as
        // `nbdkit -s` does for its one client on stdin).
        let nothing_left = self.listeners.is_empty() && self.state.conns.is_empty() && !self.state.is_sibling;
        if self.state.stopping_since.is_none() && (self.shared.stop_requested() || nothing_left) {
            self.begin_shutdown(now);
            touched.extend(self.state.conns.iter().map(|(k, _)| k));
        }
        if self.state.budget.has_room() {
            // Memory was freed: connections starved by the global budget may read again.
            touched.append(&mut self.state.starved);
        }
        touched.sort_unstable();
        touched.dedup();
        for &key in &touched {
            self.service(key, now);
        }
        // Replies given inside the callbacks just run (a RAM disk, a cache
        // hit) go out now rather than after another trip through poll.
        touched.clear();
        self.apply_completions(now, &mut touched);
        touched.sort_unstable();
        touched.dedup();
        for &key in &touched {
            self.service(key, now);
        }
        self.state.touched = touched;
        if self.state.budget.has_room() && !self.state.ops.is_full() {
            // Replies just sent freed memory: paused connections read again
            // on the next turn, without waiting for an unrelated event.
            self.state.again.append(&mut self.state.starved);
        }
        if self.state.stopping_since.is_none()
            && self.listeners.is_empty()
            && self.state.conns.is_empty()
            && !self.state.is_sibling
        {
            self.begin_shutdown(now); // the last client just left
        }
        self.shutdown_complete(now)
    }

    /// After shutdown: refuse late replies and release idle connections.
    fn finish(&mut self) {
        self.state.finished = true;
        if let Some(handoff) = &self.state.handoff {
            handoff.close();
        }
        self.shared.completions.close();
        self.release_idle();
        log::info!("{}: stopped", self.plugin.name());
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        let s = &self.state;
        if !s.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next = [
            s.handshakes.as_ref().and_then(|h| h.next()),
            s.requests.as_ref().and_then(|r| r.next()),
            s.accept_retry,
            self.exempt_stall_deadline().map(|(_, at)| at),
        ]
        .into_iter()
        .flatten()
        .min();
        if s.stopping_since.is_some() {
            // Re-check grace and flush limits regularly while draining.
            next = Some(next.map_or(now + STOPPING_TICK, |n| n.min(now + STOPPING_TICK)));
        }
        next.map(|at| at.saturating_duration_since(now))
    }

    /// When the connection let past the memory budget counts as stalled:
    /// only while it sits on a half-received WRITE with nothing dispatched.
    fn exempt_stall_deadline(&self) -> Option<(ConnId, Instant)> {
        let ((key, serial), since) = self.state.budget.exempt()?;
        let c = self.state.conns.get(key).filter(|c| c.serial == serial)?;
        (c.receiving() && c.dispatched_bytes() == 0).then_some(((key, serial), since + EXEMPT_STALL))
    }

    /// Runs `f` on connection `key` with a context, keeping the global
    /// memory meter in step with what the connection holds.
    fn with_conn<R>(&mut self, key: usize, now: Instant, f: impl FnOnce(&mut Connection, &mut Ctx) -> R) -> Option<R> {
        let s = &mut self.state;
        let conn = s.conns.get_mut(key)?;
        let before = conn.held_total();
        s.budget.enter(before);
        let mut ctx = Ctx {
            plugin: &*self.plugin,
            config: &self.config,
            ops: &mut s.ops,
            stats: &self.shared.stats,
            buffers: &mut s.buffers,
            timeouts: s.requests.as_mut(),
            now,
            budget: &mut s.budget,
        };
        let r = crate::logging::in_connection(conn.serial, || {
            let r = f(conn, &mut ctx);
            if let Some(interest) = conn.interest_change() {
                let stream = conn.stream_mut().expect("interest changes only with a socket");
                if let Err(e) = self.poll.registry().reregister(stream, MioToken(FIRST_CONN + key), interest) {
                    conn.break_off(&format!("cannot change its poll interest: {}", crate::errno::Describe(&e)));
                }
            }
            r
        });
        for buf in conn.spent_buffers() {
            s.buffers.give(buf);
        }
        let idle = conn.dispatched_bytes() == 0 && !conn.receiving();
        if s.budget.leave((key, conn.serial), conn.held_total(), idle) {
            s.again.append(&mut s.starved); // the turn past the cap is free
        }
        Some(r)
    }

    fn accept(&mut self, index: usize, now: Instant) {
        loop {
            let Some(listener) = self.listeners.get(index) else { return };
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) || e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of descriptors or memory: the client waits in the
                    // backlog; try again soon, as no new edge may come.
                    log::warn!("accept failed: {}; retrying shortly", crate::errno::Describe(&e));
                    self.state.accept_retry = Some(now + ACCEPT_RETRY);
                    return;
                }
            };
            // With several loops, connections go round-robin; each stays
            // on the loop it is given for its whole life.
            let turn = self.state.next_loop;
            self.state.next_loop = (turn + 1) % (self.state.siblings.len() + 1);
            let handed = match turn.checked_sub(1).and_then(|i| self.state.siblings.get(i)) {
                Some(sibling) => sibling.give(stream),
                None => Err(stream),
            };
            if let Err(stream) = handed {
                self.admit(stream, now); // its turn, or its loop has ended
            }
        }
    }

    /// Serves a client the server did not accept itself (socket activation
    /// of a single connection, stdin): it is admitted when the loop starts.
    pub fn add_connection(&mut self, stream: Stream) {
        self.state.pending.push(stream);
    }

    /// Takes a new client in: registered, counted, greeted unless it must wait.
    fn admit(&mut self, stream: Stream, now: Instant) {
        if self.state.stopping_since.is_some() {
            log::debug!("a client handed over while this loop stops; closed");
            return;
        }
        stream.grow_send_buffer(SEND_BUFFER);
        let s = &mut self.state;
        let open = self.shared.stats.connections.load(Ordering::Relaxed) as usize;
        if self.config.max_connections != 0 && open >= self.config.max_connections {
            log::warn!("refusing a client: {} connections is the limit", self.config.max_connections);
            return;
        }
        {
            let key = s.conns.vacant_key();
            let serial = s.next_serial;
            s.next_serial += self.config.loops as u64; // loops number theirs apart
            // SERIALIZE_CONNECTIONS: later clients wait, ungreeted, for their turn.
            let wait = self.plugin.serializes_connections() && !s.conns.is_empty();
            let mut conn = crate::logging::in_connection(serial, || {
                Connection::new(key, serial, stream, wait, self.config.tls_mode)
            });
            let stream = conn.stream_mut().expect("new connection");
            // Writable events are asked for while a write is blocked only.
            if let Err(e) = self.poll.registry().register(stream, MioToken(FIRST_CONN + key), Interest::READABLE) {
                log::warn!("cannot register a new connection: {}", crate::errno::Describe(&e));
                return;
            }
            s.budget.add(conn.held_total());
            s.conns.insert(conn);
            self.shared.stats.connected();
            if wait {
                s.waiting.push_back((key, serial));
                return;
            }
            if let Some(h) = s.handshakes.as_mut() {
                h.arm(now, (key, serial));
            }
            s.again.push(key);
        }
    }

    fn apply_completions(&mut self, now: Instant, touched: &mut Vec<usize>) {
        let mut completed = std::mem::take(&mut self.state.completed);
        self.shared.completions.drain_into(&mut completed);
        for Completion { token, outcome } in completed.drain(..) {
            let Some(op) = self.state.ops.get(token) else {
                match self.state.ops.retired(token) {
                    Some(op) => log::warn!("second reply to {op} (the op was already answered); ignored"),
                    None => log::warn!("reply with an unknown op handle (made up, or answered long ago); ignored"),
                }
                continue;
            };
            let key = op.conn;
            self.with_conn(key, now, |c, ctx| c.complete(token, outcome, ctx));
            touched.push(key);
        }
        self.state.completed = completed;
    }

    /// Handshakes that took too long are dropped; requests the plugin sat
    /// on too long are answered with an error.
    fn expire(&mut self, now: Instant, touched: &mut Vec<usize>) {
        while let Some((key, serial)) = self.state.handshakes.as_mut().and_then(|h| h.pop_expired(now)) {
            let expired = self.state.conns.get(key).is_some_and(|c| c.serial == serial && !c.in_transmission());
            if expired {
                self.with_conn(key, now, |c, _| c.break_off("handshake timed out"));
                touched.push(key);
            }
        }
        let timeout = self.config.request_timeout.unwrap_or_default();
        while let Some(token) = self.state.requests.as_mut().and_then(|r| r.pop_expired(now)) {
            let Some(op) = self.state.ops.get(token) else { continue };
            let key = op.conn;
            self.with_conn(key, now, |c, ctx| c.time_out(token, timeout, ctx));
            touched.push(key);
        }
    }

    fn service(&mut self, key: usize, now: Instant) {
        let Some((next, finished)) = self.with_conn(key, now, |c, ctx| {
            let mut next = c.service(ctx);
            let held = c.held_total();
            c.flush();
            if next == Next::Wait && c.held_total() < held && c.has_input_to_take() {
                // Replies just went out without the socket blocking: a
                // connection its byte cap paused may read again, and no
                // event would come to say so.
                next = Next::Again;
            }
            c.let_go_if_done();
            if c.client_gone() {
                c.cancel_ops(ctx);
            }
            (next, c.finished())
        }) else {
            return;
        };
        let s = &mut self.state;
        match next {
            Next::Again => s.again.push(key),
            Next::Starved => s.starved.push(key),
            Next::Wait => {}
        }
        if finished {
            let mut conn = s.conns.remove(key);
            if s.budget.remove((key, conn.serial), conn.held_total()) {
                s.again.append(&mut s.starved);
            }
            self.shared.stats.disconnected();
            if let Some(stream) = conn.stream_mut() {
                let _ = self.poll.registry().deregister(stream);
            }
            conn.close(&*self.plugin);
            crate::logging::in_connection(conn.serial, || log::debug!("connection finished"));
            self.greet_next_waiting(now);
        }
    }

    /// SERIALIZE_CONNECTIONS: the server is free, greet the longest-waiting client.
    fn greet_next_waiting(&mut self, now: Instant) {
        let s = &mut self.state;
        while let Some((key, serial)) = s.waiting.pop_front() {
            let Some(c) = s.conns.get_mut(key).filter(|c| c.serial == serial) else { continue };
            c.greet();
            s.budget.add(c.held_total());
            if let Some(h) = s.handshakes.as_mut() {
                h.arm(now, (key, serial));
            }
            s.again.push(key);
            return;
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        log::info!("{}: shutting down, {} ops in flight", self.plugin.name(), self.state.ops.len());
        self.state.stopping_since = Some(now);
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(l.source());
        }
        let keys: Vec<usize> = self.state.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.with_conn(key, now, |c, ctx| {
                c.stop_reading();
                c.cancel_ops(ctx);
            });
        }
    }

    /// While stopping: once every op is answered (by the plugin, or with
    /// ESHUTDOWN after the grace period) and replies are out (or the flush
    /// limit passed), the loop may end.
    fn shutdown_complete(&mut self, now: Instant) -> bool {
        let Some(since) = self.state.stopping_since else { return false };
        if let Some(grace) = self.config.shutdown_grace {
            if !self.state.grace_expired && now >= since + grace && self.unanswered() > 0 {
                log::warn!(
                    "{}: {} ops unanswered after the grace period; answering ESHUTDOWN",
                    self.plugin.name(),
                    self.unanswered()
                );
                self.state.grace_expired = true;
                let why = format!("no reply from the plugin within the {} ms shutdown grace", grace.as_millis());
                let keys: Vec<usize> = self.state.conns.iter().map(|(k, _)| k).collect();
                for key in keys {
                    self.with_conn(key, now, |c, ctx| {
                        c.answer_all_early(libc::ESHUTDOWN, &why, ctx);
                        c.flush();
                    });
                }
            }
        }
        // Ops whose clients were answered already (timed out) hold nobody up.
        let answered = self.unanswered() == 0 || self.state.grace_expired;
        let flushed = self.state.conns.iter().all(|(_, c)| c.output_done());
        answered && (flushed || now >= since + SHUTDOWN_FLUSH_TIMEOUT)
    }

    /// Ops whose clients still wait for an answer.
    fn unanswered(&self) -> usize {
        self.state.conns.iter().map(|(_, c)| c.unanswered()).sum()
    }

    /// Closes every connection with nothing in flight. Connections whose
    /// ops the plugin still holds keep their handle until the server is freed.
    fn release_idle(&mut self) {
        let s = &mut self.state;
        let idle: Vec<usize> = s.conns.iter().filter(|(_, c)| c.inflight == 0).map(|(k, _)| k).collect();
        for key in idle {
            s.conns.remove(key).close(&*self.plugin);
        }
        for (_, c) in s.conns.iter_mut() {
            c.break_off("server stopped");
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        // Ops the plugin never answered die with the server: their buffers
        // are freed and their handles closed. The host must have stopped
        // touching them (joined its workers) before freeing the server.
        // Library-owned workers finish the callbacks they are in first.
        self.plugin.stop_workers();
        if self.state.ops.len() > 0 {
            log::warn!("{}: freeing {} ops the plugin never answered", self.plugin.name(), self.state.ops.len());
        }
        for (_, c) in self.state.conns.iter_mut() {
            c.close(&*self.plugin);
        }
    }
}

/// Loop state; it outlives `run` while the plugin still holds ops.
#[derive(Default)]
struct LoopState {
    conns: Slab<Connection>,
    ops: OpTable<Op>,
    next_serial: u64,
    /// Connections to service on the next turn without waiting for an event.
    again: Vec<usize>,
    /// Connections paused by the global memory budget.
    starved: Vec<usize>,
    completed: Vec<Completion>,
    /// Memory held by all connections, against the total cap.
    budget: Budget,
    handshakes: Option<Deadlines<(usize, u64)>>,
    requests: Option<Deadlines<Token>>,
    accept_retry: Option<Instant>,
    /// Connections not yet greeted (SERIALIZE_CONNECTIONS), oldest first.
    waiting: VecDeque<(usize, u64)>,
    stopping_since: Option<Instant>,
    grace_expired: bool,
    started: bool,
    finished: bool,
    /// Reused from one turn to the next.
    touched: Vec<usize>,
    buffers: BufferPool,
    /// Clients handed over before the loop started.
    pending: Vec<Stream>,
    /// The server's other loops (on the first loop), and whose turn the
    /// next connection is (0: this loop).
    siblings: Vec<Arc<Handoff>>,
    next_loop: usize,
    /// On another loop: where its connections come from. It has no
    /// listener, yet runs until the server stops.
    handoff: Option<Arc<Handoff>>,
    is_sibling: bool,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicBool;

    /// Makes the next loop turn with an op in flight panic.
    pub(crate) static PANIC_WITH_OPS: AtomicBool = AtomicBool::new(false);
}
