//! Replies as frames: what a finished request sends, from the plugin's
//! outcome and the reply style the client negotiated. Pure: no socket, no
//! op table; the connection hands the frames to its output queue.

use std::ops::Range;
use std::rc::Rc;

use crate::completion::Outcome;
use crate::loan::Loan;
use crate::plugin::extent;
use crate::protocol::codec::{self, ReplyHeader, ReplyTo, RequestHeader};
use crate::protocol::consts::*;

/// Most block-status descriptors sent in one reply; clients ask again
/// for the rest.
const MAX_DESCRIPTORS: usize = 65536;

/// Where encoded frames go: the connection's output queue, or a list in
/// tests.
pub(crate) trait Frames {
    /// A header and the first `len` bytes of `buf`.
    fn payload(&mut self, header: ReplyHeader, buf: Vec<u8>, len: usize);
    /// A header and part of a buffer other frames share.
    fn shared(&mut self, header: ReplyHeader, buf: Rc<Vec<u8>>, range: Range<usize>);
    /// A header and bytes the plugin lent.
    fn lent(&mut self, header: ReplyHeader, loan: Loan);
    /// A buffer no frame needs, for reuse.
    fn recycle(&mut self, buf: Vec<u8>);

    /// A header and a small payload of its own (possibly none).
    fn reply(&mut self, header: ReplyHeader, payload: Vec<u8>) {
        let len = payload.len();
        self.payload(header, payload, len);
    }
}

/// The reply style a connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Style {
    pub(crate) structured: bool,
    pub(crate) extended: bool,
}

impl Style {
    /// How to frame structured chunks for `req`, or None for simple replies.
    fn to(self, req: &RequestHeader) -> Option<ReplyTo> {
        self.structured.then_some(ReplyTo { cookie: req.cookie, offset: req.offset, extended: self.extended })
    }
}

/// Encodes the reply to `req`, finished with `outcome`; `buf` is the op's
/// read buffer (or write payload, then only recycled). `Err(errno)` when
/// the outcome is an error, or a reply the request cannot have (a plugin
/// bug, logged): the caller then sends [`error`].
pub(crate) fn encode(
    out: &mut impl Frames,
    style: Style,
    req: &RequestHeader,
    buf: Vec<u8>,
    outcome: Outcome,
) -> Result<(), i32> {
    let misuse = |what: &str| {
        log::error!("plugin misuse: {what} for {} of {} bytes; answering EIO", cmd_name(req.cmd), req.length);
        Err(libc::EIO)
    };
    let count = req.length as usize;
    match (req.cmd, outcome) {
        (_, Outcome::Error(errno)) => Err(errno),
        (CMD_READ, Outcome::Done) => {
            read(out, style, req, buf, &[]);
            Ok(())
        }
        (CMD_READ, Outcome::Data(data)) if data.len() == count => {
            out.recycle(buf);
            read(out, style, req, data, &[]);
            Ok(())
        }
        (CMD_READ, Outcome::Lent(loan)) if loan.len() == count => {
            out.recycle(buf);
            out.lent(whole_read_header(style, req), loan);
            Ok(())
        }
        (CMD_READ, Outcome::Data(_) | Outcome::Lent(_)) => misuse("read data of another length than the request's"),
        (CMD_READ, Outcome::SparseRead(extents)) if covers_exactly(&extents, req.length) => {
            read(out, style, req, buf, &extents);
            Ok(())
        }
        (CMD_READ, Outcome::SparseRead(_)) => misuse("nbdkit_reply_read_extents not covering the read"),
        (CMD_BLOCK_STATUS, Outcome::Extents(extents)) => match clip_extents(&extents, req) {
            Some(descriptors) => {
                let to = style.to(req).expect("block status implies structured replies");
                let h = codec::block_status(&to, CONTEXT_BASE_ALLOCATION_ID, descriptors.len());
                out.reply(h, codec::block_descriptors(&descriptors, to.extended));
                Ok(())
            }
            None => misuse("nbdkit_reply_extents without an extent at the offset"),
        },
        (CMD_READ | CMD_BLOCK_STATUS, _) => misuse("a reply without data"),
        (_, Outcome::Done) => {
            out.recycle(buf); // a write payload, done with
            let h = match style.to(req) {
                Some(to) if to.extended => codec::done_chunk(&to),
                _ => codec::simple_reply(req.cookie, 0),
            };
            out.reply(h, Vec::new());
            Ok(())
        }
        (_, _) => misuse("a data reply"),
    }
}

