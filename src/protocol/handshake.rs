//! The fixed-newstyle handshake as a sans-IO state machine.
//!
//! Bytes from the client go in through [`Handshake::feed`]; bytes for the
//! client come out in a `Vec` the caller sends. Export look-ups go through
//! [`ExportResolver`], so the machine is driven the same way by a unit
//! test, a socket or a TLS session (STARTTLS included).

use super::codec::{be_u16, be_u32, be_u64, option_reply};
use super::consts::*;

/// Option payloads above this are not buffered: they are skipped and refused.
/// Our largest legitimate option (INFO/GO) is a 4096-byte name plus a few
/// 16-bit info requests.
pub(crate) const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Longest string (export name) the spec allows.
pub(crate) const MAX_STRING_LEN: usize = 4096;
/// Options a client may send before it must pick an export.
pub(crate) const MAX_OPTIONS: u32 = 1024;

/// What the server tells a client about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    /// Transmission flags (NBD_FLAG_*), HAS_FLAGS included.
    pub flags: u16,
    /// Minimum, preferred and maximum block size.
    pub block_size: (u32, u32, u32),
}

/// Why an export is being resolved: INFO only looks, GO keeps it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Info,
    Go,
}

/// Why an export was refused: an NBD_REP_ERR_* code, and the text the
/// client shows its user (may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u32,
    pub message: String,
}

impl From<u32> for Refusal {
    fn from(code: u32) -> Refusal {
        Refusal { code, message: String::new() }
    }
}

/// The server side of export selection, implemented by the connection.
pub trait ExportResolver {
    /// Resolves `name` (`""` is the default export).
    fn resolve(&mut self, name: &str, purpose: Purpose) -> Result<ExportInfo, Refusal>;
    /// Every export as (name, description), for NBD_OPT_LIST.
    fn list(&mut self) -> Vec<(String, String)>;
    /// The meta contexts export `name` offers, as (id, name), or an
    /// NBD_REP_ERR_* code if there is no such export.
    fn contexts(&mut self, name: &str) -> Result<Vec<(u32, &'static str)>, u32>;
}

/// What the client and server agreed on when the handshake ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub structured_replies: bool,
    /// Meta context ids selected with NBD_OPT_SET_META_CONTEXT for this export.
    pub contexts: Vec<u32>,
    /// 32-byte requests with 64-bit lengths, and extended reply headers.
    pub extended_headers: bool,
}

/// Whether clients may, or must, switch to TLS with NBD_OPT_STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    #[default]
    Off,
    Allow,
    Require,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Feed more bytes.
    NeedMore,
    /// Send what is in `out` in plaintext, then switch the transport to
    /// TLS (call [`Handshake::tls_started`]); later bytes are ciphertext.
    StartTls,
    /// Transmission starts; bytes after the consumed count are requests.
    Done(Negotiated),
    /// Send what is in `out`, then close the connection.
    Close(&'static str),
}

#[derive(Debug)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        opt: u32,
        len: usize,
    },
    /// Skipping an option we will not buffer; `refusal` is sent once it is
    /// consumed (an ACK, then a close, for NBD_OPT_ABORT).
    Discard {
        opt: u32,
        remaining: u64,
        refusal: u32,
    },
    Finished,
}

pub struct Handshake {
    state: State,
    buf: Vec<u8>,
    no_zeroes: bool,
    structured_replies: bool,
    extended_headers: bool,
    options_seen: u32,
    shutting_down: bool,
    /// The last NBD_OPT_SET_META_CONTEXT: its export and the ids chosen.
    selected: Option<(String, Vec<u32>)>,
    tls: TlsMode,
    tls_active: bool,
}

