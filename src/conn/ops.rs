//! The life of an op: handed to the plugin, answered (by the plugin, a
//! timeout or the shutdown), cancelled, released, and its reply queued.

use std::time::{Duration, Instant};

use super::{Connection, Ctx, reply};
use crate::completion::{Outcome, Retire, Token};
use crate::errno::Errno;
use crate::plugin::{Io, IoRequest, Started, flag};
use crate::protocol::codec::RequestHeader;
use crate::protocol::consts::*;
use crate::protocol::transmission::{FuaMode, Request};
use crate::stats::Stats;

/// An NBD request handed to the plugin and not yet answered.
pub(crate) struct Op {
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
pub(crate) struct OpSummary {
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

impl Connection {
    pub(super) fn dispatch(&mut self, req: Request, ctx: &mut Ctx) {
        let h = req.header;
        let caps = self.caps.expect("transmission implies caps");
        let (io, mut flags) = match h.cmd {
            CMD_READ => (Io::Read, 0),
            CMD_WRITE => (Io::Write, 0),
            CMD_FLUSH => (Io::Flush, 0),
            CMD_TRIM => (Io::Trim, 0),
            CMD_WRITE_ZEROES if h.flags & CMD_FLAG_NO_HOLE != 0 => (Io::Zero, 0),
            CMD_WRITE_ZEROES => (Io::Zero, flag::MAY_TRIM),
            CMD_CACHE => (Io::Cache, 0),
            CMD_BLOCK_STATUS => (Io::Extents, 0),
            _ => unreachable!("validated"),
        };
        if h.flags & CMD_FLAG_REQ_ONE != 0 {
            flags |= flag::REQ_ONE;
        }
        if h.flags & CMD_FLAG_FAST_ZERO != 0 {
            flags |= flag::FAST_ZERO;
        }
        let fua = h.flags & CMD_FLAG_FUA != 0 && matches!(io, Io::Write | Io::Trim | Io::Zero);
        if fua && caps.fua == FuaMode::Native {
            flags |= flag::FUA;
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
        let rq = IoRequest {
            io,
            token,
            conn: self.serial,
            handle,
            buf: &mut op.buf,
            count: h.length,
            offset: h.offset,
            flags,
        };
        let started = ctx.plugin.start(rq);
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
            let rq = IoRequest {
                io: Io::Flush,
                token: new_token,
                conn: self.serial,
                handle,
                buf: &mut [],
                count: 0,
                offset: 0,
                flags: 0,
            };
            let started = ctx.plugin.start(rq);
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
    pub fn time_out(&mut self, token: Token, timeout: Duration, ctx: &mut Ctx) {
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

    fn finish(&mut self, op: Op, outcome: Outcome, stats: &Stats) {
        self.release(&op, stats);
        if self.stream.is_none() {
            log::debug!("{} at offset {}: reply after the client left; dropped", cmd_name(op.cmd), op.offset);
            return;
        }
        let header = op.header();
        let read_bytes = if header.cmd == CMD_READ { header.length as usize } else { 0 };
        let style = self.style();
        self.output.begin_reply();
        match reply::encode(&mut self.output, style, &header, op.buf, outcome) {
            Ok(()) => stats.replied(read_bytes, false, op.started.elapsed()),
            Err(errno) => {
                log::debug!("{} at offset {} failed: {}", cmd_name(header.cmd), header.offset, Errno(errno));
                self.queue_error(&header, nbd_errno(errno, header.flags));
                stats.replied(0, true, op.started.elapsed());
            }
        }
    }
}
