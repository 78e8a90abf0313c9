//! Randomized robustness tests for the sans-IO parsers: mutated and random
//! byte streams, fed in random-sized pieces, must never panic, never buffer
//! more than the limits allow, and never stall (every byte is consumed or
//! the stream is refused).
//!
//! `cargo test` runs a short pass; `make fuzz` sets NBDKIT_ASYNC_FUZZ_ITERATIONS
//! for a long one.

use super::codec::{RequestHeader, encode_request};
use super::consts::*;
use super::handshake::{ExportInfo, ExportResolver, Handshake, MAX_OPTION_LEN, Outcome, Purpose, Refusal, TlsMode};
use super::transmission::{Event, ExportCaps, Fresh, FuaMode, RequestReader};

/// xorshift64*: tiny, deterministic, good enough to shake a parser.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn iterations() -> usize {
    std::env::var("NBDKIT_ASYNC_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

/// Flips, inserts, deletes or overwrites a few bytes.
fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        let len = v.len().max(1);
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let at = rng.below(len);
                let n = rng.below(40);
                let extra = rng.bytes(n);
                v.splice(at.min(v.len())..at.min(v.len()), extra);
            }
            2 if !v.is_empty() => {
                let i = rng.below(len);
                let n = rng.below(16).min(v.len() - i);
                v.drain(i..i + n);
            }
            3 if v.len() >= 4 => {
                // Big-endian length fields are where parsers go wrong.
                let i = rng.below(v.len() - 3);
                let w = [0u32, 1, 0xffff_ffff, MAX_OPTION_LEN, MAX_OPTION_LEN + 1, 4096, 4097][rng.below(7)];
                v[i..i + 4].copy_from_slice(&w.to_be_bytes());
            }
            _ => v.truncate(rng.below(len)),
        }
    }
    v
}

struct AnyExport;

impl ExportResolver for AnyExport {
    fn resolve(&mut self, name: &str, _: Purpose) -> Result<ExportInfo, Refusal> {
        if name.len() > 10 {
            return Err(REP_ERR_UNKNOWN.into());
        }
        Ok(ExportInfo {
            name: name.into(),
            description: None,
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS,
            block_size: (1, 4096, 1 << 25),
        })
    }
    fn list(&mut self) -> Vec<(String, String)> {
        vec![("a".into(), "b".into())]
    }
    fn contexts(&mut self, name: &str) -> Result<Vec<(u32, &'static str)>, u32> {
        if name.len() > 10 {
            return Err(REP_ERR_UNKNOWN);
        }
        Ok(vec![(CONTEXT_BASE_ALLOCATION_ID, CONTEXT_BASE_ALLOCATION)])
    }
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn valid_handshake(rng: &mut Rng) -> Vec<u8> {
    let mut v = (CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes().to_vec();
    let mut go = 1u32.to_be_bytes().to_vec();
    go.push(b'x');
    go.extend_from_slice(&2u16.to_be_bytes());
    go.extend_from_slice(&INFO_NAME.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let choices = [
        option(OPT_STRUCTURED_REPLY, &[]),
        option(OPT_LIST, &[]),
        option(OPT_INFO, &go),
        option(99, &rng.bytes(10)),
        option(OPT_STARTTLS, &[]),
        option(OPT_SET_META_CONTEXT, b"\0\0\0\x01x\0\0\0\x01\0\0\0\x0fbase:allocation"),
        option(OPT_LIST_META_CONTEXT, b"\0\0\0\0\0\0\0\0"),
    ];
    for _ in 0..rng.below(4) {
        v.extend_from_slice(&choices[rng.below(choices.len())]);
    }
    v.extend(option(
        if rng.below(2) == 0 { OPT_GO } else { OPT_EXPORT_NAME },
        if rng.below(2) == 0 { &go } else { b"x" },
    ));
    v
}

#[test]
fn handshake_survives_mutated_input() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..iterations() {
        let input = if rng.below(4) == 0 {
            let n = rng.below(200);
            rng.bytes(n)
        } else {
            let valid = valid_handshake(&mut rng);
            mutate(&mut rng, valid)
        };
        let mut out = Vec::new();
        let mut hs = Handshake::new(&mut out, TlsMode::Allow);
        let mut pos = 0;
        while pos < input.len() {
            let piece = 1 + rng.below(64);
            let end = (pos + piece).min(input.len());
            let (used, outcome) = hs.feed(&input[pos..end], &mut out, &mut AnyExport);
            assert!(used <= end - pos);
            pos += used;
            match outcome {
                Outcome::NeedMore => assert_eq!(pos, end, "NeedMore must consume all it was given"),
                Outcome::Done(_) | Outcome::Close(_) | Outcome::StartTls => break,
            }
            assert!(hs.buffered() <= MAX_OPTION_LEN as usize + 16);
        }
    }
}

#[test]
fn request_reader_survives_mutated_input() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let caps = ExportCaps {
        size: 1 << 20,
        writable: true,
        can_flush: true,
        can_trim: true,
        can_zero: true,
        can_cache: false,
        can_multi_conn: false,
        can_fast_zero: true,
        fua: FuaMode::Emulate,
        block_size: (1, 4096, 1 << 25),
        structured_replies: true,
        base_allocation: true,
        extended_headers: false,
    };
    for _ in 0..iterations() {
        let mut stream = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let cmd = [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_DISC, 77][rng.below(7)];
            let length = [0u32, 1, 512, 4096, 1 << 20, u32::MAX][rng.below(6)];
            let offset = [0u64, 4096, (1 << 20) - 1, u64::MAX][rng.below(4)];
            let h = RequestHeader { flags: rng.next() as u16 & 0x3f, cmd, cookie: rng.next(), offset, length };
            stream.extend_from_slice(&encode_request(&h));
            if cmd == CMD_WRITE && length <= 4096 {
                let payload = rng.bytes(length as usize);
                stream.extend(payload);
            }
        }
        let mutated = rng.below(3) == 0;
        let stream = if mutated { mutate(&mut rng, stream) } else { stream };
        let mut reader = RequestReader::new(caps);
        let mut pos = 0;
        while pos < stream.len() {
            let end = (pos + 1 + rng.below(100)).min(stream.len());
            let (used, event) = reader.feed(&stream[pos..end], &mut Fresh);
            pos += used;
            match event {
                None => assert_eq!(pos, end, "no event means everything was consumed"),
                Some(Event::Fatal(_)) | Some(Event::Disconnect) => break,
                Some(Event::Request(r)) => {
                    assert!(r.payload.len() <= 1 << 25);
                    assert!(r.header.length > 0 || r.header.cmd == CMD_FLUSH);
                }
                Some(Event::Reject { .. }) => {}
            }
        }
    }
}
