//! The transmission phase, client to server: framing and validation of
//! requests, sans-IO. Replies are built with [`super::codec`].

use super::codec::{
    EXTENDED_REQUEST_HEADER_LEN, REQUEST_HEADER_LEN, RequestHeader, decode_extended_request, decode_request,
};
use super::consts::*;

/// How the export handles FUA, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuaMode {
    None,
    /// The library flushes after the write and replies once the flush is done.
    Emulate,
    /// The plugin honours the flag itself.
    Native,
}

/// What an export can do, computed once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportCaps {
    pub size: u64,
    pub writable: bool,
    pub can_flush: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_cache: bool,
    pub can_multi_conn: bool,
    pub can_fast_zero: bool,
    pub fua: FuaMode,
    /// Minimum, preferred and maximum block size.
    pub block_size: (u32, u32, u32),
    /// Negotiated in the handshake: structured replies, and whether the
    /// client selected base:allocation (so may send BLOCK_STATUS).
    pub structured_replies: bool,
    pub base_allocation: bool,
    /// 32-byte requests with 64-bit lengths, extended reply headers.
    pub extended_headers: bool,
}

impl ExportCaps {
    /// The transmission flags that advertise exactly these capabilities.
    pub fn transmission_flags(&self) -> u16 {
        // NBD_FLAG_SEND_DF is added by the handshake once structured replies are agreed.
        let mut f = FLAG_HAS_FLAGS;
        if !self.writable {
            f |= FLAG_READ_ONLY;
        }
        if self.can_flush {
            f |= FLAG_SEND_FLUSH;
        }
        if self.writable && self.fua != FuaMode::None {
            f |= FLAG_SEND_FUA;
        }
        if self.writable && self.can_trim {
            f |= FLAG_SEND_TRIM;
        }
        if self.writable && self.can_zero {
            f |= FLAG_SEND_WRITE_ZEROES;
        }
        if self.can_multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        if self.can_cache {
            f |= FLAG_SEND_CACHE;
        }
        if self.writable && self.can_zero && self.can_fast_zero {
            f |= FLAG_SEND_FAST_ZERO;
        }
        f
    }
}

/// A request that passed validation, with its payload if it is a WRITE.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub header: RequestHeader,
    pub payload: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Request(Request),
    /// Answer `cookie` with this NBD error; any payload was already consumed.
    Reject {
        header: RequestHeader,
        error: u32,
    },
    /// NBD_CMD_DISC: finish what is in flight, then close.
    Disconnect,
    /// Unrecoverable framing error: drop the connection.
    Fatal(&'static str),
}

enum State {
    Header {
        buf: [u8; EXTENDED_REQUEST_HEADER_LEN],
        have: usize,
    },
    /// `buf` is a reused buffer, or else zeroed memory from calloc, so
    /// only the pages the client's bytes land on become resident: a client
    /// that stalls mid-payload holds what it sent (or memory that was
    /// resident already), not what it claimed.
    Payload {
        header: RequestHeader,
        buf: Vec<u8>,
        have: usize,
    },
    Discard {
        header: RequestHeader,
        error: u32,
        remaining: u64,
    },
}

/// Where WRITE payload buffers come from.
pub trait PayloadBuffers {
    /// A zero-filled or reused buffer of at least `len` bytes.
    fn take(&mut self, len: usize) -> Vec<u8>;
}

/// Fresh zeroed buffers, allocated for each payload.
#[cfg(test)]
pub struct Fresh;

#[cfg(test)]
impl PayloadBuffers for Fresh {
    fn take(&mut self, len: usize) -> Vec<u8> {
        vec![0; len]
    }
}

/// Splits the client's byte stream into requests and checks each one.
pub struct RequestReader {
    state: State,
    caps: ExportCaps,
}

impl RequestReader {
    pub fn new(caps: ExportCaps) -> Self {
        RequestReader { state: State::Header { buf: [0; EXTENDED_REQUEST_HEADER_LEN], have: 0 }, caps }
    }

