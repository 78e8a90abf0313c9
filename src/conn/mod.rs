//! One client connection: handshake, request dispatch, replies, teardown.
//!
//! The connection owns its socket and buffers; ops it starts live in the
//! server-wide [`OpTable`] and point back at it by slab key and serial, so
//! a connection is torn down only once its last op is answered.

mod output;
pub mod stream;
pub mod transport;

use std::io;
use std::sync::Arc;
use std::time::Instant;

use crate::buffers::BufferPool;
use crate::completion::{OpTable, Outcome, Retire, Token};
use crate::config::Config;
use crate::deadlines::Deadlines;
use crate::errno::{Describe, Errno};
use crate::ffi::plugin::{
    NBDKIT_EXTENT_ZERO, NBDKIT_FLAG_FAST_ZERO, NBDKIT_FLAG_FUA, NBDKIT_FLAG_MAY_TRIM, NBDKIT_FLAG_REQ_ONE,
};
use crate::plugin::{Handle, Io, Plugin, Started};
use crate::protocol::codec::{self, ReplyHeader, RequestHeader};
use crate::protocol::consts::*;
use crate::protocol::handshake::{
    ExportInfo, ExportResolver, Handshake, Outcome as HsOutcome, Purpose, Refusal, TlsMode,
};
use crate::protocol::transmission::{Event, ExportCaps, FuaMode, Request, RequestReader};
use crate::stats::Stats;
use output::Output;
use stream::{Stream, interrupted, would_block};
use transport::Transport;

/// Size of the per-connection read buffer.
const INPUT_BUFFER: usize = 64 * 1024;
/// Bytes read from one connection before others get a turn.
const READ_BUDGET: usize = 1024 * 1024;
/// Read buffers handed out on one connection before others get a turn:
/// replies then reach the socket, and a client that does not read them
/// is noticed (see `MAX_UNSENT`) before it has pinned much memory.
const TURN_READ_BYTES: usize = 4 * 1024 * 1024;
/// Unsent reply bytes past which a connection takes no new request until
/// they are written: a client must read its replies to send more.
const MAX_UNSENT: usize = 4 * 1024 * 1024;

/// An NBD request handed to the plugin and not yet answered.
pub struct Op {
    pub conn: usize,
    pub conn_serial: u64,
    cookie: u64,
    cmd: u16,
    /// The client's NBD_CMD_FLAG_* (they shape which errors it may see).
    flags: u16,
    offset: u64,
    count: u32,
    /// Read buffer or write payload; owned here until the reply is sent.
    buf: Vec<u8>,
    /// A successful write must still be flushed before the reply (emulated FUA).
    flush_after: bool,
    /// The client was already answered (timeout or shutdown); the plugin's
    /// reply, when it comes, only releases the op.
    pub answered: bool,
    /// The plugin was told, through its `cancel` callback.
    cancelled: bool,
    started: Instant,
}

/// What the log says of an op answered twice.
#[derive(Debug, Clone, Copy)]
pub struct OpSummary {
    pub conn: u64,
    pub cmd: u16,
    pub offset: u64,
}

impl Retire for Op {
    type Summary = OpSummary;
    fn summary(&self) -> OpSummary {
        OpSummary { conn: self.conn_serial, cmd: self.cmd, offset: self.offset }
    }
}

impl std::fmt::Display for OpSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at offset {} on conn {}", cmd_name(self.cmd), self.offset, self.conn)
    }
}

impl Op {
    fn held_bytes(&self) -> usize {
        self.buf.len()
    }

    fn header(&self) -> RequestHeader {
        RequestHeader { flags: self.flags, cmd: self.cmd, cookie: self.cookie, offset: self.offset, length: self.count }
    }
}

/// State the loop lends to a connection while it works.
pub struct Ctx<'a> {
    pub plugin: &'a Plugin,
    pub config: &'a Config,
    pub ops: &'a mut OpTable<Op>,
    pub stats: &'a Stats,
    pub buffers: &'a mut BufferPool,
    /// Per-request deadlines, when a request timeout is set.
    pub timeouts: Option<&'a mut Deadlines<Token>>,
    pub now: Instant,
    /// Bytes the other connections hold, for the global budget.
    pub others_bytes: usize,
    /// The one connection allowed to read past the global budget, so that
    /// clients pinning memory cannot starve the rest (see `paused`), and
    /// since when.
    pub exempt: &'a mut Option<(usize, u64, Instant)>,
}

impl Ctx<'_> {
    fn arm_timeout(&mut self, token: Token) {
        if let Some(t) = self.timeouts.as_mut() {
            t.arm(self.now, token);
        }
    }
}

enum Phase {
    /// Accepted but not yet greeted: another connection holds the server
    /// (thread model SERIALIZE_CONNECTIONS).
    Waiting,
    Handshake(Handshake),
    Transmission(RequestReader),
}