impl Handshake {
    /// Starts a handshake, writing the server greeting to `out`.
    pub fn new(out: &mut Vec<u8>, tls: TlsMode) -> Self {
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            state: State::ClientFlags,
            buf: Vec::with_capacity(16),
            no_zeroes: false,
            structured_replies: false,
            extended_headers: false,
            options_seen: 0,
            shutting_down: false,
            selected: None,
            tls,
            tls_active: false,
        }
    }

    /// The transport is TLS now. Everything negotiated before is forgotten,
    /// as the spec requires: a man in the middle may have written it.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured_replies = false;
        self.extended_headers = false;
        self.selected = None;
        self.state = State::OptionHeader;
    }

    /// Plaintext options are refused until the client starts TLS.
    fn tls_required(&self) -> bool {
        self.tls == TlsMode::Require && !self.tls_active
    }

    /// Bytes held while waiting for the rest of a message.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.buf.capacity()
    }

    /// The server is stopping: options still to come are refused with
    /// NBD_REP_ERR_SHUTDOWN.
    pub fn shutting_down(&mut self) {
        self.shutting_down = true;
    }

    /// Consumes bytes from `input` until the handshake needs more, ends or
    /// fails. Returns how many bytes were used: after `Done`, the rest of
    /// `input` belongs to the transmission phase.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, exports: &mut dyn ExportResolver) -> (usize, Outcome) {
        let mut used = 0;
        loop {
            if let State::Discard { opt, remaining, refusal } = self.state {
                let n = (input.len() - used).min(remaining as usize) as u64;
                used += n as usize;
                if n < remaining {
                    self.state = State::Discard { opt, remaining: remaining - n, refusal };
                    return (used, Outcome::NeedMore);
                }
                log::debug!("{}: answered {}", opt_name(opt), rep_name(refusal));
                option_reply(out, opt, refusal, &[]);
                if opt == OPT_ABORT {
                    self.state = State::Finished;
                    return (used, Outcome::Close("client sent NBD_OPT_ABORT"));
                }
                self.state = State::OptionHeader;
                continue;
            }
            let need = match self.state {
                State::ClientFlags => 4,
                State::OptionHeader => 16,
                State::OptionData { len, .. } => len,
                State::Finished => return (used, Outcome::Close("input after handshake end")),
                State::Discard { .. } => unreachable!(),
            };
            let take = (need - self.buf.len()).min(input.len() - used);
            self.buf.extend_from_slice(&input[used..used + take]);
            used += take;
            if self.buf.len() < need {
                return (used, Outcome::NeedMore);
            }
            let msg = std::mem::take(&mut self.buf);
            let outcome = self.step(&msg, out, exports);
            self.buf = msg;
            self.buf.clear();
            if let Some(outcome) = outcome {
                if matches!(outcome, Outcome::Done(_) | Outcome::Close(_)) {
                    self.state = State::Finished;
                }
                return (used, outcome);
            }
        }
    }

    /// Handles one complete message; `None` means keep going.
    fn step(&mut self, msg: &[u8], out: &mut Vec<u8>, exports: &mut dyn ExportResolver) -> Option<Outcome> {
        match self.state {
            State::ClientFlags => {
                let flags = be_u32(msg);
                if flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
                    return Some(Outcome::Close("unknown client flags"));
                }
                // A client without FIXED_NEWSTYLE is served as if it had set
                // it (the spec allows this): it only differs on options such
                // a client does not send.
                self.no_zeroes = flags & CLIENT_FLAG_NO_ZEROES != 0;
                self.state = State::OptionHeader;
                None
            }
            State::OptionHeader => {
                if be_u64(&msg[0..8]) != IHAVEOPT {
                    return Some(Outcome::Close("bad option magic"));
                }
                self.options_seen += 1;
                if self.options_seen > MAX_OPTIONS {
                    return Some(Outcome::Close("too many options"));
                }
                let opt = be_u32(&msg[8..12]);
                let len = be_u32(&msg[12..16]);
                log::debug!("client option {} ({} bytes)", opt_name(opt), len);
                if opt == OPT_ABORT {
                    // Any data is ignored; the answer is always an ACK.
                    self.state = State::Discard { opt, remaining: len as u64, refusal: REP_ACK };
                    return None;
                }
                if self.shutting_down {
                    if opt == OPT_EXPORT_NAME {
                        return Some(Outcome::Close("server shutting down"));
                    }
                    self.state = State::Discard { opt, remaining: len as u64, refusal: REP_ERR_SHUTDOWN };
                    return None;
                }
                if self.tls_required() && opt != OPT_STARTTLS {
                    if opt == OPT_EXPORT_NAME {
                        return Some(Outcome::Close("NBD_OPT_EXPORT_NAME without the TLS this server requires"));
                    }
                    // Not even the export list is revealed in plaintext.
                    self.state = State::Discard { opt, remaining: len as u64, refusal: REP_ERR_TLS_REQD };
                    return None;
                }
                if !is_known_option(opt) || len > MAX_OPTION_LEN {
                    if opt == OPT_EXPORT_NAME {
                        return Some(Outcome::Close("NBD_OPT_EXPORT_NAME name too long"));
                    }
                    let refusal = if is_known_option(opt) { REP_ERR_TOO_BIG } else { REP_ERR_UNSUP };
                    self.state = State::Discard { opt, remaining: len as u64, refusal };
                    return None;
                }
                self.state = State::OptionData { opt, len: len as usize };
                if len == 0 {
                    // No payload to wait for: handle it now.
                    return self.step(&[], out, exports);
                }
                None
            }
            State::OptionData { opt, .. } => {
                self.state = State::OptionHeader;
                self.option(opt, msg, out, exports)
            }
            State::Discard { .. } | State::Finished => unreachable!(),
        }
    }

    fn option(
        &mut self,
        opt: u32,
        data: &[u8],
        out: &mut Vec<u8>,
        exports: &mut dyn ExportResolver,
    ) -> Option<Outcome> {
        let reply_err = |out: &mut Vec<u8>, err: u32| {
            log::debug!("{}: {}", opt_name(opt), rep_name(err));
            option_reply(out, opt, err, &[]);
            None
        };
        match opt {
            OPT_EXPORT_NAME => {
                let Some(name) = parse_string(data) else {
                    return Some(Outcome::Close("NBD_OPT_EXPORT_NAME with an invalid name"));
                };
                match exports.resolve(name, Purpose::Go) {
                    Ok(mut info) => {
                        self.add_df(&mut info);
                        out.extend_from_slice(&info.size.to_be_bytes());
                        out.extend_from_slice(&info.flags.to_be_bytes());
                        if !self.no_zeroes {
                            out.extend_from_slice(&[0u8; 124]);
                        }
                        Some(self.done(info))
                    }
                    // EXPORT_NAME has no way to report an error but hanging up.
                    Err(_) => Some(Outcome::Close("NBD_OPT_EXPORT_NAME for an export that failed to open")),
                }
            }
            OPT_STARTTLS => {
                if self.tls == TlsMode::Off {
                    return reply_err(out, REP_ERR_UNSUP);
                }
                if self.tls_active || !data.is_empty() {
                    return reply_err(out, REP_ERR_INVALID);
                }
                option_reply(out, opt, REP_ACK, &[]);
                Some(Outcome::StartTls)
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    return reply_err(out, REP_ERR_INVALID);
                }
                // Extended headers carry structured replies with them.
                self.extended_headers = true;
                self.structured_replies = true;
                option_reply(out, opt, REP_ACK, &[]);
                None
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return reply_err(out, REP_ERR_INVALID);
                }
                if self.extended_headers {
                    // Going back to compact headers is not a thing.
                    return reply_err(out, REP_ERR_EXT_HEADER_REQD);
                }
                self.structured_replies = true;
                option_reply(out, opt, REP_ACK, &[]);
                None
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return reply_err(out, REP_ERR_INVALID);
                }
                for (name, description) in exports.list() {
                    let mut payload = Vec::with_capacity(4 + name.len() + description.len());
                    payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    payload.extend_from_slice(name.as_bytes());
                    payload.extend_from_slice(description.as_bytes());
                    option_reply(out, opt, REP_SERVER, &payload);
                }
                option_reply(out, opt, REP_ACK, &[]);
                None
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(data) else {
                    return reply_err(out, REP_ERR_INVALID);
                };
                let purpose = if opt == OPT_GO { Purpose::Go } else { Purpose::Info };
                let mut info = match exports.resolve(name, purpose) {
                    Ok(info) => info,
                    Err(refusal) => {
                        log::debug!("{}: {} {:?}", opt_name(opt), rep_name(refusal.code), refusal.message);
                        // The spec caps strings at 4096 bytes.
                        let text = refusal.message.as_bytes();
                        let cut = text.len().min(4096);
                        let cut = (0..=cut).rev().find(|&i| refusal.message.is_char_boundary(i)).unwrap_or(0);
                        option_reply(out, opt, refusal.code, &text[..cut]);
                        return None;
                    }
                };
                if opt == OPT_GO && info.block_size.0 > 1 && !requests.contains(&INFO_BLOCK_SIZE) {
                    // A client that cannot hear our alignment could not honour it.
                    return reply_err(out, REP_ERR_BLOCK_SIZE_REQD);
                }
                self.add_df(&mut info);
                send_info(out, opt, &info, &requests);
                option_reply(out, opt, REP_ACK, &[]);
                if opt == OPT_GO {
                    // Contexts chosen for another export do not carry over.
                    if self.selected.as_ref().is_some_and(|(export, _)| export != name) {
                        self.selected = None;
                    }
                    Some(self.done(info))
                } else {
                    None
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !self.structured_replies {
                    return reply_err(out, REP_ERR_INVALID);
                }
                let Some((name, queries)) = parse_meta_request(data) else {
                    return reply_err(out, REP_ERR_INVALID);
                };
                let available = match exports.contexts(name) {
                    Ok(c) => c,
                    Err(e) => return reply_err(out, e),
                };
                let chosen: Vec<(u32, &str)> = available
                    .into_iter()
                    .filter(|(_, ctx)| {
                        (queries.is_empty() && !set)
                            || queries
                                .iter()
                                .any(|q| q == ctx || (!set && ctx.split(':').next() == q.strip_suffix(':')))
                    })
                    .collect();
                for (id, ctx) in &chosen {
                    let mut payload = id.to_be_bytes().to_vec();
                    payload.extend_from_slice(ctx.as_bytes());
                    option_reply(out, opt, REP_META_CONTEXT, &payload);
                }
                option_reply(out, opt, REP_ACK, &[]);
                if set {
                    log::debug!("meta contexts selected: {:?}", chosen.iter().map(|c| c.1).collect::<Vec<_>>());
                    self.selected = Some((name.to_string(), chosen.iter().map(|c| c.0).collect()));
                }
                None
            }
            _ => reply_err(out, REP_ERR_UNSUP),
        }
    }

    fn add_df(&self, info: &mut ExportInfo) {
        if self.structured_replies {
            // A read with holes is sent as one chunk when the client asks
            // (zeroes filled in), so DF costs nothing but those bytes.
            info.flags |= FLAG_SEND_DF;
        }
    }

    fn done(&mut self, export: ExportInfo) -> Outcome {
        let contexts = self.selected.take().map(|(_, ids)| ids).unwrap_or_default();
        Outcome::Done(Negotiated {
            export,
            structured_replies: self.structured_replies,
            contexts,
            extended_headers: self.extended_headers,
        })
    }
}

