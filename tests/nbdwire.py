"""The NBD wire protocol for the tests: its constants, declared once, and
one raw client for what libnbd cannot or will not do (misbehave, send
unknown commands and flags, pipeline without reading, look at the exact
option replies and reply framing, wrap its socket in TLS after STARTTLS).

    c = Client(srv.sock).start()          # greeting + client flags
    c.go()                                # -> REP_ACK (or the error)
    c.call(CMD_READ, 0, 512)              # -> (nbd_error, data)

    c = Client(path).connect(structured=True)      # start + options + GO
    c = Client(path).connect(extended=True, meta=(b"base:allocation",))

Every wait is bounded by the socket timeout (10 s unless told). The
server closing the connection raises Closed (an EOFError).
"""

import select
import socket
import struct
import threading
import time

KiB = 1 << 10
MiB = 1 << 20
U64 = (1 << 64) - 1

# ---------------------------------------------------------------- handshake
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1            # handshake flags, and client flags
FLAG_NO_ZEROES = 2
C_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_PLATFORM = REP_ERR + 4
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8
REP_ERR_TOO_BIG = REP_ERR + 9
REP_ERR_EXT_HEADER_REQD = REP_ERR + 10

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags (NBD_INFO_EXPORT / NBD_OPT_EXPORT_NAME)
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_SEND_CACHE = 1 << 10

# ---------------------------------------------------------------- transmission
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) + 1

# NBD errors
OK = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108


# ---------------------------------------------------------------- payloads

def go_data(name=b"", infos=()):
    """The payload of NBD_OPT_GO / NBD_OPT_INFO."""
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_data(name=b"", queries=(b"base:allocation",)):
    """The payload of NBD_OPT_{LIST,SET}_META_CONTEXT."""
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def option_bytes(opt, data=b"", length=None):
    """An option header (with a claimed length, if given) and its data."""
    n = len(data) if length is None else length
    return struct.pack(">QII", IHAVEOPT, opt, n) + data


def request_header(cmd, cookie, offset=0, length=0, flags=0, extended=False):
    """A compact (28-byte) or extended (32-byte) request header."""
    if extended:
        return struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, flags, cmd, cookie,
                           offset & U64, length)
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie,
                       offset & U64, length)


# ---------------------------------------------------------------- sockets

def still_open(s):
    """Drains what the peer sent without blocking; False once it hung up.
    (With a timeout set, Python polls before recv even with MSG_DONTWAIT,
    so the socket is made non-blocking for the check.)"""
    saved = s.gettimeout()
    s.settimeout(0.0)
    try:
        while True:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                return True
            except (ConnectionResetError, BrokenPipeError):
                return False
            if not data:
                return False
    finally:
        s.settimeout(saved)