/// What the loop should do with a connection after servicing it.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait for socket readiness or completions.
    Wait,
    /// There is more to read right now: service again without waiting.
    Again,
    /// Paused by the global memory budget: service again once memory is freed.
    Starved,
}

pub struct Connection {
    pub key: usize,
    pub serial: u64,
    /// `None` once the socket is closed; the struct lives on until `inflight` is 0.
    stream: Option<Transport>,
    peer: String,
    phase: Phase,
    input: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    output: Output,
    handle: Option<Handle>,
    caps: Option<ExportCaps>,
    /// Ops started and not yet released by the plugin.
    pub inflight: usize,
    /// Of those, ops whose client was answered without the plugin
    /// (timeout, shutdown grace): they hold only their buffers.
    answered_early: usize,
    /// Read buffer bytes handed out in this service turn.
    turn_read_bytes: usize,
    /// Bytes held by this connection's ops (payloads and read buffers).
    held_bytes: usize,
    /// No more requests will be read (DISC, EOF, fatal error or shutdown).
    reading_done: bool,
    /// The socket is known empty (EAGAIN, or a short plain read): wait for
    /// a readable event.
    read_blocked: bool,
    /// The peer hung up: its end of stream raises no further edge, so
    /// reads go on until they see it.
    peer_closed: bool,
    /// The last write hit EAGAIN: wait for a writable event.
    write_blocked: bool,
    /// The plugin was told the client is gone (cancel callbacks sent).
    cancel_sent: bool,
    tls_mode: TlsMode,
    /// STARTTLS was acknowledged: once the ACK is out, switch to TLS with
    /// this config, feeding it the ciphertext already read.
    tls_pending: Option<(Arc<rustls::ServerConfig>, Vec<u8>)>,
}

impl Connection {
    /// A new connection; unless it must `wait` for its turn, the greeting
    /// is queued at once.
    pub fn new(key: usize, serial: u64, stream: Stream, wait: bool, tls_mode: TlsMode) -> Self {
        let peer = stream.peer();
        log::debug!("new connection from {peer}{}", if wait { ", waiting for its turn" } else { "" });
        let mut c = Connection {
            key,
            serial,
            stream: Some(Transport::new(stream)),
            peer,
            phase: Phase::Waiting,
            input: vec![0; INPUT_BUFFER].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            output: Output::default(),
            handle: None,
            caps: None,
            inflight: 0,
            answered_early: 0,
            turn_read_bytes: 0,
            held_bytes: 0,
            reading_done: false,
            read_blocked: false,
            peer_closed: false,
            write_blocked: false,
            cancel_sent: false,
            tls_mode,
            tls_pending: None,
        };
        if !wait {
            c.greet();
        }
        c
    }

    /// Starts the handshake of a connection that was waiting.
    pub fn greet(&mut self) {
        let mut greeting = Vec::new();
        self.phase = Phase::Handshake(Handshake::new(&mut greeting, self.tls_mode));
        self.output.push_bytes(greeting);
    }

    pub fn stream_mut(&mut self) -> Option<&mut Transport> {
        self.stream.as_mut()
    }

    pub fn in_transmission(&self) -> bool {
        matches!(self.phase, Phase::Transmission(_))
    }

    /// True once the connection can be dropped: no socket work left and no
    /// op that could still reply into it.
    pub fn finished(&self) -> bool {
        self.inflight == 0 && (self.stream.is_none() || (self.reading_done && self.output.is_empty()))
    }

    /// Closes the socket now; ops still in flight are answered into the
    /// void. What stays is what the plugin may still touch: its handle and
    /// the buffers of its ops.
    pub fn break_off(&mut self, why: &str) {
        if self.stream.take().is_some() {
            log::debug!("closed ({}): {why}", self.peer);
        }
        self.reading_done = true;
        self.output = Output::default(); // unsent replies have nowhere to go
        self.input = Box::default();
        self.in_start = 0;
        self.in_end = 0;
    }

    /// Ops whose client is still waiting for an answer.
    pub fn unanswered(&self) -> usize {
        self.inflight - self.answered_early
    }

    /// Lets a client go that is done (NBD_CMD_DISC or shutdown, every reply
    /// sent) while the plugin still holds ops its client was already
    /// answered for: nothing it waits for can come any more.
    pub fn let_go_if_done(&mut self) {
        if self.stream.is_some()
            && self.reading_done
            && self.output.is_empty()
            && self.inflight > 0
            && self.unanswered() == 0
        {
            let held = self.inflight;
            self.break_off(&format!("client done; the plugin still holds {held} ops answered without it"));
        }
    }

    /// Stops reading requests; what is in flight still gets its replies.
    /// A client still negotiating gets NBD_REP_ERR_SHUTDOWN for its next option.
    pub fn stop_reading(&mut self) {
        match &mut self.phase {
            Phase::Handshake(hs) => hs.shutting_down(),
            Phase::Transmission(_) => self.reading_done = true,
            Phase::Waiting => self.break_off("server shutting down"),
        }
    }

