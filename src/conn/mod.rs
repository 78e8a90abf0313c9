//! One client connection: handshake, request dispatch, replies, teardown.
//!
//! The connection owns its socket and buffers; ops it starts live in the
//! server-wide [`OpTable`] and point back at it by slab key and serial, so
//! a connection is torn down only once its last op is answered.

mod export;
mod ops;
mod output;
mod reply;
pub(crate) mod stream;
pub(crate) mod transport;

use std::io;
use std::sync::Arc;
use std::time::Instant;

use crate::budget::Budget;
use crate::buffers::BufferPool;
use crate::completion::{OpTable, Token};
use crate::config::Config;
use crate::deadlines::Deadlines;
use crate::errno::{Describe, Errno};
use crate::plugin::{Handle, Plugin};
use crate::protocol::codec::RequestHeader;
use crate::protocol::consts::*;
use crate::protocol::handshake::{Handshake, Outcome as HsOutcome, TlsMode};
use crate::protocol::transmission::{Event, ExportCaps, RequestReader};
use crate::stats::Stats;
use export::Resolver;
pub(crate) use ops::Op;
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
/// Unsent reply bytes that are written out at once, inside a turn,
/// before more requests are read.
const FLUSH_AT: usize = 256 * 1024;

/// State the loop lends to a connection while it works.
pub struct Ctx<'a> {
    pub plugin: &'a dyn Plugin,
    pub config: &'a Config,
    pub ops: &'a mut OpTable<Op>,
    pub stats: &'a Stats,
    pub buffers: &'a mut BufferPool,
    /// Per-request deadlines, when a request timeout is set.
    pub timeouts: Option<&'a mut Deadlines<Token>>,
    pub now: Instant,
    /// The memory budget over all connections.
    pub budget: &'a mut Budget,
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
    /// What the socket is registered for (see [`Self::interest_change`]).
    interest: mio::Interest,
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
            interest: mio::Interest::READABLE,
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
    pub fn close(&mut self, plugin: &dyn Plugin) {
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

    /// The readiness to ask of the poller, when it differs from what was
    /// asked last. Writable events are wanted only while a write is
    /// blocked: otherwise every reply the client takes off the socket
    /// would wake the loop for nothing. Readable events are not wanted
    /// while requests wait for the client to read its replies (see
    /// `paused`): otherwise every request it sends meanwhile would.
    pub fn interest_change(&mut self) -> Option<mio::Interest> {
        use mio::Interest;
        self.stream.as_ref()?;
        let wanted = match (self.reads_wait_for_writes(), self.write_blocked) {
            (true, _) => Interest::WRITABLE,
            (false, true) => Interest::READABLE | Interest::WRITABLE,
            (false, false) => Interest::READABLE,
        };
        (wanted != self.interest).then(|| {
            self.interest = wanted;
            wanted
        })
    }

    /// The client takes its replies slower than it sends requests, and
    /// none of its requests is with the plugin: take no more until it
    /// catches up, as a threaded server blocked in send would. Requests it
    /// holds meanwhile cost nothing, and clients that walk a list of their
    /// commands in flight for every reply (libnbd) walk shorter lists.
    /// While the plugin holds some, reading goes on (within `MAX_UNSENT`
    /// and the memory caps): a pause would only delay when a slow backend
    /// starts the next ones, and add to the latency their clients see.
    fn reads_wait_for_writes(&self) -> bool {
        self.write_blocked
            && self.unanswered() == 0
            && matches!(&self.phase, Phase::Transmission(r) if !r.receiving_payload())
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
        if self.reads_wait_for_writes() {
            return Some(Next::Wait); // the writable event will wake us
        }
        if ctx.ops.is_full() {
            return Some(Next::Starved);
        }
        if ctx.budget.admits((self.key, self.serial), held, ctx.now) { None } else { Some(Next::Starved) }
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
                if self.output.bytes >= FLUSH_AT {
                    // Replies leave as they are made, and a client that
                    // does not keep up with them stops this turn (see
                    // `paused`), before it has sent many more requests:
                    // each request taken in is one more on the list of
                    // commands in flight that some clients walk for
                    // every reply.
                    self.flush();
                }
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
                let (used, event) = reader.feed(input, ctx.buffers);
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

    /// The reply style the client negotiated.
    fn style(&self) -> reply::Style {
        self.caps.map_or(reply::Style { structured: false, extended: false }, |c| reply::Style {
            structured: c.structured_replies,
            extended: c.extended_headers,
        })
    }

    fn queue_error(&mut self, h: &RequestHeader, nbd_error: u32) {
        let style = self.style();
        self.output.begin_reply();
        reply::error(&mut self.output, style, h, nbd_error);
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
