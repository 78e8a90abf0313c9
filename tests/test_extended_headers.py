"""Extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests with 64-bit
lengths, and every reply an extended chunk.

QEMU 8.2+ asks for them first, so qemu-io and qemu-img exercise them with
every run; the server's debug log proves which header form a connection
used. A raw client checks the framing itself, and what happens to lengths
the 32-bit plugin API cannot carry.
"""

import os
import socket
import struct

from conftest import run_tool

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_GO, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 7, 10, 11
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
EXT_REQUEST_MAGIC = 0x21E41C71
EXT_REPLY_MAGIC = 0x6E8A278C
CMD_READ, CMD_WRITE, CMD_TRIM, CMD_BLOCK_STATUS = 0, 1, 4, 7
FLAG_PAYLOAD_LEN = 1 << 5
TYPE_NONE, TYPE_DATA, TYPE_HOLE, TYPE_BS_EXT = 0, 1, 2, 6
TYPE_ERROR = (1 << 15) + 1
EINVAL = 22
GiB = 1 << 30


class ExtClient:
    """Negotiates extended headers and base:allocation, then speaks raw."""

    def __init__(self, sock_path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(str(sock_path))
        magic, opt, _ = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.s.sendall(struct.pack(">I", 3))
        self.option(OPT_EXTENDED_HEADERS)
        assert self.opt_reply()[0] == REP_ACK
        q = b"base:allocation"
        self.option(OPT_SET_META_CONTEXT, struct.pack(">II", 0, 1) + struct.pack(">I", len(q)) + q)
        rtype, data = self.opt_reply()
        assert rtype == REP_META_CONTEXT, hex(rtype)
        self.context = struct.unpack(">I", data[:4])[0]
        assert self.opt_reply()[0] == REP_ACK
        self.option(OPT_GO, struct.pack(">IH", 0, 0))
        while True:
            rtype, data = self.opt_reply()
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
                self.size = struct.unpack(">Q", data[2:10])[0]
            elif rtype != REP_INFO:
                assert rtype == REP_ACK, hex(rtype)
                break
        self.cookie = 0

    def recv(self, n):
        b = b""
        while len(b) < n:
            chunk = self.s.recv(n - len(b))
            assert chunk, "server closed the connection"
            b += chunk
        return b

    def option(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self):
        magic, _, rtype, n = struct.unpack(">QIII", self.recv(20))
        assert magic == OPT_REPLY_MAGIC
        return rtype, self.recv(n)

    def request(self, cmd, offset, length, flags=0, payload=b""):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, flags, cmd,
                                   self.cookie, offset, length) + payload)
        return self.cookie

    def reply(self, offset):
        """Chunks of one reply, checked for framing: [(type, payload)]."""
        chunks = []
        while True:
            magic, flags, rtype, cookie, off, n = struct.unpack(">IHHQQQ", self.recv(32))
            assert magic == EXT_REPLY_MAGIC, hex(magic)
            assert cookie == self.cookie and off == offset, (cookie, off)
            chunks.append((rtype, self.recv(n)))
            if flags & 1:
                return chunks


def error_of(chunks):
    rtype, payload = chunks[-1]
    assert rtype == TYPE_ERROR, chunks
    return struct.unpack(">I", payload[:4])[0]


def test_qemu_negotiates_extended_headers(memdisk, tmp_path):
    """qemu-io writes, zeroes, discards and reads back with patterns; the
    log shows the connection used extended headers; qemu-img map agrees."""
    srv = memdisk(size="64M", log="debug")
    uri = srv.uri
    out = run_tool(["qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 1M", "-c", "read -P 0x6b 0 1M",
                    "-c", "write -z 4M 1M", "-c", "read -P 0 4M 1M", "-c", "discard 0 64k",
                    "-c", "read -P 0 0 64k", "-c", "read -P 0x6b 64k 960k", "-c", "flush", uri], srv)
    assert "Pattern verification failed" not in out.stdout + out.stderr
    assert "extended headers" in srv.stderr()
    mapped = run_tool(["qemu-img", "map", "--output=json", uri], srv).stdout
    assert '"start": 65536, "length": 983040, "depth": 0, "present": true, "zero": false, "data": true' in mapped


def test_raw_extended_framing_and_64_bit_lengths(memdisk):
    srv = memdisk(size="8G")
    c = ExtClient(srv.sock)
    assert c.size == 8 * GiB
    data = os.urandom(4096)
    # A write: its reply is an extended NONE chunk. PAYLOAD_LEN on a write
    # only restates the length.
    c.request(CMD_WRITE, 0, 4096, FLAG_PAYLOAD_LEN, data)
    assert c.reply(0) == [(TYPE_NONE, b"")]
    # A read over data and a hole: an OFFSET_DATA and an OFFSET_HOLE chunk.
    c.request(CMD_READ, 0, 8192)
    got = bytearray(8192)
    types = []
    for rtype, payload in c.reply(0):
        types.append(rtype)
        at = struct.unpack(">Q", payload[:8])[0]
        if rtype == TYPE_DATA:
            got[at:at + len(payload) - 8] = payload[8:]
        else:
            assert rtype == TYPE_HOLE and struct.unpack(">I", payload[8:12])[0] == 4096
    assert sorted(types) == [TYPE_DATA, TYPE_HOLE] and bytes(got) == data + bytes(4096)
    # Block status with a 64-bit length: a hint, capped at 4 GiB - 1.
    c.request(CMD_BLOCK_STATUS, 0, 6 * GiB)
    [(rtype, payload)] = c.reply(0)
    assert rtype == TYPE_BS_EXT
    context, count = struct.unpack(">II", payload[:8])
    assert context == c.context and len(payload) == 8 + 16 * count
    extents = [struct.unpack(">QQ", payload[8 + 16 * i:24 + 16 * i]) for i in range(count)]
    assert extents[0] == (4096, 0)
    assert extents[1][1] == 3 and sum(e[0] for e in extents) <= (1 << 32) - 1
    # A trim longer than the plugin API can carry: EINVAL, connection fine.
    c.request(CMD_TRIM, 0, 5 * GiB)
    assert error_of(c.reply(0)) == EINVAL
    # Block-status filters (PAYLOAD_LEN) are not supported: EINVAL, and the
    # payload is skipped, not read as the next request.
    c.request(CMD_BLOCK_STATUS, 0, 16, FLAG_PAYLOAD_LEN, struct.pack(">QII", 4096, c.context, 0))
    assert error_of(c.reply(0)) == EINVAL
    c.request(CMD_READ, 8 * GiB - 4096, 8192)
    assert error_of(c.reply(8 * GiB - 4096)) == EINVAL
    c.request(CMD_READ, 0, 4096)
    [(rtype, payload)] = c.reply(0)
    assert rtype == TYPE_DATA and payload[8:] == data
    # A payload longer than the maximum block size (64 MiB), here 1 TiB:
    # skipping it could take forever, so the server hangs up at once, as
    # the spec says it should, before a byte of it arrives.
    c.request(CMD_WRITE, 0, 1 << 40, 0, b"")
    c.s.settimeout(10)
    assert c.s.recv(1) == b"", "the connection stayed open"
    c.s.close()
    # Other clients are not disturbed.
    c2 = ExtClient(srv.sock)
    c2.request(CMD_READ, 0, 4096)
    [(rtype, payload)] = c2.reply(0)
    assert rtype == TYPE_DATA and payload[8:] == data
    c2.s.close()