    /// Releases the plugin handle. Called by the loop when `finished()`.
    pub fn close(&mut self, plugin: &Plugin) {
        if let Some(h) = self.handle.take() {
            plugin.close(h);
        }
        self.stream = None;
    }

    /// Requests may be waiting: buffered, or in a socket not known empty.
    pub fn has_input_to_take(&self) -> bool {
        self.stream.is_some() && !self.reading_done && (self.in_start < self.in_end || !self.read_blocked)
    }

    /// A readable event; `closed` when it also says the peer hung up.
    pub fn readable(&mut self, closed: bool) {
        self.read_blocked = false;
        self.peer_closed |= closed;
    }

    pub fn writable(&mut self) {
        self.write_blocked = false;
    }

    /// Bytes this connection holds: op buffers plus unsent replies.
    pub fn held_total(&self) -> usize {
        self.plugin_held() + self.output.bytes
    }

    /// Buffers this connection is done with, for reuse.
    pub fn spent_buffers(&mut self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.output.take_spent()
    }

    /// Bytes of requests handed to the plugin and not yet answered.
    pub fn dispatched_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Bytes held for requests not yet answered: op buffers and a WRITE
    /// payload being received.
    pub fn plugin_held(&self) -> usize {
        let receiving = match &self.phase {
            Phase::Transmission(reader) => reader.payload_buffered(),
            _ => 0,
        };
        self.held_bytes + receiving
    }

    /// True when the client can no longer receive replies.
    pub fn client_gone(&self) -> bool {
        self.stream.is_none()
    }

    /// Every reply queued so far has been sent (or can never be).
    pub fn output_done(&self) -> bool {
        self.stream.is_none() || self.output.is_empty()
    }

    /// Whether to stop reading requests for now, and why.
    fn paused(&self, ctx: &mut Ctx) -> Option<Next> {
        match &self.phase {
            // The handshake holds little (one bounded option) and must not
            // wait on clients it has nothing to do with.
            Phase::Handshake(_) | Phase::Waiting => return None,
            // A payload is received to the end: pausing it halfway could
            // leave every connection waiting on memory only they would free.
            // Only the pages the client's bytes filled are resident.
            Phase::Transmission(reader) if reader.receiving_payload() => return None,
            Phase::Transmission(_) => {}
        }
        let held = self.held_total();
        if self.inflight >= ctx.config.max_inflight || held >= ctx.config.max_connection_bytes {
            return Some(Next::Wait); // replies going out will wake us
        }
        if self.output.bytes >= MAX_UNSENT {
            // Written out after this turn; the loop services us again if
            // the socket took them, else the writable event will.
            return Some(Next::Wait);
        }
        if self.turn_read_bytes >= TURN_READ_BYTES {
            return Some(Next::Again);
        }
        if self.write_blocked {
            // The client reads its replies slower than it sends requests:
            // take no more until it catches up, as a threaded server
            // blocked in send would. Requests it holds meanwhile cost us
            // nothing, and clients that walk a list of their commands in
            // flight for every reply (libnbd) walk shorter lists.
            return Some(Next::Wait); // the writable event will wake us
        }
        if ctx.ops.is_full() {
            return Some(Next::Starved);
        }
        if ctx.others_bytes + held < ctx.config.max_total_bytes {
            return None;
        }
        // Over the global budget. Clients that never read their replies
        // could pin it for good, so one connection at a time that holds
        // nothing may still read a request: the budget is overshot by at
        // most one request, and nobody starves.
        let me = (self.key, self.serial);
        match *ctx.exempt {
            None if held == 0 => *ctx.exempt = Some((me.0, me.1, ctx.now)),
            Some((k, s, _)) if (k, s) == me && held == 0 => {}
            _ => return Some(Next::Starved),
        }
        None
    }

    /// True while a WRITE payload is coming in.
    pub fn receiving(&self) -> bool {
        matches!(&self.phase, Phase::Transmission(r) if r.receiving_payload())
    }

    /// Reads and handles as much input as the budget and back-pressure allow.
    pub fn service(&mut self, ctx: &mut Ctx) -> Next {
        let mut budget = READ_BUDGET;
        self.turn_read_bytes = 0;
        loop {
            if self.reading_done
                || self.stream.is_none()
                || self.tls_pending.is_some()
                || matches!(self.phase, Phase::Waiting)
            {
                return Next::Wait;
            }
            if let Some(next) = self.paused(ctx) {
                return next;
            }
            if self.in_start < self.in_end {
                self.consume_input(ctx);
                continue;
            }
            if self.read_blocked {
                return Next::Wait;
            }
            if budget == 0 {
                return Next::Again;
            }
            match self.read_some(ctx) {
                Ok(0) => {
                    // A client that wanted its replies would have sent
                    // NBD_CMD_DISC and waited; EOF means it is gone.
                    self.break_off("client closed the connection");
                }
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if would_block(&e) => self.read_blocked = true,
                Err(e) if interrupted(&e) => {}
                Err(e) => self.break_off(&format!("read error: {}", Describe(&e))),
            }
        }
    }