def wait_closed(s, timeout):
    """Seconds until the peer hangs up (draining what it sends), or None
    if it is still open after `timeout`."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except (socket.timeout, BlockingIOError):
            return None
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        if not data:
            return time.monotonic() - t0


class Sender(threading.Thread):
    """sendall() in the background: the server may stop reading."""

    def __init__(self, sock, data):
        super().__init__(daemon=True)
        self.sock, self.data, self.error = sock, data, None

    def run(self):
        try:
            self.sock.sendall(self.data)
        except OSError as e:
            self.error = e


# ---------------------------------------------------------------- the client

class Closed(EOFError):
    """The server closed the connection."""


class Chunks:
    """One reply as it came off the wire: kind is "simple", "structured"
    or "extended"; a simple reply has error and data (the READ data it
    carried), the others chunks [(flags, type, payload)]."""

    def __init__(self, kind, cookie, error=0, data=b"", chunks=()):
        self.kind, self.cookie, self.error = kind, cookie, error
        self.data, self.chunks = data, list(chunks)

    def types(self):
        return [t for _, t, _ in self.chunks]

    def error_chunk(self):
        """The NBD error of the first ERROR chunk, or None."""
        for _, t, p in self.chunks:
            if t == REPLY_TYPE_ERROR:
                return struct.unpack(">I", p[:4])[0]
        return None

    def __repr__(self):
        if self.kind == "simple":
            return f"<simple reply {self.cookie}: error {self.error}, {len(self.data)} bytes>"
        return (f"<{self.kind} reply {self.cookie}: "
                f"{[(f, t, len(p)) for f, t, p in self.chunks]}>")


class Client:
    """A raw NBD client over a Unix socket (path, or a server object with
    .sock) or TCP (tcp=(host, port)). It sends exactly what it is told,
    so it can misbehave; the reply readers check the framing."""

    def __init__(self, srv=None, path=None, tcp=None, timeout=10.0):
        if tcp is not None:
            self.s = socket.create_connection(tcp, timeout=timeout)
        else:
            if path is None:
                path = getattr(srv, "sock", srv)
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(timeout)
            self.s.connect(str(path))
        self.timeout = timeout
        self.cookie = 0
        self.pending = {}           # cookie -> (cmd, length, offset)
        self.structured = False
        self.extended = False
        self.size = self.tflags = None
        self.infos = {}             # NBD_INFO_* -> payload, from the last GO/INFO
        self.contexts = {}          # meta context name -> id

    def close(self):
        self.s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # raw bytes -----------------------------------------------------------
    def send(self, data):
        self.s.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.s.recv(min(n - len(buf), 4 * MiB))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"server closed after {len(buf)}/{n} bytes")
            buf += chunk
        return bytes(buf)

    def expect_eof(self, timeout=5.0):
        """Asserts the server closes without sending anything (more).
        Returns the seconds it took."""
        t0 = time.monotonic()
        self.s.settimeout(timeout)
        try:
            data = self.s.recv(65536)
        except ConnectionResetError:
            data = b""
        except socket.timeout:
            raise AssertionError(f"server did not close within {timeout}s")
        assert data == b"", f"expected a disconnect, got {data[:64]!r}"
        return time.monotonic() - t0

    def at_eof(self):
        """True if the server closed the connection (bounded wait)."""
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def nothing_pending(self, wait=0.2):
        """True if the server sent nothing within `wait` seconds (a check
        that something does not happen: it takes that long)."""
        r, _, _ = select.select([self.s], [], [], wait)
        return not r

    def greeted(self):
        """True if the greeting (or anything) is already waiting to be
        read, without waiting for it."""
        return not self.nothing_pending(0)

    # handshake ----------------------------------------------------------
    def greeting(self):
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT), (hex(magic), hex(opt))
        assert hflags == FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, hex(hflags)
        return self

    def flags(self, flags=C_FLAGS):
        self.send(struct.pack(">I", flags))
        return self

    def start(self):
        """Greeting read, client flags sent: ready for options."""
        return self.greeting().flags()

    option_bytes = staticmethod(option_bytes)
    go_data = staticmethod(go_data)

    def option(self, opt, data=b"", length=None):
        self.send(option_bytes(opt, data, length))

    def opt_reply(self):
        """(option, reply type, data) of the next option reply."""
        magic, opt, rtype, n = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv_exact(n)

    def option_replies(self, opt, data=b""):
        """Sends one option; every reply to it up to the final one:
        [(type, data), ...]."""
        self.option(opt, data)
        replies = []
        while True:
            got, rtype, payload = self.opt_reply()
            assert got == opt, f"reply for option {got}, sent {opt}"
            replies.append((rtype, payload))
            if rtype not in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
                return replies

    def final_reply(self, opt):
        """Reads the replies to `opt` up to its final one; returns its type.
        NBD_REP_INFO payloads are kept in .infos (export size and flags in
        .size and .tflags)."""
        while True:
            got, rtype, data = self.opt_reply()
            assert got == opt, (got, opt)
            if rtype in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
                if rtype == REP_INFO:
                    (info,) = struct.unpack(">H", data[:2])
                    self.infos[info] = data[2:]
                    if info == INFO_EXPORT:
                        self.size, self.tflags = struct.unpack(">QH", data[2:12])
                continue
            return rtype

    def go(self, name=b"", infos=(), opt=OPT_GO):
        """NBD_OPT_GO (or NBD_OPT_INFO); returns the final reply type
        (REP_ACK on success)."""
        self.infos = {}
        self.option(opt, go_data(name, infos))
        return self.final_reply(opt)

    def export_name(self, name=b""):
        """Old-style NBD_OPT_EXPORT_NAME: ends the handshake (NO_ZEROES)."""
        self.option(OPT_EXPORT_NAME, name)
        self.size, self.tflags = struct.unpack(">QH", self.recv_exact(10))
        return self

    def structured_reply(self):
        rtype = self.option_replies(OPT_STRUCTURED_REPLY)[-1][0]
        assert rtype == REP_ACK, hex(rtype)
        self.structured = True
        return self

    def extended_headers(self):
        rtype = self.option_replies(OPT_EXTENDED_HEADERS)[-1][0]
        assert rtype == REP_ACK, hex(rtype)
        self.extended = self.structured = True
        return self

    def set_meta_context(self, queries=(b"base:allocation",), name=b""):
        """NBD_OPT_SET_META_CONTEXT; the contexts granted go to .contexts."""
        replies = self.option_replies(OPT_SET_META_CONTEXT, meta_data(name, queries))
        assert replies[-1][0] == REP_ACK, [(hex(t), p) for t, p in replies]
        for rtype, data in replies[:-1]:
            assert rtype == REP_META_CONTEXT, hex(rtype)
            self.contexts[data[4:]] = struct.unpack(">I", data[:4])[0]
        return self

    def starttls(self, ctx, hostname="localhost"):
        """NBD_OPT_STARTTLS: expects the ACK, then wraps the socket."""
        replies = self.option_replies(OPT_STARTTLS)
        assert replies == [(REP_ACK, b"")], replies
        self.s = ctx.wrap_socket(self.s, server_hostname=hostname)
        return self.s

    def connect(self, structured=False, extended=False, meta=(), name=b""):
        """The whole handshake to transmission: greeting, flags, the
        options asked for, NBD_OPT_GO (which must succeed)."""
        self.start()
        if extended:
            self.extended_headers()
        elif structured:
            self.structured_reply()
        if meta:
            self.set_meta_context(meta)
        rtype = self.go(name)
        assert rtype == REP_ACK, hex(rtype)
        return self

    # transmission -------------------------------------------------------
    def request_bytes(self, cmd, offset=0, length=0, flags=0, payload=b"",
                      cookie=None):
        """A request (header and payload) as bytes, its reply expected:
        with the next cookie unless one is given."""
        if cookie is None:
            self.cookie += 1
            cookie = self.cookie
        self.pending[cookie] = (cmd, length, offset & U64)
        return request_header(cmd, cookie, offset, length, flags,
                              self.extended) + payload

    def send_request(self, *args, **kw):
        """Sends one request; returns its cookie."""
        data = self.request_bytes(*args, **kw)
        self.send(data)
        return struct.unpack(">Q", data[8:16])[0]

    def recv_chunks(self):
        """The next reply as it came (see Chunks). A simple reply to a
        READ carries the data its request asked for; cookies this client
        did not send carry none."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            cmd, length, _ = self.pending.get(cookie, (None, 0, 0))
            data = self.recv_exact(length) if cmd == CMD_READ and error == 0 else b""
            return Chunks("simple", cookie, error, data)
        chunks = []
        kind = "extended" if magic == EXT_REPLY_MAGIC else "structured"
        while True:
            if kind == "extended":
                assert magic == EXT_REPLY_MAGIC, hex(magic)
                flags, rtype, cookie, off, n = struct.unpack(">HHQQQ", self.recv_exact(28))
                if cookie in self.pending:
                    want = self.pending[cookie][2]
                    assert off == want, f"chunk offset {off}, request offset {want}"
            else:
                assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
                flags, rtype, cookie, n = struct.unpack(">HHQI", self.recv_exact(16))
            chunks.append((flags, rtype, self.recv_exact(n)))
            if flags & REPLY_FLAG_DONE:
                return Chunks(kind, cookie, chunks=chunks)
            magic = struct.unpack(">I", self.recv_exact(4))[0]

    def reply(self):
        """(cookie, nbd_error, data) of the next complete reply; READ data
        is put together from its data and hole chunks."""
        r = self.recv_chunks()
        assert r.cookie in self.pending, f"reply for unknown cookie {r.cookie}"
        cmd, length, offset = self.pending.pop(r.cookie)
        if r.kind == "simple":
            assert not (self.structured and cmd == CMD_READ), \
                "simple reply to a READ with structured replies"
            return r.cookie, r.error, r.data
        assert self.structured, f"{r.kind} reply not negotiated"
        assert (r.kind == "extended") == self.extended, r
        data = None
        for flags, rtype, payload in r.chunks:
            if rtype in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
                assert cmd == CMD_READ, r
                if data is None:
                    data = bytearray(length)
                at = struct.unpack(">Q", payload[:8])[0] - offset
                if rtype == REPLY_TYPE_OFFSET_DATA:
                    chunk = payload[8:]
                else:
                    chunk = bytes(struct.unpack(">I", payload[8:12])[0])
                assert 0 <= at and at + len(chunk) <= length, (at, len(chunk), length)
                data[at:at + len(chunk)] = chunk
            elif rtype == REPLY_TYPE_ERROR:
                error, msglen = struct.unpack(">IH", payload[:6])
                assert len(payload) == 6 + msglen and flags & REPLY_FLAG_DONE, r
                return r.cookie, error, b""
            else:
                assert rtype == REPLY_TYPE_NONE or cmd == CMD_BLOCK_STATUS, hex(rtype)
        return r.cookie, 0, bytes(data) if data is not None else b""

    def call(self, *args, **kw):
        """One request, its reply: (nbd_error, data)."""
        cookie = self.send_request(*args, **kw)
        got, error, data = self.reply()
        assert got == cookie, f"reply cookie {got}, expected {cookie}"
        return error, data

    def replies(self, n):
        """The next n replies: {cookie: nbd_error}, each cookie once."""
        out = {}
        for _ in range(n):
            cookie, error, _ = self.reply()
            assert cookie not in out, "two replies for cookie %d" % cookie
            out[cookie] = error
        return out