    /// Consumes bytes until one event is complete (or input runs out).
    /// A WRITE payload is received into a buffer from `buffers`.
    pub fn feed(&mut self, input: &[u8], buffers: &mut impl PayloadBuffers) -> (usize, Option<Event>) {
        let mut used = 0;
        loop {
            match &mut self.state {
                State::Header { buf, have } => {
                    let need =
                        if self.caps.extended_headers { EXTENDED_REQUEST_HEADER_LEN } else { REQUEST_HEADER_LEN };
                    let take = (need - *have).min(input.len() - used);
                    buf[*have..*have + take].copy_from_slice(&input[used..used + take]);
                    *have += take;
                    used += take;
                    if *have < need {
                        return (used, None);
                    }
                    *have = 0;
                    let event = if self.caps.extended_headers {
                        let b: &[u8; EXTENDED_REQUEST_HEADER_LEN] = buf;
                        match decode_extended_request(b) {
                            Ok((h, length)) => self.on_extended_header(h, length, buffers),
                            Err(_) => return (used, Some(Event::Fatal("bad request magic"))),
                        }
                    } else {
                        let b: &[u8; REQUEST_HEADER_LEN] = (&buf[..REQUEST_HEADER_LEN]).try_into().expect("prefix");
                        match decode_request(b) {
                            Ok(h) => self.on_header(h, buffers),
                            Err(_) => return (used, Some(Event::Fatal("bad request magic"))),
                        }
                    };
                    if let Some(event) = event {
                        return (used, Some(event));
                    }
                }
                State::Payload { buf, have, .. } => {
                    let take = (buf.len() - *have).min(input.len() - used);
                    buf[*have..*have + take].copy_from_slice(&input[used..used + take]);
                    *have += take;
                    used += take;
                    return (used, self.payload_complete());
                }
                State::Discard { header, error, remaining } => {
                    let take = (input.len() - used).min(*remaining as usize);
                    *remaining -= take as u64;
                    used += take;
                    if *remaining > 0 {
                        return (used, None);
                    }
                    let event = Event::Reject { header: *header, error: *error };
                    self.state = State::Header { buf: [0; EXTENDED_REQUEST_HEADER_LEN], have: 0 };
                    return (used, Some(event));
                }
            }
        }
    }

    /// Bytes received so far of a WRITE payload still coming in.
    pub fn payload_buffered(&self) -> usize {
        match &self.state {
            State::Payload { have, .. } => *have,
            _ => 0,
        }
    }

    /// True while a WRITE payload is being received.
    pub fn receiving_payload(&self) -> bool {
        matches!(self.state, State::Payload { .. })
    }

    /// While a WRITE payload is being received, the part still missing, so
    /// the caller can read from the socket straight into it.
    pub fn payload_space(&mut self) -> Option<&mut [u8]> {
        match &mut self.state {
            State::Payload { buf, have, .. } => Some(&mut buf[*have..]),
            _ => None,
        }
    }

    /// Records `n` bytes written into [`Self::payload_space`].
    pub fn payload_filled(&mut self, n: usize) -> Option<Event> {
        if let State::Payload { have, .. } = &mut self.state {
            *have += n;
        }
        self.payload_complete()
    }

    fn payload_complete(&mut self) -> Option<Event> {
        let State::Payload { buf, have, .. } = &self.state else { return None };
        if *have < buf.len() {
            return None;
        }
        let fresh = State::Header { buf: [0; EXTENDED_REQUEST_HEADER_LEN], have: 0 };
        let State::Payload { header, buf, .. } = std::mem::replace(&mut self.state, fresh) else { unreachable!() };
        Some(Event::Request(Request { header, payload: buf }))
    }