    /// One read: straight into a WRITE payload when one is pending and
    /// the input buffer is empty, else into the input buffer.
    ///
    /// A short read of a plain socket means its queue is empty: it is
    /// marked blocked at once instead of paying one more read for EAGAIN.
    /// mio's epoll is edge-triggered and every new arrival raises a fresh
    /// edge, so nothing is missed; but a hang-up already reported raises
    /// none, so after one, reads go on to the end of stream. (TLS may hold
    /// decrypted bytes back, so there only EAGAIN counts.)
    fn read_some(&mut self, ctx: &mut Ctx) -> io::Result<usize> {
        let stream = self.stream.as_mut().expect("checked by caller");
        let plain = !stream.is_tls() && !self.peer_closed;
        if let Phase::Transmission(reader) = &mut self.phase {
            if let Some(space) = reader.payload_space() {
                if space.len() >= INPUT_BUFFER / 2 {
                    let asked = space.len();
                    let n = stream.read(space)?;
                    self.read_blocked = plain && n > 0 && n < asked;
                    if n > 0 {
                        if let Some(event) = reader.payload_filled(n) {
                            self.on_event(event, ctx);
                        }
                    }
                    return Ok(n);
                }
            }
        }
        self.in_start = 0;
        self.in_end = 0;
        let n = stream.read(&mut self.input)?;
        self.in_end = n;
        self.read_blocked = plain && n > 0 && n < self.input.len();
        Ok(n)
    }

    fn consume_input(&mut self, ctx: &mut Ctx) {
        let input = &self.input[self.in_start..self.in_end];
        match &mut self.phase {
            Phase::Waiting => {}
            Phase::Handshake(hs) => {
                let mut out = Vec::new();
                let peer_certificate = self.stream.as_ref().and_then(|t| t.peer_certificate());
                let mut resolver = Resolver {
                    ctx,
                    handle: &mut self.handle,
                    caps: &mut self.caps,
                    peer_certificate: peer_certificate.as_deref(),
                };
                let (used, outcome) = hs.feed(input, &mut out, &mut resolver);
                self.in_start += used;
                self.output.push_bytes(out);
                match outcome {
                    HsOutcome::NeedMore => {}
                    HsOutcome::StartTls => {
                        let config = ctx.config.tls.clone().expect("STARTTLS is only accepted with TLS configured");
                        let early = self.input[self.in_start..self.in_end].to_vec();
                        self.in_start = self.in_end;
                        self.tls_pending = Some((config, early));
                        log::debug!("starting TLS");
                        self.flush();
                    }
                    HsOutcome::Done(negotiated) => {
                        let mut caps = self.caps.expect("set by resolve");
                        caps.structured_replies = negotiated.structured_replies;
                        caps.extended_headers = negotiated.extended_headers;
                        caps.base_allocation = negotiated.contexts.contains(&CONTEXT_BASE_ALLOCATION_ID);
                        self.caps = Some(caps);
                        log::debug!(
                            "export {:?} size {} flags {:#x}{}",
                            negotiated.export.name,
                            caps.size,
                            negotiated.export.flags,
                            if caps.extended_headers {
                                ", extended headers"
                            } else if caps.structured_replies {
                                ", structured replies"
                            } else {
                                ""
                            }
                        );
                        self.phase = Phase::Transmission(RequestReader::new(caps));
                    }
                    HsOutcome::Close(why) => {
                        log::debug!("handshake ended: {why}");
                        self.reading_done = true;
                        self.in_start = self.in_end;
                    }
                }
            }
            Phase::Transmission(reader) => {
                let (used, event) = reader.feed(input);
                self.in_start += used;
                if let Some(event) = event {
                    self.on_event(event, ctx);
                }
            }
        }
    }

    fn on_event(&mut self, event: Event, ctx: &mut Ctx) {
        match event {
            Event::Request(req) => self.dispatch(req, ctx),
            Event::Reject { header, error } => {
                ctx.stats.rejected(header.cmd);
                log::debug!("{} cookie {:#x} rejected: {}", cmd_name(header.cmd), header.cookie, Errno(error as i32));
                self.queue_error(&header, error);
            }
            Event::Disconnect => {
                ctx.stats.count(CMD_DISC);
                log::debug!("NBD_CMD_DISC");
                self.reading_done = true;
                self.in_start = self.in_end;
            }
            Event::Fatal(why) => self.break_off(why),
        }
    }