/// Encodes an error reply (`nbd_error` is an NBD error value).
pub(crate) fn error(out: &mut impl Frames, style: Style, req: &RequestHeader, nbd_error: u32) {
    // READ and BLOCK_STATUS must be answered with structured replies
    // once negotiated; with extended headers, everything is.
    let h = match style.to(req) {
        Some(to) if to.extended || matches!(req.cmd, CMD_READ | CMD_BLOCK_STATUS) => codec::error_chunk(&to, nbd_error),
        _ => codec::simple_reply(req.cookie, nbd_error),
    };
    out.reply(h, Vec::new());
}

/// A successful READ from `buf`. Ranges marked zero in `extents` go out
/// as holes when the client takes structured replies in several chunks;
/// otherwise they are zeroed in the buffer, which goes out whole.
fn read(out: &mut impl Frames, style: Style, req: &RequestHeader, mut buf: Vec<u8>, extents: &[(u64, u32)]) {
    let to = style.to(req);
    let chunks = to.is_some() && req.flags & CMD_FLAG_DF == 0;
    let runs = zero_runs(extents);
    if !chunks || runs.iter().all(|r| !r.2) {
        for &(start, len, zero) in &runs {
            if zero {
                buf[start..start + len].fill(0);
            }
        }
        out.payload(whole_read_header(style, req), buf, req.length as usize);
        return;
    }
    let to = to.expect("chunks imply structured replies");
    let buf = Rc::new(buf);
    let last = runs.len() - 1;
    for (i, &(start, len, zero)) in runs.iter().enumerate() {
        let offset = req.offset + start as u64;
        if zero {
            out.reply(codec::hole_chunk(&to, i == last, offset, len as u32), Vec::new());
        } else {
            out.shared(codec::data_chunk(&to, i == last, offset, len as u32), buf.clone(), start..start + len);
        }
    }
}