    /// An extended header: lengths are 64-bit, and PAYLOAD_LEN says a
    /// payload follows. Our plugin API counts in 32 bits; a block-status
    /// length is a hint and is capped, anything else longer is refused.
    fn on_extended_header(
        &mut self,
        mut h: RequestHeader,
        length: u64,
        buffers: &mut impl PayloadBuffers,
    ) -> Option<Event> {
        let payload = h.cmd == CMD_WRITE || h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if h.cmd == CMD_WRITE {
            h.flags &= !CMD_FLAG_PAYLOAD_LEN; // it only restates the length
        }
        let refuse = |state: &mut State, mut h: RequestHeader| {
            h.length = length.min(u32::MAX as u64) as u32;
            if payload {
                *state = State::Discard { header: h, error: NBD_EINVAL, remaining: length };
                None
            } else {
                Some(Event::Reject { header: h, error: NBD_EINVAL })
            }
        };
        if payload && length > self.caps.block_size.2 as u64 {
            // Skipping it could mean reading terabytes; the spec says to hang up.
            return Some(Event::Fatal("request payload longer than the maximum block size"));
        }
        if h.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            return refuse(&mut self.state, h); // no block-status filters here
        }
        h.length = match u32::try_from(length) {
            Ok(l) => l,
            Err(_) if h.cmd == CMD_BLOCK_STATUS => u32::MAX,
            Err(_) => return refuse(&mut self.state, h),
        };
        self.on_header(h, buffers)
    }

    fn on_header(&mut self, header: RequestHeader, buffers: &mut impl PayloadBuffers) -> Option<Event> {
        log::debug!(
            "request {} cookie={:#x} offset={} length={} flags={:#x}",
            cmd_name(header.cmd),
            header.cookie,
            header.offset,
            header.length,
            header.flags
        );
        if header.cmd == CMD_DISC {
            return Some(Event::Disconnect);
        }
        let payload_len = if header.cmd == CMD_WRITE { header.length as u64 } else { 0 };
        match validate(&header, &self.caps) {
            Ok(()) if payload_len == 0 => Some(Event::Request(Request { header, payload: Vec::new() })),
            Ok(()) => {
                // A reused buffer is larger; it gets its size back when it
                // returns to the pool.
                let mut buf = buffers.take(payload_len as usize);
                buf.truncate(payload_len as usize);
                self.state = State::Payload { header, buf, have: 0 };
                None
            }
            Err(error) if payload_len == 0 => Some(Event::Reject { header, error }),
            Err(error) => {
                // Skip the payload without buffering it, then answer.
                self.state = State::Discard { header, error, remaining: payload_len };
                None
            }
        }
    }
}