    fn dispatch(&mut self, req: Request, ctx: &mut Ctx) {
        let h = req.header;
        let caps = self.caps.expect("transmission implies caps");
        let (io, mut flags) = match h.cmd {
            CMD_READ => (Io::Read, 0),
            CMD_WRITE => (Io::Write, 0),
            CMD_FLUSH => (Io::Flush, 0),
            CMD_TRIM => (Io::Trim, 0),
            CMD_WRITE_ZEROES if h.flags & CMD_FLAG_NO_HOLE != 0 => (Io::Zero, 0),
            CMD_WRITE_ZEROES => (Io::Zero, NBDKIT_FLAG_MAY_TRIM),
            CMD_CACHE => (Io::Cache, 0),
            CMD_BLOCK_STATUS => (Io::Extents, 0),
            _ => unreachable!("validated"),
        };
        if h.flags & CMD_FLAG_REQ_ONE != 0 {
            flags |= NBDKIT_FLAG_REQ_ONE;
        }
        if h.flags & CMD_FLAG_FAST_ZERO != 0 {
            flags |= NBDKIT_FLAG_FAST_ZERO;
        }
        let fua = h.flags & CMD_FLAG_FUA != 0 && matches!(io, Io::Write | Io::Trim | Io::Zero);
        if fua && caps.fua == FuaMode::Native {
            flags |= NBDKIT_FLAG_FUA;
        }
        let buf = if io == Io::Read {
            self.turn_read_bytes += h.length as usize;
            ctx.buffers.take(h.length as usize)
        } else {
            req.payload
        };
        let op = Op {
            conn: self.key,
            conn_serial: self.serial,
            cookie: h.cookie,
            cmd: h.cmd,
            flags: h.flags,
            offset: h.offset,
            count: h.length,
            buf,
            flush_after: fua && caps.fua == FuaMode::Emulate,
            answered: false,
            cancelled: false,
            started: ctx.now,
        };
        ctx.stats.started(h.cmd, if io == Io::Write { h.length as usize } else { 0 });
        let held = op.held_bytes();
        let token = ctx.ops.insert(op).expect("paused() keeps the table from filling");
        self.inflight += 1;
        self.held_bytes += held;
        let handle = self.handle.expect("transmission implies a handle");
        let op = ctx.ops.get(token).expect("just inserted");
        let started = ctx.plugin.start(io, token, self.serial, handle, &mut op.buf, h.length, h.offset, flags);
        self.on_started(token, started, ctx);
    }

    /// Acts on what an I/O callback returned for `token`.
    fn on_started(&mut self, token: Token, started: Started, ctx: &mut Ctx) {
        match started {
            Started::Taken => ctx.arm_timeout(token),
            Started::Failed(errno) => {
                let op = ctx.ops.remove(token).expect("live op");
                self.finish(op, Outcome::Error(errno), ctx.stats);
            }
            Started::Misuse(status) => {
                let why = format!("the callback returned {status}, which is neither 0 nor negative (plugin bug)");
                log::error!("{why}; the op stays held until the plugin replies");
                self.answer_early(token, libc::EIO, &why, ctx);
            }
        }
    }

    /// Answers a finished op: emulated FUA first, then the reply.
    pub fn complete(&mut self, token: Token, outcome: Outcome, ctx: &mut Ctx) {
        let op = ctx.ops.get(token).expect("caller looked it up");
        if op.answered {
            log::debug!(
                "{} at offset {}: late reply after the client was answered; ignored",
                cmd_name(op.cmd),
                op.offset
            );
            let op = ctx.ops.remove(token).expect("live op");
            self.release(&op, ctx.stats);
            return;
        }
        if op.flush_after && outcome == Outcome::Done {
            op.flush_after = false;
            let new_token = ctx.ops.renew(token).expect("live op");
            let handle = self.handle.expect("ops imply a handle");
            log::trace!("emulating FUA with a flush");
            let started = ctx.plugin.start(Io::Flush, new_token, self.serial, handle, &mut [], 0, 0, 0);
            self.on_started(new_token, started, ctx);
            return;
        }
        let op = ctx.ops.remove(token).expect("caller looked it up");
        self.finish(op, outcome, ctx.stats);
    }

    /// Answers the client now with `errno` while the plugin still holds the
    /// op (request timeout, shutdown grace, a callback's bad return value).
    /// The op stays in the table, its buffer alive, until the plugin's own
    /// reply releases it.
    pub fn answer_early(&mut self, token: Token, errno: i32, why: &str, ctx: &mut Ctx) {
        let Some(op) = ctx.ops.get(token) else { return };
        if op.answered {
            return;
        }
        op.answered = true;
        self.answered_early += 1;
        ctx.stats.replied(0, true, op.started.elapsed());
        log::warn!("{} at offset {}: {why}; answering {}", cmd_name(op.cmd), op.offset, Errno(errno));
        let header = op.header();
        if self.stream.is_some() {
            self.queue_error(&header, nbd_errno(errno, op.flags));
        }
    }

