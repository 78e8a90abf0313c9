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

/// Size of a request header with extended headers negotiated.
pub(crate) const EXTENDED_REQUEST_HEADER_LEN: usize = 32;

/// An extended request header: the header (its 32-bit length unset) and
/// the 64-bit length the client sent.
pub fn decode_extended_request(b: &[u8; EXTENDED_REQUEST_HEADER_LEN]) -> Result<(RequestHeader, u64), BadMagic> {
    let magic = be_u32(&b[0..4]);
    if magic != EXTENDED_REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    let h = RequestHeader {
        flags: be_u16(&b[4..6]),
        cmd: be_u16(&b[6..8]),
        cookie: be_u64(&b[8..16]),
        offset: be_u64(&b[16..24]),
        length: 0,
    };
    Ok((h, be_u64(&b[24..32])))
}

#[cfg(test)]
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
    bytes: [u8; 48],
    len: u8,
}

impl ReplyHeader {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn new(parts: &[&[u8]]) -> Self {
        let mut h = ReplyHeader { bytes: [0; 48], len: 0 };
        for p in parts {
            h.append(p);
        }
        h
    }

    fn append(&mut self, p: &[u8]) {
        let start = self.len as usize;
        self.bytes[start..start + p.len()].copy_from_slice(p);
        self.len += p.len() as u8;
    }
}

/// Simple reply: magic, error, cookie. Followed by read data on success of a READ.
pub fn simple_reply(cookie: u64, nbd_error: u32) -> ReplyHeader {
    ReplyHeader::new(&[&SIMPLE_REPLY_MAGIC.to_be_bytes(), &nbd_error.to_be_bytes(), &cookie.to_be_bytes()])
}

/// Whom a structured chunk answers, and in which framing: compact
/// structured replies, or extended headers (which repeat the request's
/// offset and carry 64-bit lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub cookie: u64,
    pub offset: u64,
    pub extended: bool,
}

fn chunk(to: &ReplyTo, done: bool, ty: u16, payload_len: u64, extra: &[&[u8]]) -> ReplyHeader {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut h = if to.extended {
        ReplyHeader::new(&[
            &EXTENDED_REPLY_MAGIC.to_be_bytes(),
            &flags.to_be_bytes(),
            &ty.to_be_bytes(),
            &to.cookie.to_be_bytes(),
            &to.offset.to_be_bytes(),
            &payload_len.to_be_bytes(),
        ])
    } else {
        ReplyHeader::new(&[
            &STRUCTURED_REPLY_MAGIC.to_be_bytes(),
            &flags.to_be_bytes(),
            &ty.to_be_bytes(),
            &to.cookie.to_be_bytes(),
            &(payload_len as u32).to_be_bytes(),
        ])
    };
    for p in extra {
        h.append(p);
    }
    h
}

/// NBD_REPLY_TYPE_OFFSET_DATA chunk header; `data_len` bytes of data follow.
pub fn data_chunk(to: &ReplyTo, done: bool, offset: u64, data_len: u32) -> ReplyHeader {
    chunk(to, done, REPLY_TYPE_OFFSET_DATA, 8 + data_len as u64, &[&offset.to_be_bytes()])
}

/// NBD_REPLY_TYPE_OFFSET_HOLE chunk: `len` bytes of zeroes at `offset`.
pub fn hole_chunk(to: &ReplyTo, done: bool, offset: u64, len: u32) -> ReplyHeader {
    chunk(to, done, REPLY_TYPE_OFFSET_HOLE, 12, &[&offset.to_be_bytes(), &len.to_be_bytes()])
}

/// Final block status chunk header for one context; the descriptors from
/// [`block_descriptors`] follow (8 bytes each, 16 with extended headers).
pub fn block_status(to: &ReplyTo, context_id: u32, count: usize) -> ReplyHeader {
    if to.extended {
        let len = 8 + 16 * count as u64;
        chunk(to, true, REPLY_TYPE_BLOCK_STATUS_EXT, len, &[&context_id.to_be_bytes(), &(count as u32).to_be_bytes()])
    } else {
        chunk(to, true, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * count as u64, &[&context_id.to_be_bytes()])
    }
}

/// Block status descriptors: (length, NBD_STATE_* flags) pairs.
pub fn block_descriptors(extents: &[(u32, u32)], extended: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 * extents.len());
    for &(len, flags) in extents {
        if extended {
            v.extend_from_slice(&(len as u64).to_be_bytes());
            v.extend_from_slice(&(flags as u64).to_be_bytes());
        } else {
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
        }
    }
    v
}

/// Final NBD_REPLY_TYPE_NONE chunk: success with nothing to say.
pub fn done_chunk(to: &ReplyTo) -> ReplyHeader {
    chunk(to, true, REPLY_TYPE_NONE, 0, &[])
}

/// Final NBD_REPLY_TYPE_ERROR chunk with an empty message.
pub fn error_chunk(to: &ReplyTo, nbd_error: u32) -> ReplyHeader {
    chunk(to, true, REPLY_TYPE_ERROR, 6, &[&nbd_error.to_be_bytes(), &0u16.to_be_bytes()])
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
        let h =
            RequestHeader { flags: 1, cmd: CMD_WRITE, cookie: 0xdead_beef_0102_0304, offset: 1 << 40, length: 4096 };
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
        let r = data_chunk(&ReplyTo { cookie: 9, offset: 0, extended: false }, true, 512, 4096);
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
        let b = error_chunk(&ReplyTo { cookie: 3, offset: 0, extended: false }, NBD_EIO);
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

    #[test]
    fn extended_chunk_layout() {
        let to = ReplyTo { cookie: 5, offset: 1 << 33, extended: true };
        let h = data_chunk(&to, true, 1 << 33, 4096);
        let b = h.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(be_u32(&b[0..4]), EXTENDED_REPLY_MAGIC);
        assert_eq!(be_u16(&b[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&b[6..8]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u64(&b[8..16]), 5);
        assert_eq!(be_u64(&b[16..24]), 1 << 33);
        assert_eq!(be_u64(&b[24..32]), 8 + 4096);
        assert_eq!(be_u64(&b[32..40]), 1 << 33);
        let bs = block_status(&to, 1, 2);
        assert_eq!(be_u16(&bs.as_bytes()[6..8]), REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(be_u64(&bs.as_bytes()[24..32]), 8 + 32);
        assert_eq!(be_u32(&bs.as_bytes()[36..40]), 2);
        assert_eq!(block_descriptors(&[(7, 3)], true), [0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(done_chunk(&to).as_bytes().len(), 32);
    }

    #[test]
    fn extended_request_decodes_64_bit_lengths() {
        let mut b = [0u8; EXTENDED_REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_TRIM.to_be_bytes());
        b[8..16].copy_from_slice(&77u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..32].copy_from_slice(&(5u64 << 32).to_be_bytes());
        let (h, len) = decode_extended_request(&b).unwrap();
        assert_eq!((h.cmd, h.cookie, h.offset, len), (CMD_TRIM, 77, 4096, 5 << 32));
        b[0] ^= 1;
        assert!(decode_extended_request(&b).is_err());
    }
}