/// Checks a request against the spec and the export; the error is an NBD errno.
pub fn validate(h: &RequestHeader, caps: &ExportCaps) -> Result<(), u32> {
    let writes = matches!(h.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && !caps.writable {
        return Err(NBD_EPERM);
    }
    let known = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if h.flags & !known != 0 {
        return Err(NBD_EINVAL);
    }
    let only_for = |flag: u16, cmd: u16| h.flags & flag == 0 || h.cmd == cmd;
    if !only_for(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES)
        || !only_for(CMD_FLAG_DF, CMD_READ)
        || !only_for(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS)
        || !only_for(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES)
    {
        return Err(NBD_EINVAL);
    }
    if h.flags & CMD_FLAG_FAST_ZERO != 0 && !caps.can_fast_zero {
        return Err(NBD_EINVAL);
    }
    if h.flags & CMD_FLAG_DF != 0 && !caps.structured_replies {
        return Err(NBD_EINVAL);
    }
    if h.flags & CMD_FLAG_FUA != 0 && (caps.fua == FuaMode::None || !caps.writable) {
        return Err(NBD_EINVAL);
    }
    let supported = match h.cmd {
        CMD_READ | CMD_WRITE => true,
        CMD_FLUSH => caps.can_flush,
        CMD_TRIM => caps.can_trim,
        CMD_WRITE_ZEROES => caps.can_zero,
        CMD_CACHE => caps.can_cache,
        CMD_BLOCK_STATUS => caps.base_allocation,
        _ => false,
    };
    if !supported {
        return Err(NBD_EINVAL);
    }
    if h.cmd == CMD_FLUSH {
        return if h.offset == 0 && h.length == 0 { Ok(()) } else { Err(NBD_EINVAL) };
    }
    if h.length == 0 {
        return Err(NBD_EINVAL);
    }
    let (min_block, _, max_block) = caps.block_size;
    if matches!(h.cmd, CMD_READ | CMD_WRITE) && h.length > max_block {
        return Err(NBD_EINVAL);
    }
    if min_block > 1 && (h.offset % min_block as u64 != 0 || h.length % min_block != 0) {
        return Err(NBD_EINVAL);
    }
    let in_range = h.offset.checked_add(h.length as u64).is_some_and(|end| end <= caps.size);
    if !in_range {
        return Err(if matches!(h.cmd, CMD_WRITE | CMD_WRITE_ZEROES) { NBD_ENOSPC } else { NBD_EINVAL });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::codec::encode_request;
    use super::*;

    const MAX_BLOCK: u32 = 64 << 20;

    fn caps() -> ExportCaps {
        ExportCaps {
            size: 1 << 20,
            writable: true,
            can_flush: true,
            can_trim: true,
            can_zero: true,
            can_cache: false,
            can_multi_conn: false,
            can_fast_zero: false,
            fua: FuaMode::Emulate,
            block_size: (1, 4096, MAX_BLOCK),
            structured_replies: false,
            base_allocation: false,
            extended_headers: false,
        }
    }

    fn hdr(cmd: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, cmd, cookie: 42, offset, length }
    }

    #[test]
    fn validation_follows_the_spec() {
        let c = caps();
        let ro = ExportCaps { writable: false, ..c };
        let cases = [
            (hdr(CMD_READ, 0, 0, 4096), &c, Ok(())),
            (hdr(CMD_READ, 0, (1 << 20) - 1, 2), &c, Err(NBD_EINVAL)),
            (hdr(CMD_READ, 0, u64::MAX, 2), &c, Err(NBD_EINVAL)),
            (hdr(CMD_READ, 0, 0, 0), &c, Err(NBD_EINVAL)),
            (hdr(CMD_READ, 0, 0, MAX_BLOCK + 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_WRITE, 0, 0, MAX_BLOCK + 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &ro, Err(NBD_EPERM)),
            (hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &ExportCaps { structured_replies: true, ..c }, Ok(())),
            (hdr(CMD_WRITE, 0, 1 << 20, 1), &c, Err(NBD_ENOSPC)),
            (hdr(CMD_WRITE, 0, u64::MAX - 1, 4), &c, Err(NBD_ENOSPC)),
            (hdr(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &c, Ok(())),
            (hdr(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &ExportCaps { fua: FuaMode::None, ..c }, Err(NBD_EINVAL)),
            (hdr(CMD_WRITE, 0, 0, 1), &ro, Err(NBD_EPERM)),
            (hdr(CMD_TRIM, 0, 0, 1), &ro, Err(NBD_EPERM)),
            (hdr(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, u32::MAX), &ExportCaps { size: u64::MAX, ..c }, Ok(())),
            (hdr(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &c, Err(NBD_ENOSPC)),
            (hdr(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_TRIM, 0, 0, 1), &ExportCaps { can_trim: false, ..c }, Err(NBD_EINVAL)),
            (hdr(CMD_FLUSH, 0, 0, 0), &ro, Ok(())),
            (hdr(CMD_FLUSH, 0, 1, 0), &c, Err(NBD_EINVAL)),
            (hdr(CMD_CACHE, 0, 0, 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_BLOCK_STATUS, 0, 0, 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1), &ExportCaps { base_allocation: true, ..c }, Ok(())),
            (hdr(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &ExportCaps { base_allocation: true, ..c }, Err(NBD_EINVAL)),
            (hdr(CMD_BLOCK_STATUS, 0, 0, 0), &ExportCaps { base_allocation: true, ..c }, Err(NBD_EINVAL)),
            (hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &ExportCaps { can_fast_zero: true, ..c }, Ok(())),
            (hdr(CMD_TRIM, CMD_FLAG_FAST_ZERO, 0, 1), &ExportCaps { can_fast_zero: true, ..c }, Err(NBD_EINVAL)),
            (hdr(CMD_READ, 0, 512, 4096), &ExportCaps { block_size: (512, 4096, 65536), ..c }, Ok(())),
            (hdr(CMD_READ, 0, 256, 4096), &ExportCaps { block_size: (512, 4096, 65536), ..c }, Err(NBD_EINVAL)),
            (hdr(CMD_WRITE, 0, 0, 1000), &ExportCaps { block_size: (512, 4096, 65536), ..c }, Err(NBD_EINVAL)),
            (hdr(CMD_READ, 0, 0, 131072), &ExportCaps { block_size: (512, 4096, 65536), ..c }, Err(NBD_EINVAL)),
            (hdr(CMD_FLUSH, 0, 0, 0), &ExportCaps { block_size: (512, 4096, 65536), ..c }, Ok(())),
            (hdr(99, 0, 0, 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_READ, 1 << 9, 0, 1), &c, Err(NBD_EINVAL)),
            (hdr(CMD_READ, CMD_FLAG_REQ_ONE, 0, 1), &c, Err(NBD_EINVAL)),
        ];
        for (h, caps, want) in cases {
            assert_eq!(validate(&h, caps), want, "{h:?}");
        }
    }

    #[test]
    fn write_payload_split_across_feeds() {
        let mut r = RequestReader::new(caps());
        let mut input = encode_request(&hdr(CMD_WRITE, 0, 0, 5)).to_vec();
        input.extend_from_slice(b"hello");
        input.extend_from_slice(&encode_request(&hdr(CMD_FLUSH, 0, 0, 0)));
        let (used, ev) = r.feed(&input[..30], &mut Fresh);
        assert_eq!((used, ev), (30, None));
        assert_eq!(r.payload_space().unwrap().len(), 3);
        let (used, ev) = r.feed(&input[30..], &mut Fresh);
        assert_eq!(used, 3);
        match ev {
            Some(Event::Request(req)) => assert_eq!(req.payload, b"hello"),
            other => panic!("{other:?}"),
        }
        let (used, ev) = r.feed(&input[33..], &mut Fresh);
        assert_eq!(used, 28);
        assert!(matches!(ev, Some(Event::Request(Request { header: RequestHeader { cmd: CMD_FLUSH, .. }, .. }))));
    }

    #[test]
    fn direct_payload_fill() {
        let mut r = RequestReader::new(caps());
        let (_, ev) = r.feed(&encode_request(&hdr(CMD_WRITE, 0, 0, 4)), &mut Fresh);
        assert_eq!(ev, None);
        r.payload_space().unwrap()[..4].copy_from_slice(b"abcd");
        match r.payload_filled(4) {
            Some(Event::Request(req)) => assert_eq!(req.payload, b"abcd"),
            other => panic!("{other:?}"),
        }
        assert!(r.payload_space().is_none());
    }

    #[test]
    fn invalid_write_payload_is_consumed_not_buffered() {
        let mut r = RequestReader::new(ExportCaps { writable: false, ..caps() });
        let mut input = encode_request(&hdr(CMD_WRITE, 0, 0, 1 << 30)).to_vec();
        input.extend(vec![0u8; 4096]);
        let (used, ev) = r.feed(&input, &mut Fresh);
        assert_eq!((used, ev), (input.len(), None));
        assert!(r.payload_space().is_none());
        let rest = vec![0u8; (1 << 30) - 4096];
        let (used, ev) = r.feed(&rest, &mut Fresh);
        assert_eq!(used, rest.len());
        assert!(matches!(ev, Some(Event::Reject { error: NBD_EPERM, .. })));
    }

    #[test]
    fn bad_magic_and_disc() {
        let mut r = RequestReader::new(caps());
        let (_, ev) = r.feed(&encode_request(&hdr(CMD_DISC, 0, 0, 0)), &mut Fresh);
        assert_eq!(ev, Some(Event::Disconnect));
        let mut b = encode_request(&hdr(CMD_READ, 0, 0, 1));
        b[3] = 0;
        let (_, ev) = r.feed(&b, &mut Fresh);
        assert_eq!(ev, Some(Event::Fatal("bad request magic")));
    }

    #[test]
    fn flags_reflect_caps() {
        let c = caps();
        let f = c.transmission_flags();
        assert_eq!(f & FLAG_READ_ONLY, 0);
        assert_ne!(f & FLAG_SEND_FUA, 0);
        assert_eq!(f & FLAG_SEND_CACHE, 0);
        let ro = ExportCaps { writable: false, ..c }.transmission_flags();
        assert_ne!(ro & FLAG_READ_ONLY, 0);
        assert_eq!(ro & (FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    }
}