    /// [`Self::answer_early`] for every op of this connection.
    pub fn answer_all_early(&mut self, errno: i32, why: &str, ctx: &mut Ctx) {
        let mine: Vec<Token> = ctx.ops.iter().filter(|(_, op)| op.conn == self.key).map(|(t, _)| t).collect();
        for token in mine {
            self.answer_early(token, errno, why, ctx);
        }
    }

    /// The plugin took too long with `token`: its client is answered
    /// ETIMEDOUT, and the plugin told through `cancel` so that it can
    /// abort the work (it must still reply).
    pub fn time_out(&mut self, token: Token, timeout: std::time::Duration, ctx: &mut Ctx) {
        let why = format!("no reply from the plugin in time ({} ms request timeout)", timeout.as_millis());
        self.answer_early(token, libc::ETIMEDOUT, &why, ctx);
        self.cancel_op(token, ctx);
    }

    /// Calls the plugin's `cancel` for one op, at most once per op.
    fn cancel_op(&mut self, token: Token, ctx: &mut Ctx) {
        let Some(handle) = self.handle else { return };
        let Some(op) = ctx.ops.get(token).filter(|op| !op.cancelled) else { return };
        op.cancelled = true;
        ctx.plugin.cancel(token, handle);
    }

    /// Tells the plugin, once, that this connection's ops are no longer
    /// wanted (client gone or server stopping). They must still be replied.
    pub fn cancel_ops(&mut self, ctx: &mut Ctx) {
        if self.cancel_sent || self.inflight == 0 {
            return;
        }
        self.cancel_sent = true;
        let mine: Vec<Token> =
            ctx.ops.iter().filter(|(_, op)| op.conn == self.key && !op.cancelled).map(|(t, _)| t).collect();
        log::debug!("cancelling {} ops", mine.len());
        for token in mine {
            self.cancel_op(token, ctx);
        }
    }

    /// Forgets an op: it no longer counts against this connection.
    fn release(&mut self, op: &Op, stats: &Stats) {
        stats.released();
        self.inflight -= 1;
        if op.answered {
            self.answered_early -= 1;
        }
        self.held_bytes -= op.held_bytes();
    }

    fn finish(&mut self, mut op: Op, outcome: Outcome, stats: &Stats) {
        self.release(&op, stats);
        if self.stream.is_none() {
            log::debug!("{} at offset {}: reply after the client left; dropped", cmd_name(op.cmd), op.offset);
            return;
        }
        let header = op.header();
        let started = op.started;
        let misuse = |what: &str| {
            log::error!("plugin misuse: {what} for {} of {} bytes; answering EIO", cmd_name(header.cmd), header.length);
            Err(libc::EIO)
        };
        let result = match (op.cmd, outcome) {
            (_, Outcome::Error(errno)) => Err(errno),
            (CMD_READ, Outcome::Done) => Ok(self.send_read(op, &[])),
            (CMD_READ, Outcome::Data(data)) if data.len() == op.count as usize => {
                op.buf = data;
                Ok(self.send_read(op, &[]))
            }
            (CMD_READ, Outcome::Lent(loan)) if loan.len() == op.count as usize => {
                self.output.recycle(std::mem::take(&mut op.buf));
                let h = self.whole_read_header(&op);
                self.output.push_lent(h, loan);
                Ok(())
            }
            (CMD_READ, Outcome::Data(_) | Outcome::Lent(_)) => misuse("read data of another length than the request's"),
            (CMD_READ, Outcome::SparseRead(extents)) => match covers_exactly(&extents, op.count) {
                true => Ok(self.send_read(op, &extents)),
                false => misuse("nbdkit_reply_read_extents not covering the read"),
            },
            (CMD_BLOCK_STATUS, Outcome::Extents(extents)) => match clip_extents(&extents, &op) {
                Some(descriptors) => Ok(self.send_block_status(&op, &descriptors)),
                None => misuse("nbdkit_reply_extents without an extent at the offset"),
            },
            (CMD_READ | CMD_BLOCK_STATUS, _) => misuse("a reply without data"),
            (_, Outcome::Done) => {
                let h = match self.reply_to(&header) {
                    Some(to) if to.extended => codec::done_chunk(&to),
                    _ => codec::simple_reply(op.cookie, 0),
                };
                self.output.push_reply(h, Vec::new());
                Ok(())
            }
            (_, _) => misuse("a data reply"),
        };
        let read_bytes = if header.cmd == CMD_READ { header.length as usize } else { 0 };
        match result {
            Ok(()) => stats.replied(read_bytes, false, started.elapsed()),
            Err(errno) => {
                log::debug!("{} at offset {} failed: {}", cmd_name(header.cmd), header.offset, Errno(errno));
                self.queue_error(&header, nbd_errno(errno, header.flags));
                stats.replied(0, true, started.elapsed());
            }
        }
    }