fn is_known_option(opt: u32) -> bool {
    matches!(
        opt,
        OPT_EXPORT_NAME
            | OPT_ABORT
            | OPT_LIST
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_STARTTLS
            | OPT_EXTENDED_HEADERS
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
    )
}

/// A u32-length-prefixed string from the front of `rest`.
fn take_string<'a>(rest: &mut &'a [u8]) -> Option<&'a str> {
    if rest.len() < 4 {
        return None;
    }
    let len = be_u32(&rest[0..4]) as usize;
    if len > rest.len() - 4 {
        return None;
    }
    let s = parse_string(&rest[4..4 + len])?;
    *rest = &rest[4 + len..];
    Some(s)
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT payload: export name, then queries.
fn parse_meta_request(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut rest = data;
    let name = take_string(&mut rest)?;
    if rest.len() < 4 {
        return None;
    }
    let count = be_u32(&rest[0..4]) as usize;
    rest = &rest[4..];
    // Each query takes at least 4 bytes: a lying count is caught here.
    if count > rest.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take_string(&mut rest)?);
    }
    rest.is_empty().then_some((name, queries))
}

/// A whole option payload as a string: valid UTF-8, no NUL, spec-bounded.
fn parse_string(data: &[u8]) -> Option<&str> {
    if data.len() > MAX_STRING_LEN || data.contains(&0) {
        return None;
    }
    std::str::from_utf8(data).ok()
}