/// The header of a READ reply that carries all its data at once.
fn whole_read_header(style: Style, req: &RequestHeader) -> ReplyHeader {
    match style.to(req) {
        Some(to) => codec::data_chunk(&to, true, req.offset, req.length),
        None => codec::simple_reply(req.cookie, 0),
    }
}

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
        let zero = ty & extent::ZERO != 0;
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
fn clip_extents(extents: &[(u64, u32)], req: &RequestHeader) -> Option<Vec<(u32, u32)>> {
    let mut left = req.length as u64;
    let mut out = Vec::new();
    for &(len, ty) in extents.iter().filter(|e| e.0 > 0) {
        let take = len.min(left);
        out.push((take as u32, ty & (STATE_HOLE | STATE_ZERO)));
        left -= take;
        if left == 0 || req.flags & CMD_FLAG_REQ_ONE != 0 || out.len() == MAX_DESCRIPTORS {
            break;
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as (header bytes, payload bytes).
    #[derive(Default)]
    struct Sent(Vec<(Vec<u8>, Vec<u8>)>);

    impl Frames for Sent {
        fn payload(&mut self, h: ReplyHeader, buf: Vec<u8>, len: usize) {
            self.0.push((h.as_bytes().to_vec(), buf[..len].to_vec()));
        }
        fn shared(&mut self, h: ReplyHeader, buf: Rc<Vec<u8>>, range: Range<usize>) {
            self.0.push((h.as_bytes().to_vec(), buf[range].to_vec()));
        }
        fn lent(&mut self, h: ReplyHeader, loan: Loan) {
            self.0.push((h.as_bytes().to_vec(), loan.as_slice().to_vec()));
        }
        fn recycle(&mut self, _: Vec<u8>) {}
    }

    const SIMPLE: Style = Style { structured: false, extended: false };
    const STRUCTURED: Style = Style { structured: true, extended: false };
    const EXTENDED: Style = Style { structured: true, extended: true };

    fn req(cmd: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, cmd, cookie: 7, offset, length }
    }

    fn be16(b: &[u8]) -> u16 {
        u16::from_be_bytes([b[0], b[1]])
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    /// A structured chunk's (flags, type).
    fn chunk(h: &[u8]) -> (u16, u16) {
        (be16(&h[4..]), be16(&h[6..]))
    }

    #[test]
    fn simple_read_is_one_reply_with_the_data() {
        let mut out = Sent::default();
        let data = vec![0xab; 4096];
        encode(&mut out, SIMPLE, &req(CMD_READ, 0, 0, 4096), data.clone(), Outcome::Done).unwrap();
        assert_eq!(out.0.len(), 1);
        assert_eq!(be32(&out.0[0].0), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&out.0[0].0[4..]), 0, "no error");
        assert_eq!(out.0[0].1, data);
    }

    #[test]
    fn sparse_read_sends_holes_unless_df() {
        let extents = vec![(4096, 0), (4096, extent::ZERO)];
        let mut out = Sent::default();
        let buf = vec![1u8; 8192];
        encode(&mut out, STRUCTURED, &req(CMD_READ, 0, 0, 8192), buf.clone(), Outcome::SparseRead(extents.clone()))
            .unwrap();
        let kinds: Vec<_> = out.0.iter().map(|(h, _)| chunk(h)).collect();
        assert_eq!(
            kinds,
            vec![(0, REPLY_TYPE_OFFSET_DATA), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE)],
            "data chunk, then a hole chunk ending the reply"
        );
        assert_eq!(out.0[0].1, vec![1u8; 8 + 4096][8..], "data chunk carries the first half");

        let mut out = Sent::default();
        encode(&mut out, STRUCTURED, &req(CMD_READ, CMD_FLAG_DF, 0, 8192), buf, Outcome::SparseRead(extents)).unwrap();
        assert_eq!(out.0.len(), 1, "DF: one chunk");
        assert_eq!(chunk(&out.0[0].0), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
        assert_eq!(&out.0[0].1[..4096], &[1u8; 4096][..]);
        assert_eq!(&out.0[0].1[4096..], &[0u8; 4096][..], "the hole is zeroed in the buffer");
    }

    #[test]
    fn bad_outcomes_are_errors() {
        let mut out = Sent::default();
        let r = req(CMD_READ, 0, 0, 4096);
        assert_eq!(encode(&mut out, STRUCTURED, &r, vec![0; 4096], Outcome::Data(vec![0; 100])), Err(libc::EIO));
        assert_eq!(encode(&mut out, STRUCTURED, &r, vec![0; 4096], Outcome::Extents(vec![])), Err(libc::EIO));
        let partial = Outcome::SparseRead(vec![(100, 0)]);
        assert_eq!(encode(&mut out, STRUCTURED, &r, vec![0; 4096], partial), Err(libc::EIO));
        let w = req(CMD_WRITE, 0, 0, 512);
        assert_eq!(encode(&mut out, SIMPLE, &w, vec![], Outcome::Error(libc::ENOSPC)), Err(libc::ENOSPC));
        assert!(out.0.is_empty(), "nothing sent for an error: the caller sends it");
    }

    #[test]
    fn errors_are_chunks_where_structured_replies_require() {
        let mut out = Sent::default();
        error(&mut out, STRUCTURED, &req(CMD_READ, 0, 0, 512), NBD_EIO);
        error(&mut out, STRUCTURED, &req(CMD_WRITE, 0, 0, 512), NBD_ENOSPC);
        error(&mut out, EXTENDED, &req(CMD_FLUSH, 0, 0, 0), NBD_EIO);
        assert_eq!(chunk(&out.0[0].0), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR));
        assert_eq!(be32(&out.0[1].0), SIMPLE_REPLY_MAGIC, "a WRITE error may be simple");
        assert_eq!(be32(&out.0[1].0[4..]), NBD_ENOSPC);
        assert_eq!(be32(&out.0[2].0), EXTENDED_REPLY_MAGIC, "with extended headers everything is a chunk");
    }

    #[test]
    fn done_is_simple_or_an_extended_none_chunk() {
        let mut out = Sent::default();
        encode(&mut out, STRUCTURED, &req(CMD_WRITE, 0, 0, 512), vec![0; 512], Outcome::Done).unwrap();
        encode(&mut out, EXTENDED, &req(CMD_WRITE, 0, 0, 512), vec![0; 512], Outcome::Done).unwrap();
        assert_eq!(be32(&out.0[0].0), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&out.0[1].0), EXTENDED_REPLY_MAGIC);
        assert_eq!(chunk(&out.0[1].0), (REPLY_FLAG_DONE, REPLY_TYPE_NONE));
    }

    #[test]
    fn block_status_is_clipped() {
        let plugin = vec![(0, 0), (1 << 20, STATE_HOLE | STATE_ZERO | 0x100), (1 << 20, 0)];
        let r = req(CMD_BLOCK_STATUS, 0, 0, 1536 * 1024);
        assert_eq!(clip_extents(&plugin, &r), Some(vec![(1 << 20, 3), (512 * 1024, 0)]), "cut at the end");
        let one = req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1536 * 1024);
        assert_eq!(clip_extents(&plugin, &one), Some(vec![(1 << 20, 3)]), "REQ_ONE: the first only");
        assert_eq!(clip_extents(&[(0, 0)], &r), None, "nothing covers the offset");
        let mut out = Sent::default();
        encode(&mut out, STRUCTURED, &r, vec![], Outcome::Extents(plugin)).unwrap();
        assert_eq!(chunk(&out.0[0].0), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
        assert_eq!(out.0[0].1.len(), 2 * 8, "two descriptors (the context id is in the header)");
    }
}