    /// Sends a successful READ. Ranges marked zero in `extents` go out as
    /// holes when the client takes structured replies in several chunks;
    /// otherwise they are zeroed in the buffer, which goes out whole.
    fn send_read(&mut self, mut op: Op, extents: &[(u64, u32)]) {
        let to = self.reply_to(&op.header());
        let chunks = to.is_some() && op.flags & CMD_FLAG_DF == 0;
        let runs = zero_runs(extents);
        if !chunks || runs.iter().all(|r| !r.2) {
            for &(start, len, zero) in &runs {
                if zero {
                    op.buf[start..start + len].fill(0);
                }
            }
            let h = self.whole_read_header(&op);
            self.output.push_payload(h, op.buf, op.count as usize);
            return;
        }
        let to = to.expect("chunks imply structured replies");
        let buf = std::rc::Rc::new(op.buf);
        let last = runs.len() - 1;
        for (i, &(start, len, zero)) in runs.iter().enumerate() {
            let offset = op.offset + start as u64;
            if zero {
                self.output.push_reply(codec::hole_chunk(&to, i == last, offset, len as u32), Vec::new());
            } else {
                let h = codec::data_chunk(&to, i == last, offset, len as u32);
                self.output.push_shared(h, buf.clone(), start..start + len);
            }
        }
    }

    /// The header of a READ reply that carries all its data at once.
    fn whole_read_header(&self, op: &Op) -> ReplyHeader {
        match self.reply_to(&op.header()) {
            Some(to) => codec::data_chunk(&to, true, op.offset, op.count),
            None => codec::simple_reply(op.cookie, 0),
        }
    }

    fn send_block_status(&mut self, op: &Op, descriptors: &[(u32, u32)]) {
        let to = self.reply_to(&op.header()).expect("block status implies structured replies");
        let h = codec::block_status(&to, CONTEXT_BASE_ALLOCATION_ID, descriptors.len());
        self.output.push_reply(h, codec::block_descriptors(descriptors, to.extended));
    }

    /// How to frame structured chunks for this request, or None when the
    /// client takes only simple replies.
    fn reply_to(&self, h: &RequestHeader) -> Option<codec::ReplyTo> {
        let caps = self.caps.as_ref()?;
        caps.structured_replies.then_some(codec::ReplyTo {
            cookie: h.cookie,
            offset: h.offset,
            extended: caps.extended_headers,
        })
    }

    fn queue_error(&mut self, h: &RequestHeader, nbd_error: u32) {
        // READ and BLOCK_STATUS must be answered with structured replies
        // once negotiated; with extended headers, everything is.
        let reply = match self.reply_to(h) {
            Some(to) if to.extended || matches!(h.cmd, CMD_READ | CMD_BLOCK_STATUS) => {
                codec::error_chunk(&to, nbd_error)
            }
            _ => codec::simple_reply(h.cookie, nbd_error),
        };
        self.output.push_reply(reply, Vec::new());
    }

    /// Sends queued output (and ciphertext TLS still holds), then starts
    /// TLS if STARTTLS was just acknowledged.
    pub fn flush(&mut self) {
        if self.write_blocked {
            return;
        }
        let Some(stream) = self.stream.as_mut() else { return };
        let result =
            self.output.flush(stream).and_then(|all| if all { stream.flush().map(|()| true) } else { Ok(false) });
        match result {
            Ok(true) => {}
            Ok(false) => self.write_blocked = true,
            Err(e) if would_block(&e) => self.write_blocked = true,
            Err(e) => return self.break_off(&format!("write error: {}", Describe(&e))),
        }
        if !self.output.is_empty() || self.write_blocked {
            return;
        }
        if let Some((config, early)) = self.tls_pending.take() {
            let stream = self.stream.as_mut().expect("checked above");
            if let Err(e) = stream.start_tls(config, &early) {
                return self.break_off(&format!("TLS: {e}"));
            }
            if let Phase::Handshake(hs) = &mut self.phase {
                hs.tls_started();
            }
            self.read_blocked = false;
        }
    }
}

/// Most block-status descriptors sent in one reply; clients ask again
/// for the rest.
const MAX_DESCRIPTORS: usize = 65536;

/// Do non-empty extents add up to exactly `count` bytes?
fn covers_exactly(extents: &[(u64, u32)], count: u32) -> bool {
    let mut total: u64 = 0;
    for &(len, _) in extents {
        total = match total.checked_add(len) {
            Some(t) => t,
            None => return false,
        };
    }
    total == count as u64
}

/// A read's extents as (start in buffer, length, reads-as-zero) runs,
/// adjacent runs of one kind merged.
fn zero_runs(extents: &[(u64, u32)]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0usize;
    for &(len, ty) in extents.iter().filter(|e| e.0 > 0) {
        let zero = ty & NBDKIT_EXTENT_ZERO != 0;
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += len as usize,
            _ => runs.push((pos, len as usize, zero)),
        }
        pos += len as usize;
    }
    runs
}