/// NBD_OPT_INFO / NBD_OPT_GO payload: name, then a list of NBD_INFO_* requests.
fn parse_info_request(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    if data.len() < 6 {
        return None;
    }
    let name_len = be_u32(&data[0..4]) as usize;
    if name_len > data.len() - 6 {
        return None;
    }
    let name = parse_string(&data[4..4 + name_len])?;
    let rest = &data[4 + name_len..];
    let count = be_u16(&rest[0..2]) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    Some((name, list.chunks(2).map(be_u16).collect()))
}

fn send_info(out: &mut Vec<u8>, opt: u32, info: &ExportInfo, requests: &[u16]) {
    let mut export = Vec::with_capacity(12);
    export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    export.extend_from_slice(&info.size.to_be_bytes());
    export.extend_from_slice(&info.flags.to_be_bytes());
    option_reply(out, opt, REP_INFO, &export);

    // Our limits differ from the spec's defaults, so they are always sent.
    let mut block_size = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    let (min, pref, max) = info.block_size;
    for v in [min, pref, max] {
        block_size.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(out, opt, REP_INFO, &block_size);

    let mut sent = Vec::new();
    for &request in requests {
        // Each kind of information once, however often it is asked for.
        if sent.contains(&request) {
            continue;
        }
        sent.push(request);
        let mut payload = request.to_be_bytes().to_vec();
        match request {
            INFO_NAME => payload.extend_from_slice(info.name.as_bytes()),
            INFO_DESCRIPTION => match &info.description {
                Some(d) => payload.extend_from_slice(d.as_bytes()),
                None => continue,
            },
            // INFO_EXPORT and INFO_BLOCK_SIZE were sent already; unknown
            // requests are ignored as the spec says.
            _ => continue,
        }
        log::debug!("{}: sending {}", opt_name(opt), info_name(request));
        option_reply(out, opt, REP_INFO, &payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OneExport {
        opened: Vec<(String, Purpose)>,
    }

    impl ExportResolver for OneExport {
        fn resolve(&mut self, name: &str, purpose: Purpose) -> Result<ExportInfo, Refusal> {
            if !name.is_empty() && name != "disk" {
                return Err(Refusal { code: REP_ERR_UNKNOWN, message: format!("no export {name:?}") });
            }
            self.opened.push((name.to_string(), purpose));
            Ok(ExportInfo {
                name: "disk".into(),
                description: Some("a test disk".into()),
                size: 1 << 20,
                flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
                block_size: (1, 4096, 32 << 20),
            })
        }
        fn list(&mut self) -> Vec<(String, String)> {
            vec![("disk".into(), "a test disk".into())]
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

    fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }

    /// Splits option replies out of server output: (option, reply type, payload).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(be_u64(&out[0..8]), OPT_REPLY_MAGIC);
            let len = be_u32(&out[16..20]) as usize;
            v.push((be_u32(&out[8..12]), be_u32(&out[12..16]), out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    fn start() -> (Handshake, OneExport) {
        let mut out = Vec::new();
        let hs = Handshake::new(&mut out, TlsMode::Allow);
        assert_eq!(out.len(), 18);
        assert_eq!(be_u64(&out[0..8]), NBDMAGIC);
        assert_eq!(be_u64(&out[8..16]), IHAVEOPT);
        assert_eq!(be_u16(&out[16..18]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        (hs, OneExport { opened: vec![] })
    }

    fn client_flags(flags: u32) -> Vec<u8> {
        flags.to_be_bytes().to_vec()
    }

    #[test]
    fn go_with_structured_replies_one_byte_at_a_time() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_GO, &info_request("", &[INFO_NAME, INFO_BLOCK_SIZE, INFO_DESCRIPTION])));
        input.extend_from_slice(b"tail");
        let mut out = Vec::new();
        let mut pos = 0;
        let negotiated = loop {
            let (used, outcome) = hs.feed(&input[pos..pos + 1], &mut out, &mut ex);
            pos += used;
            match outcome {
                Outcome::NeedMore => assert_eq!(used, 1),
                Outcome::Done(n) => break n,
                Outcome::Close(why) => panic!("closed: {why}"),
                Outcome::StartTls => panic!("no STARTTLS was sent"),
            }
        };
        assert_eq!(&input[pos..], b"tail");
        assert!(negotiated.structured_replies);
        assert_eq!(ex.opened, vec![("".to_string(), Purpose::Go)]);
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(types, vec![REP_ACK, REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
        assert_eq!(be_u16(&r[1].2[0..2]), INFO_EXPORT);
        assert_eq!(be_u64(&r[1].2[2..10]), 1 << 20);
        assert_eq!(be_u16(&r[1].2[10..12]) & FLAG_SEND_DF, FLAG_SEND_DF, "DF with structured replies");
        assert_eq!(be_u16(&r[2].2[0..2]), INFO_BLOCK_SIZE);
        assert_eq!(r[2].2.len(), 14);
        assert_eq!(&r[3].2[2..], b"disk");
        assert_eq!(&r[4].2[2..], b"a test disk");
    }

    #[test]
    fn export_name_without_no_zeroes_pads() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_EXPORT_NAME, b"disk"));
        let mut out = Vec::new();
        let (used, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert_eq!(used, input.len());
        assert!(matches!(outcome, Outcome::Done(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
    }

    #[test]
    fn unknown_export_is_refused_and_handshake_continues() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_INFO, &info_request("nope", &[])));
        input.extend(option(OPT_INFO, &info_request("disk", &[])));
        let mut out = Vec::new();
        let (used, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert_eq!((used, outcome), (input.len(), Outcome::NeedMore));
        let r: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(r, vec![REP_ERR_UNKNOWN, REP_INFO, REP_INFO, REP_ACK]);
        assert_eq!(ex.opened, vec![("disk".to_string(), Purpose::Info)]);
    }

    #[test]
    fn unknown_and_oversized_options_are_skipped_by_length() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(0x7777, &[1, 2, 3]));
        input.extend(option(OPT_LIST, &vec![0u8; MAX_OPTION_LEN as usize + 1]));
        input.extend(option(OPT_LIST, &[]));
        let mut out = Vec::new();
        let (used, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert_eq!((used, outcome), (input.len(), Outcome::NeedMore));
        let r = replies(&out);
        assert_eq!(r[0], (0x7777, REP_ERR_UNSUP, vec![]));
        assert_eq!(r[1].1, REP_ERR_TOO_BIG);
        assert_eq!(r[2].1, REP_SERVER);
        assert_eq!(&r[2].2[4..8], b"disk");
        assert_eq!(r[3].1, REP_ACK);
    }

    #[test]
    fn huge_claimed_length_is_not_buffered() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        let mut header = option(OPT_GO, &[]);
        header[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        input.extend(header);
        input.extend(vec![0u8; 1 << 16]);
        let mut out = Vec::new();
        let (used, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert_eq!((used, outcome), (input.len(), Outcome::NeedMore));
        assert!(hs.buf.capacity() < 1 << 16);
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_info_and_structured_requests_are_invalid() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        let mut bad = info_request("disk", &[INFO_NAME]);
        bad.push(0); // odd trailing byte
        input.extend(option(OPT_GO, &bad));
        let mut lying = info_request("disk", &[]);
        lying[0..4].copy_from_slice(&1000u32.to_be_bytes()); // name longer than payload
        input.extend(option(OPT_GO, &lying));
        input.extend(option(OPT_STRUCTURED_REPLY, &[1]));
        input.extend(option(OPT_GO, &info_request("di\0k", &[])));
        let mut out = Vec::new();
        let (_, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert_eq!(outcome, Outcome::NeedMore);
        let r: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(r, vec![REP_ERR_INVALID; 4]);
        assert!(ex.opened.is_empty());
    }

    #[test]
    fn bad_flags_magic_and_abort_close() {
        let (mut hs, mut ex) = start();
        let (_, outcome) = hs.feed(&client_flags(1 << 5), &mut Vec::new(), &mut ex);
        assert!(matches!(outcome, Outcome::Close(w) if w.contains("unknown client flags")));
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        let mut opt = option(OPT_LIST, &[]);
        opt[0] ^= 1;
        input.extend(opt);
        let (_, outcome) = hs.feed(&input, &mut Vec::new(), &mut ex);
        assert_eq!(outcome, Outcome::Close("bad option magic"));

        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_ABORT, &[]));
        let mut out = Vec::new();
        let (_, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert!(matches!(outcome, Outcome::Close(_)));
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    #[test]
    fn export_name_failure_closes() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_EXPORT_NAME, b"nope"));
        let (_, outcome) = hs.feed(&input, &mut Vec::new(), &mut ex);
        assert!(matches!(outcome, Outcome::Close(_)));
    }

    #[test]
    fn option_flood_closes() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        for _ in 0..=MAX_OPTIONS {
            input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        }
        let (_, outcome) = hs.feed(&input, &mut Vec::new(), &mut ex);
        assert_eq!(outcome, Outcome::Close("too many options"));
    }

    #[test]
    fn abort_with_data_is_acked_and_closes() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_ABORT, &vec![7u8; MAX_OPTION_LEN as usize * 2]));
        let mut out = Vec::new();
        let (used, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert_eq!(used, input.len());
        assert!(matches!(outcome, Outcome::Close(_)));
        assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);
    }

    #[test]
    fn shutdown_refuses_further_options() {
        let (mut hs, mut ex) = start();
        hs.shutting_down();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_GO, &info_request("", &[])));
        let mut out = Vec::new();
        let (_, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert_eq!(outcome, Outcome::NeedMore);
        assert_eq!(replies(&out)[0].1, REP_ERR_SHUTDOWN);
        assert!(ex.opened.is_empty());
    }

    #[test]
    fn client_without_fixed_newstyle_is_served() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(0);
        input.extend(option(OPT_EXPORT_NAME, b""));
        let (_, outcome) = hs.feed(&input, &mut Vec::new(), &mut ex);
        assert!(matches!(outcome, Outcome::Done(_)));
    }

    fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }

    #[test]
    fn meta_contexts_list_and_set() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_SET_META_CONTEXT, &meta_request("", &["base:allocation"])));
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_LIST_META_CONTEXT, &meta_request("", &[])));
        input.extend(option(OPT_LIST_META_CONTEXT, &meta_request("", &["base:"])));
        input.extend(option(OPT_LIST_META_CONTEXT, &meta_request("", &["qemu:dirty-bitmap:x"])));
        input.extend(option(OPT_SET_META_CONTEXT, &meta_request("", &["base:", "base:allocation"])));
        let mut bad = meta_request("", &["base:allocation"]);
        bad[8..12].copy_from_slice(&100u32.to_be_bytes()); // more queries than bytes
        input.extend(option(OPT_SET_META_CONTEXT, &bad));
        input.extend(option(OPT_GO, &info_request("", &[])));
        let mut out = Vec::new();
        let (_, outcome) = hs.feed(&input, &mut out, &mut ex);
        let Outcome::Done(n) = outcome else { panic!("{outcome:?}") };
        let r: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(
            r[..12],
            [
                REP_ERR_INVALID, // SET before structured replies
                REP_ACK,
                REP_META_CONTEXT,
                REP_ACK, // LIST, no query: everything
                REP_META_CONTEXT,
                REP_ACK, // LIST "base:"
                REP_ACK, // LIST of something we do not have
                REP_META_CONTEXT,
                REP_ACK,         // SET: "base:" alone selects nothing
                REP_ERR_INVALID, // the lying query count; the earlier selection stays
                REP_INFO,
                REP_INFO,
            ]
        );
        let meta = &replies(&out)[2].2;
        assert_eq!(be_u32(&meta[0..4]), CONTEXT_BASE_ALLOCATION_ID);
        assert_eq!(&meta[4..], b"base:allocation");
        assert_eq!(n.contexts, vec![CONTEXT_BASE_ALLOCATION_ID]);
    }

    #[test]
    fn contexts_for_another_export_are_dropped_at_go() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_SET_META_CONTEXT, &meta_request("disk", &["base:allocation"])));
        input.extend(option(OPT_GO, &info_request("", &[])));
        let (_, outcome) = hs.feed(&input, &mut Vec::new(), &mut ex);
        let Outcome::Done(n) = outcome else { panic!("{outcome:?}") };
        assert!(n.contexts.is_empty());
    }

    #[test]
    fn tls_required_refuses_everything_but_starttls_then_resets() {
        let mut out = Vec::new();
        let mut hs = Handshake::new(&mut out, TlsMode::Require);
        let mut ex = OneExport { opened: vec![] };
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(OPT_STARTTLS, &[]));
        out.clear();
        let (used, outcome) = hs.feed(&input, &mut out, &mut ex);
        assert_eq!((used, outcome), (input.len(), Outcome::StartTls));
        let r: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(r, vec![REP_ERR_TLS_REQD, REP_ERR_TLS_REQD, REP_ACK]);
        hs.tls_started();
        // Over TLS: a second STARTTLS is invalid; GO works, without the
        // structured replies asked for in plaintext.
        let mut input = option(OPT_STARTTLS, &[]);
        input.extend(option(OPT_GO, &info_request("", &[])));
        out.clear();
        let (_, outcome) = hs.feed(&input, &mut out, &mut ex);
        let Outcome::Done(n) = outcome else { panic!("{outcome:?}") };
        assert!(!n.structured_replies);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn starttls_refused_when_tls_is_off_and_export_name_closes_when_required() {
        let (hs, mut ex) = start(); // TlsMode::Allow
        let mut out = Vec::new();
        let mut off = Handshake::new(&mut out, TlsMode::Off);
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_STARTTLS, &[]));
        out.clear();
        let (_, outcome) = off.feed(&input, &mut out, &mut ex);
        assert_eq!(outcome, Outcome::NeedMore);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        let mut req = Handshake::new(&mut out, TlsMode::Require);
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_EXPORT_NAME, b""));
        let (_, outcome) = req.feed(&input, &mut Vec::new(), &mut ex);
        assert!(matches!(outcome, Outcome::Close(_)));
        let _ = hs.buffered();
    }

    #[test]
    fn extended_headers_imply_structured_replies() {
        let (mut hs, mut ex) = start();
        let mut input = client_flags(CLIENT_FLAG_FIXED_NEWSTYLE);
        input.extend(option(OPT_EXTENDED_HEADERS, &[1]));
        input.extend(option(OPT_EXTENDED_HEADERS, &[]));
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_SET_META_CONTEXT, &meta_request("", &["base:allocation"])));
        input.extend(option(OPT_GO, &info_request("", &[])));
        let mut out = Vec::new();
        let (_, outcome) = hs.feed(&input, &mut out, &mut ex);
        let Outcome::Done(n) = outcome else { panic!("{outcome:?}") };
        assert!(n.extended_headers && n.structured_replies);
        assert_eq!(n.contexts, vec![CONTEXT_BASE_ALLOCATION_ID]);
        let r: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(r[..4], [REP_ERR_INVALID, REP_ACK, REP_ERR_EXT_HEADER_REQD, REP_META_CONTEXT]);
    }
}
