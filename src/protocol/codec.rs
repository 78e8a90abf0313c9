//! Pure encode/decode of NBD transmission-phase messages: no I/O, no state.

use super::consts::*;

/// Size of a compact request header on the wire.
pub(crate) const REQUEST_HEADER_LEN: usize = 28;

/// A request header as the client sent it (fields in host byte order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header could not be decoded at all. The only answer is
/// to drop the connection: with a bad magic we cannot find the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic(pub u32);

pub fn decode_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, BadMagic> {
    let magic = be_u32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: be_u16(&b[4..6]),
        cmd: be_u16(&b[6..8]),
        cookie: be_u64(&b[8..16]),
        offset: be_u64(&b[16..24]),
        length: be_u32(&b[24..28]),
    })
}

pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// The fixed part of a reply, small enough to live inline in the output queue.
/// Payload bytes (read data) travel separately so they are never copied.
#[derive(Clone, Copy)]
pub struct ReplyHeader {
    bytes: [u8; 32],
    len: u8,
}

impl ReplyHeader {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn new(parts: &[&[u8]]) -> Self {
        let mut h = ReplyHeader { bytes: [0; 32], len: 0 };
        for p in parts {
            let start = h.len as usize;
            h.bytes[start..start + p.len()].copy_from_slice(p);
            h.len += p.len() as u8;
        }
        h
    }
}

/// Simple reply: magic, error, cookie. Followed by read data on success of a READ.
pub fn simple_reply(cookie: u64, nbd_error: u32) -> ReplyHeader {
    ReplyHeader::new(&[
        &SIMPLE_REPLY_MAGIC.to_be_bytes(),
        &nbd_error.to_be_bytes(),
        &cookie.to_be_bytes(),
    ])
}

fn structured_header(cookie: u64, flags: u16, ty: u16, payload_len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&payload_len.to_be_bytes());
    b
}

/// NBD_REPLY_TYPE_OFFSET_DATA chunk header, not necessarily the last;
/// `data_len` bytes of data follow.
pub fn structured_data_chunk(cookie: u64, done: bool, offset: u64, data_len: u32) -> ReplyHeader {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    ReplyHeader::new(&[&structured_header(cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + data_len), &offset.to_be_bytes()])
}

/// NBD_REPLY_TYPE_OFFSET_HOLE chunk: `len` bytes of zeroes at `offset`.
pub fn structured_hole_chunk(cookie: u64, done: bool, offset: u64, len: u32) -> ReplyHeader {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    ReplyHeader::new(&[
        &structured_header(cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12),
        &offset.to_be_bytes(),
        &len.to_be_bytes(),
    ])
}

/// Final NBD_REPLY_TYPE_BLOCK_STATUS chunk header for one context;
/// `count` descriptors of 8 bytes (see [`block_descriptors`]) follow.
pub fn structured_block_status(cookie: u64, context_id: u32, count: usize) -> ReplyHeader {
    let len = 4 + 8 * count as u32;
    ReplyHeader::new(&[&structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, len), &context_id.to_be_bytes()])
}

/// Block status descriptors: (length, NBD_STATE_* flags) pairs.
pub fn block_descriptors(extents: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 * extents.len());
    for &(len, flags) in extents {
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

/// Final NBD_REPLY_TYPE_NONE chunk: success with nothing to say.
pub fn structured_done(cookie: u64) -> ReplyHeader {
    ReplyHeader::new(&[&structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)])
}

/// Final NBD_REPLY_TYPE_ERROR chunk with an empty message.
pub fn structured_error(cookie: u64, nbd_error: u32) -> ReplyHeader {
    ReplyHeader::new(&[
        &structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6),
        &nbd_error.to_be_bytes(),
        &0u16.to_be_bytes(),
    ])
}

/// An option reply (handshake phase) with its payload appended to `out`.
pub fn option_reply(out: &mut Vec<u8>, opt: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let h = RequestHeader { flags: 1, cmd: CMD_WRITE, cookie: 0xdead_beef_0102_0304, offset: 1 << 40, length: 4096 };
        assert_eq!(decode_request(&encode_request(&h)), Ok(h));
    }

    #[test]
    fn request_bad_magic() {
        let mut b = encode_request(&RequestHeader { flags: 0, cmd: 0, cookie: 0, offset: 0, length: 0 });
        b[0] ^= 0xff;
        assert!(decode_request(&b).is_err());
    }

    #[test]
    fn simple_reply_layout() {
        let r = simple_reply(7, NBD_EINVAL);
        assert_eq!(r.as_bytes(), &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn structured_read_layout() {
        let r = structured_data_chunk(9, true, 512, 4096);
        let b = r.as_bytes();
        assert_eq!(b.len(), 28);
        assert_eq!(be_u32(&b[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be_u16(&b[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&b[6..8]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u64(&b[8..16]), 9);
        assert_eq!(be_u32(&b[16..20]), 4096 + 8);
        assert_eq!(be_u64(&b[20..28]), 512);
    }

    #[test]
    fn structured_error_layout() {
        let b = structured_error(3, NBD_EIO);
        let b = b.as_bytes();
        assert_eq!(b.len(), 26);
        assert_eq!(be_u16(&b[6..8]), REPLY_TYPE_ERROR);
        assert_eq!(be_u32(&b[16..20]), 6);
        assert_eq!(be_u32(&b[20..24]), NBD_EIO);
        assert_eq!(be_u16(&b[24..26]), 0);
    }

    #[test]
    fn option_reply_layout() {
        let mut out = Vec::new();
        option_reply(&mut out, OPT_GO, REP_ACK, &[]);
        assert_eq!(out.len(), 20);
        assert_eq!(be_u64(&out[0..8]), OPT_REPLY_MAGIC);
        assert_eq!(be_u32(&out[8..12]), OPT_GO);
        assert_eq!(be_u32(&out[12..16]), REP_ACK);
        assert_eq!(be_u32(&out[16..20]), 0);
    }
}