/// The plugin's extents as wire descriptors: empty ones skipped, the
/// last cut at the end of the request, one only for REQ_ONE, at most
/// MAX_DESCRIPTORS. `None` when nothing covers the request's offset.
fn clip_extents(extents: &[(u64, u32)], op: &Op) -> Option<Vec<(u32, u32)>> {
    let mut left = op.count as u64;
    let mut out = Vec::new();
    for &(len, ty) in extents.iter().filter(|e| e.0 > 0) {
        let take = len.min(left);
        out.push((take as u32, ty & (STATE_HOLE | STATE_ZERO)));
        left -= take;
        if left == 0 || op.flags & CMD_FLAG_REQ_ONE != 0 || out.len() == MAX_DESCRIPTORS {
            break;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Export selection for the handshake, backed by the plugin.
struct Resolver<'a, 'b> {
    ctx: &'a mut Ctx<'b>,
    handle: &'a mut Option<Handle>,
    caps: &'a mut Option<ExportCaps>,
    /// The TLS client certificate, shown to the plugin's `open`.
    peer_certificate: Option<&'a [u8]>,
}

impl ExportResolver for Resolver<'_, '_> {
    fn resolve(&mut self, name: &str, purpose: Purpose) -> Result<ExportInfo, Refusal> {
        let config = self.ctx.config;
        let plugin = self.ctx.plugin;
        let name = canonical_export(config, plugin, name).map_err(|code| {
            log::info!("refused export {name:?}: no such export");
            Refusal { code, message: format!("no export named {name:?}") }
        })?;
        let handle = crate::tls::with_peer_certificate(self.peer_certificate, || plugin.open(config.readonly, name))
            .map_err(|errno| refusal(name, "open", errno))?;
        let caps = match plugin.caps(handle, config.readonly, config.max_request) {
            Ok(c) => c,
            Err(e) => {
                plugin.close(handle);
                return Err(refusal(name, "asking its size and capabilities", e));
            }
        };
        let info = ExportInfo {
            name: name.to_string(),
            description: plugin.export_description(handle).or_else(|| config.export_description.clone()),
            size: caps.size,
            flags: caps.transmission_flags(),
            block_size: caps.block_size,
        };
        match purpose {
            Purpose::Info => plugin.close(handle),
            Purpose::Go => {
                if let Some(old) = self.handle.replace(handle) {
                    plugin.close(old);
                }
                *self.caps = Some(caps);
            }
        }
        Ok(info)
    }

    fn list(&mut self) -> Vec<(String, String)> {
        let c = self.ctx.config;
        if !self.ctx.plugin.lists_exports() {
            return vec![(c.export_name.clone(), c.export_description.clone().unwrap_or_default())];
        }
        self.ctx.plugin.list_exports().unwrap_or_else(|e| {
            log::warn!("list_exports failed: {}", io::Error::from_raw_os_error(e));
            Vec::new()
        })
    }

    fn contexts(&mut self, name: &str) -> Result<Vec<(u32, &'static str)>, u32> {
        canonical_export(self.ctx.config, self.ctx.plugin, name)?;
        let mut v = Vec::new();
        if self.ctx.plugin.has_extents() {
            v.push((CONTEXT_BASE_ALLOCATION_ID, CONTEXT_BASE_ALLOCATION));
        }
        Ok(v)
    }
}

/// How a client learns that the plugin refused export `name` in `what`
/// with `errno`: the nearest NBD_REP_ERR_* code, the reason in words,
/// and a warning in the log (an outage must not look like a typo).
fn refusal(name: &str, what: &str, errno: i32) -> Refusal {
    // NBD has no code for "the server failed": a backend that is down,
    // out of memory or full gets PLATFORM, and the message says which.
    let code = match errno {
        libc::ENOENT => REP_ERR_UNKNOWN,
        libc::EPERM | libc::EACCES | libc::EROFS => REP_ERR_POLICY,
        libc::EINVAL => REP_ERR_INVALID,
        libc::ESHUTDOWN => REP_ERR_SHUTDOWN,
        _ => REP_ERR_PLATFORM,
    };
    let errno = if errno == 0 { libc::EIO } else { errno };
    let message = format!("export {name:?}: {what} failed: {}", Errno(errno));
    if code == REP_ERR_UNKNOWN {
        log::info!("refused {message}");
    } else {
        log::warn!("refused {message}");
    }
    Refusal { code, message }
}

/// The export a client's name stands for: "" is the default export; other
/// names must be the configured one, unless the plugin lists its own
/// exports (then its `open` judges them).
fn canonical_export<'n>(config: &'n Config, plugin: &Plugin, name: &'n str) -> Result<&'n str, u32> {
    if name.is_empty() {
        Ok(&config.export_name)
    } else if name == config.export_name || plugin.lists_exports() {
        Ok(name)
    } else {
        Err(REP_ERR_UNKNOWN)
    }
}
