"""Extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests with 64-bit
lengths, and every reply an extended chunk.

QEMU 8.2+ asks for them first, so qemu-io and qemu-img exercise them with
every run; the server's debug log proves which header form a connection
used. A raw client checks the framing itself, and what happens to lengths
the 32-bit plugin API cannot carry.
"""

import os
import struct

from conftest import run_tool
from nbdwire import (CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, CMD_READ, CMD_TRIM,
                     CMD_WRITE, NBD_EINVAL, REPLY_TYPE_BLOCK_STATUS_EXT,
                     REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
                     REPLY_TYPE_OFFSET_HOLE, Client)

GiB = 1 << 30


def ext_client(sock_path):
    """Negotiates extended headers and base:allocation, then speaks raw."""
    c = Client(path=sock_path).connect(extended=True, meta=(b"base:allocation",))
    c.context = c.contexts[b"base:allocation"]
    return c


def reply(c, cookie):
    """The chunks of the reply to `cookie`, framing checked (extended
    chunks carrying the request's offset): [(type, payload)]."""
    r = c.recv_chunks()
    assert r.kind == "extended" and r.cookie == cookie, r
    c.pending.pop(cookie)
    return [(t, p) for _, t, p in r.chunks]


def error_of(chunks):
    rtype, payload = chunks[-1]
    assert rtype == REPLY_TYPE_ERROR, chunks
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
    c = ext_client(srv.sock)
    assert c.size == 8 * GiB
    data = os.urandom(4096)
    # A write: its reply is an extended NONE chunk. PAYLOAD_LEN on a write
    # only restates the length.
    c.send_request(CMD_WRITE, 0, 4096, CMD_FLAG_PAYLOAD_LEN, data)
    assert reply(c, c.cookie) == [(REPLY_TYPE_NONE, b"")]
    # A read over data and a hole: an OFFSET_DATA and an OFFSET_HOLE chunk.
    c.send_request(CMD_READ, 0, 8192)
    got = bytearray(8192)
    types = []
    for rtype, payload in reply(c, c.cookie):
        types.append(rtype)
        at = struct.unpack(">Q", payload[:8])[0]
        if rtype == REPLY_TYPE_OFFSET_DATA:
            got[at:at + len(payload) - 8] = payload[8:]
        else:
            assert rtype == REPLY_TYPE_OFFSET_HOLE and struct.unpack(">I", payload[8:12])[0] == 4096
    assert sorted(types) == [REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE] and bytes(got) == data + bytes(4096)
    # Block status with a 64-bit length: a hint, capped at 4 GiB - 1.
    c.send_request(CMD_BLOCK_STATUS, 0, 6 * GiB)
    [(rtype, payload)] = reply(c, c.cookie)
    assert rtype == REPLY_TYPE_BLOCK_STATUS_EXT
    context, count = struct.unpack(">II", payload[:8])
    assert context == c.context and len(payload) == 8 + 16 * count
    extents = [struct.unpack(">QQ", payload[8 + 16 * i:24 + 16 * i]) for i in range(count)]
    assert extents[0] == (4096, 0)
    assert extents[1][1] == 3 and sum(e[0] for e in extents) <= (1 << 32) - 1
    # A trim longer than the plugin API can carry: EINVAL, connection fine.
    c.send_request(CMD_TRIM, 0, 5 * GiB)
    assert error_of(reply(c, c.cookie)) == NBD_EINVAL
    # Block-status filters (PAYLOAD_LEN) are not supported: EINVAL, and the
    # payload is skipped, not read as the next request.
    c.send_request(CMD_BLOCK_STATUS, 0, 16, CMD_FLAG_PAYLOAD_LEN, struct.pack(">QII", 4096, c.context, 0))
    assert error_of(reply(c, c.cookie)) == NBD_EINVAL
    c.send_request(CMD_READ, 8 * GiB - 4096, 8192)
    assert error_of(reply(c, c.cookie)) == NBD_EINVAL
    c.send_request(CMD_READ, 0, 4096)
    [(rtype, payload)] = reply(c, c.cookie)
    assert rtype == REPLY_TYPE_OFFSET_DATA and payload[8:] == data
    # A payload longer than the maximum block size (64 MiB), here 1 TiB:
    # skipping it could take forever, so the server hangs up at once, as
    # the spec says it should, before a byte of it arrives.
    c.send_request(CMD_WRITE, 0, 1 << 40, 0, b"")
    c.s.settimeout(10)
    assert c.s.recv(1) == b"", "the connection stayed open"
    c.s.close()
    # Other clients are not disturbed.
    c2 = ext_client(srv.sock)
    c2.send_request(CMD_READ, 0, 4096)
    [(rtype, payload)] = reply(c2, c2.cookie)
    assert rtype == REPLY_TYPE_OFFSET_DATA and payload[8:] == data
    c2.s.close()
