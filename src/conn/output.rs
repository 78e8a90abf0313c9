//! A connection's queue of bytes for the client, sent with writev.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::rc::Rc;

use super::reply::Frames;
use super::stream::interrupted;
use super::transport::Transport;
use crate::loan::Loan;
use crate::protocol::codec::ReplyHeader;

/// Frames gathered into one writev call.
const MAX_FRAMES_PER_WRITE: usize = 64;

enum Frame {
    /// A reply header and the first `.2` bytes of a buffer (read data,
    /// possibly none).
    Reply(ReplyHeader, Vec<u8>, usize),
    /// A reply header and part of a buffer shared with other chunks.
    Shared(ReplyHeader, Rc<Vec<u8>>, Range<usize>),
    /// A reply header and read data lent by the plugin (released on drop).
    Lent(ReplyHeader, Loan),
    /// Raw handshake bytes.
    Bytes(Vec<u8>),
}

impl Frame {
    fn parts(&self) -> (&[u8], &[u8]) {
        match self {
            Frame::Reply(h, p, len) => (h.as_bytes(), &p[..*len]),
            Frame::Shared(h, p, r) => (h.as_bytes(), &p[r.clone()]),
            Frame::Lent(h, loan) => (h.as_bytes(), loan.as_slice()),
            Frame::Bytes(b) => (b, &[]),
        }
    }
    fn len(&self) -> usize {
        let (a, b) = self.parts();
        a.len() + b.len()
    }
}

#[derive(Default)]
pub struct Output {
    frames: VecDeque<Frame>,
    /// Bytes of the first frame already sent.
    sent: usize,
    /// Bytes queued and not yet sent.
    pub bytes: usize,
    /// Buffers whose bytes are all sent, for the loop's buffer pool.
    spent: Vec<Vec<u8>>,
    /// Where each reply queued since the last flush starts in `frames`.
    batch: Vec<usize>,
    /// Scratch space for reordering a batch, kept to reuse its memory.
    scratch: Vec<Frame>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Marks the start of a reply's frames (one reply may take several).
    pub fn begin_reply(&mut self) {
        self.batch.push(self.frames.len());
    }

    /// Puts the replies queued since the last flush newest first, each
    /// reply's own frames kept in order. NBD lets replies leave in any
    /// order, and clients that find a reply's command by walking their
    /// list of commands in flight from the newest (libnbd) then find each
    /// one at the head instead of walking past the whole batch; clients
    /// that look commands up by cookie are indifferent.
    fn newest_first(&mut self) {
        if self.batch.len() > 1 {
            let base = self.batch[0];
            self.scratch.extend(self.frames.drain(base..));
            for &start in self.batch.iter().rev() {
                self.frames.extend(self.scratch.drain(start - base..));
            }
        }
        self.batch.clear();
    }

    /// A reply sending the first `len` bytes of `buf`.
    pub fn push_payload(&mut self, header: ReplyHeader, buf: Vec<u8>, len: usize) {
        let f = Frame::Reply(header, buf, len);
        self.bytes += f.len();
        self.frames.push_back(f);
    }

    /// A buffer no longer needed, to be reused.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= 4096 {
            self.spent.push(buf);
        }
    }

    /// Takes the buffers that are free for reuse.
    pub fn take_spent(&mut self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.spent.drain(..)
    }

    /// A reply sending lent bytes; the loan ends once they are sent (or
    /// the queue is dropped).
    pub fn push_lent(&mut self, header: ReplyHeader, loan: Loan) {
        let f = Frame::Lent(header, loan);
        self.bytes += f.len();
        self.frames.push_back(f);
    }

    pub fn push_shared(&mut self, header: ReplyHeader, buf: Rc<Vec<u8>>, range: Range<usize>) {
        let f = Frame::Shared(header, buf, range);
        self.bytes += f.len();
        self.frames.push_back(f);
    }

    pub fn push_bytes(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.bytes += bytes.len();
            self.frames.push_back(Frame::Bytes(bytes));
        }
    }

    /// Writes until the queue is empty or the socket is full. `Ok(true)`
    /// means everything was sent.
    pub fn flush(&mut self, stream: &mut Transport) -> io::Result<bool> {
        self.newest_first();
        while !self.frames.is_empty() {
            let mut slices: [IoSlice<'_>; 2 * MAX_FRAMES_PER_WRITE] = [IoSlice::new(&[]); 2 * MAX_FRAMES_PER_WRITE];
            let mut n = 0;
            let mut skip = self.sent;
            for f in self.frames.iter().take(MAX_FRAMES_PER_WRITE) {
                for part in [f.parts().0, f.parts().1] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices[n] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    n += 1;
                }
            }
            let written = match stream.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if interrupted(&e) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.advance(written);
        }
        Ok(true)
    }

    fn advance(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let left = self.frames[0].len() - self.sent;
            if written < left {
                self.sent += written;
                return;
            }
            written -= left;
            self.sent = 0;
            if let Some(Frame::Reply(_, buf, _)) = self.frames.pop_front() {
                self.recycle(buf);
            }
        }
    }
}

impl Frames for Output {
    fn payload(&mut self, header: ReplyHeader, buf: Vec<u8>, len: usize) {
        self.push_payload(header, buf, len);
    }
    fn shared(&mut self, header: ReplyHeader, buf: Rc<Vec<u8>>, range: Range<usize>) {
        self.push_shared(header, buf, range);
    }
    fn lent(&mut self, header: ReplyHeader, loan: Loan) {
        self.push_lent(header, loan);
    }
    fn recycle(&mut self, buf: Vec<u8>) {
        Output::recycle(self, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::simple_reply;

    /// The cookies of the queued frames, in the order they will leave.
    fn cookies(out: &Output) -> Vec<u8> {
        out.frames.iter().map(|f| f.parts().0[15]).collect()
    }

    #[test]
    fn a_batch_leaves_newest_first_with_each_reply_whole() {
        let mut out = Output::default();
        out.push_payload(simple_reply(1, 0), Vec::new(), 0); // queued before: stays first
        out.begin_reply();
        out.push_payload(simple_reply(2, 0), Vec::new(), 0);
        out.begin_reply();
        out.push_payload(simple_reply(3, 0), Vec::new(), 0); // one reply of two frames
        out.push_payload(simple_reply(4, 0), Vec::new(), 0);
        out.begin_reply();
        out.push_payload(simple_reply(5, 0), Vec::new(), 0);
        out.newest_first();
        assert_eq!(cookies(&out), [1, 5, 3, 4, 2]);
        // The next batch is ordered on its own, behind the first.
        out.begin_reply();
        out.push_payload(simple_reply(6, 0), Vec::new(), 0);
        out.begin_reply();
        out.push_payload(simple_reply(7, 0), Vec::new(), 0);
        out.newest_first();
        assert_eq!(cookies(&out), [1, 5, 3, 4, 2, 7, 6]);
        assert_eq!(out.bytes, 7 * 16);
    }
}
