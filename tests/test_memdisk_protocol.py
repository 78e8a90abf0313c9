"""NBD protocol behaviour of build/memdisk through libnbd's Python binding,
plus a raw client for requests libnbd will not send."""

import errno
import random
import time

import nbd
import pytest

from conftest import expect_nbd_errno
from nbdwire import (CMD_CACHE, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
                     CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW,
                     NBD_EPERM, OPT_ABORT, OPT_LIST, REP_ACK,
                     REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_SERVER)

MiB = 1 << 20
SIZE = 16 * MiB
MAX_PAYLOAD = 64 * MiB


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


@pytest.fixture(params=[True, False], ids=["structured", "simple"])
def structured(request):
    return request.param


@pytest.fixture
def disk(memdisk):
    """A 16 MiB writable memdisk with a little latency, so that every
    reply really comes back from a worker thread."""
    return memdisk("--latency-ms", "1", size="16M")


def good_read_after_error(h, data, offset):
    """After an error reply the connection must still serve requests."""
    assert h.pread(len(data), offset) == data, \
        "data read back after an error reply differs"


# ---------------------------------------------------------------- data path


def test_structured_replies_negotiated(disk, structured):
    h = disk.connect(structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    assert h.get_size() == SIZE
    h.shutdown()


def test_pread_pwrite_roundtrip(disk, structured):
    h = disk.connect(structured=structured)
    # Fresh disk reads as zeroes.
    assert h.pread(64 * 1024, 5 * MiB) == bytes(64 * 1024)
    cases = [(0, 4096), (4096 * 3, 12345), (MiB - 7, 1), (2 * MiB + 1, MiB),
             (SIZE - 4096, 4096), (SIZE - 1, 1), (8 * MiB, 4 * MiB),
             (8 * MiB + 4096, 100)]
    model = bytearray(SIZE)         # what the disk must hold
    for i, (off, n) in enumerate(cases):
        data = pattern(n, i)
        h.pwrite(data, off)
        model[off:off + n] = data
    for off, n in cases:
        got = h.pread(n, off)
        assert got == model[off:off + n], \
            f"mismatch at offset {off} length {n}"
    assert h.pread(8 * MiB, 0) == model[:8 * MiB]
    assert h.pread(8 * MiB, 8 * MiB) == model[8 * MiB:]
    # Unaligned read across two writes.
    h.pwrite(b"A" * 100, 10 * MiB)
    h.pwrite(b"B" * 100, 10 * MiB + 100)
    assert h.pread(150, 10 * MiB + 25) == b"A" * 75 + b"B" * 75
    h.shutdown()


def test_max_payload_read_write(memdisk, structured):
    """A 64 MiB read and write (the default maximum, as nbdkit's) both
    work, and so do the 42 MiB requests of nbd-server's integrity test,
    each sent as one request (libnbd refuses anything over the advertised
    maximum block size)."""
    srv = memdisk(size="128M")
    h = srv.connect(structured=structured)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_PAYLOAD
    data = pattern(MAX_PAYLOAD, 99)
    h.pwrite(data, 16 * MiB)
    assert h.pread(MAX_PAYLOAD, 16 * MiB) == data
    odd = pattern(42 * MiB, 7)
    h.pwrite(odd, 3 * MiB)
    assert h.pread(42 * MiB, 3 * MiB) == odd
    h.shutdown()


def test_max_request_size_setting(memdisk):
    """nbdkit_server_set_max_request_size (memdisk --max-request-size):
    advertised as the maximum block size; larger requests are refused
    with EINVAL and the connection goes on."""
    srv = memdisk("--max-request-size", "1M", size="16M")
    h = srv.connect(strict=False)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MiB
    h.pwrite(b"m" * MiB, 0)
    expect_nbd_errno(errno.EINVAL, h.pread, MiB + 4096, 0)
    good_read_after_error(h, b"m" * 4096, 0)
    h.shutdown()


def test_pread_structured_chunks(disk):
    h = disk.connect()
    data = pattern(MiB, 7)
    h.pwrite(data, 3 * MiB)
    seen = []

    def chunk(buf, offset, status, err):
        seen.append((offset, len(buf), status))
        assert buf == data[offset - 3 * MiB:offset - 3 * MiB + len(buf)]
        return 0

    assert h.pread_structured(MiB, 3 * MiB, chunk) == data
    assert seen, "no chunk callback"
    assert all(s == nbd.READ_DATA for _, _, s in seen), seen
    covered = sorted((o, n) for o, n, _ in seen)
    pos = 3 * MiB
    for o, n in covered:
        assert o == pos, f"chunks do not tile the read: {covered}"
        pos += n
    assert pos == 4 * MiB
    h.shutdown()


def test_pread_df_flag(disk):
    """DF (don't fragment) is accepted with structured replies: the read
    comes back as a single chunk."""
    h = disk.connect()
    assert h.can_df()
    data = pattern(256 * 1024, 8)
    h.pwrite(data, 0)
    seen = []

    def chunk(buf, offset, status, err):
        seen.append((offset, len(buf), status))
        return 0

    assert h.pread_structured(len(data), 0, chunk, nbd.CMD_FLAG_DF) == data
    assert seen == [(0, len(data), nbd.READ_DATA)], seen
    h.shutdown()


def test_flush(disk, structured):
    h = disk.connect(structured=structured)
    assert h.can_flush()
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    assert h.pread(4096, 0) == b"x" * 4096
    h.shutdown()


def test_fua_write(disk, structured):
    h = disk.connect(structured=structured)
    assert h.can_fua()
    data = pattern(128 * 1024, 3)
    h.pwrite(data, MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), MiB) == data
    # FUA on zero and trim as well.
    h.zero(4096, MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, MiB) == bytes(4096)
    h.trim(4096, MiB + 4096, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data) - 8192, MiB + 8192) == data[8192:]
    h.shutdown()


def test_fua_emulated_with_flush_after_write(memdisk):
    """memdisk lets the library emulate FUA: the write, then a flush, and
    the reply only once the flush has completed.  With 100 ms per plugin
    op that is at least 200 ms, against about 100 ms without FUA."""
    srv = memdisk("--latency-ms", "100", size="1M")
    h = srv.connect()
    t0 = time.monotonic()
    h.pwrite(b"n" * 4096, 0)
    plain = time.monotonic() - t0
    for name, op in [
        ("pwrite", lambda: h.pwrite(b"f" * 4096, 0, nbd.CMD_FLAG_FUA)),
        ("zero", lambda: h.zero(4096, 4096, nbd.CMD_FLAG_FUA)),
        ("trim", lambda: h.trim(4096, 8192, nbd.CMD_FLAG_FUA)),
    ]:
        t0 = time.monotonic()
        op()
        fua = time.monotonic() - t0
        assert fua >= 0.2, (
            f"FUA {name} answered after {fua:.3f} s (plain write "
            f"{plain:.3f} s): no flush was waited for\n{srv.describe()}")
    assert plain >= 0.1
    assert h.pread(4096, 0) == b"f" * 4096
    h.shutdown()


def test_trim(disk, structured):
    h = disk.connect(structured=structured)
    assert h.can_trim()
    data = pattern(MiB, 4)
    h.pwrite(data, 2 * MiB)
    h.trim(256 * 1024, 2 * MiB + 256 * 1024)
    # Trimmed data may read back as anything; everything else must survive.
    assert h.pread(256 * 1024, 2 * MiB) == data[:256 * 1024]
    assert h.pread(512 * 1024, 2 * MiB + 512 * 1024) == data[512 * 1024:]
    h.shutdown()


@pytest.mark.parametrize("flags", [0, nbd.CMD_FLAG_NO_HOLE],
                         ids=["may-trim", "no-hole"])
def test_zero(disk, structured, flags):
    h = disk.connect(structured=structured)
    assert h.can_zero()
    data = pattern(MiB, 5)
    h.pwrite(data, 4 * MiB)
    h.zero(100_000, 4 * MiB + 1000, flags)
    expect = data[:1000] + bytes(100_000) + data[101_000:]
    assert h.pread(MiB, 4 * MiB) == expect
    h.shutdown()


def test_cache_not_offered(disk):
    """memdisk has no cache callback: CACHE is not advertised, and a CACHE
    request is refused with EINVAL."""
    h = disk.connect(strict=False)
    assert not h.can_cache()
    expect_nbd_errno(errno.EINVAL, h.cache, 4096, 0)
    h.pwrite(b"c" * 512, 0)
    good_read_after_error(h, b"c" * 512, 0)
    h.shutdown()


# ---------------------------------------------------------------- errors


def test_read_past_end(disk, structured):
    h = disk.connect(structured=structured, strict=False)
    h.pwrite(b"k" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.pread, 4096, SIZE)
    good_read_after_error(h, b"k" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.pread, 4096, SIZE - 2048)
    good_read_after_error(h, b"k" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.pread, 512, SIZE * 4)
    good_read_after_error(h, b"k" * 4096, 0)
    h.shutdown()


def test_write_past_end(disk, structured):
    h = disk.connect(structured=structured, strict=False)
    h.pwrite(b"k" * 4096, 0)
    expect_nbd_errno(errno.ENOSPC, h.pwrite, b"w" * 4096, SIZE)
    good_read_after_error(h, b"k" * 4096, 0)
    expect_nbd_errno(errno.ENOSPC, h.pwrite, b"w" * 4096, SIZE - 1024)
    good_read_after_error(h, b"k" * 4096, 0)
    # Nothing of the failed write landed inside the disk.
    assert h.pread(1024, SIZE - 1024) == bytes(1024)
    # WRITE_ZEROES is a write: ENOSPC.  TRIM is not: EINVAL.
    expect_nbd_errno(errno.ENOSPC, h.zero, 4096, SIZE - 1024)
    good_read_after_error(h, b"k" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.trim, 4096, SIZE - 1024)
    good_read_after_error(h, b"k" * 4096, 0)
    h.shutdown()


def test_offset_length_overflow(disk, structured):
    """offset + length wraps around 2^64: must be refused, not wrap."""
    h = disk.connect(structured=structured, strict=False)
    h.pwrite(b"o" * 4096, 0)
    top = (1 << 64) - 2048
    expect_nbd_errno(errno.EINVAL, h.pread, 4096, top)
    good_read_after_error(h, b"o" * 4096, 0)
    expect_nbd_errno((errno.ENOSPC, errno.EINVAL), h.pwrite, b"w" * 4096, top)
    good_read_after_error(h, b"o" * 4096, 0)
    expect_nbd_errno((errno.ENOSPC, errno.EINVAL), h.zero, 4096, top)
    good_read_after_error(h, b"o" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.trim, 4096, top)
    good_read_after_error(h, b"o" * 4096, 0)
    h.shutdown()


def test_zero_length_requests(disk, structured):
    """The library answers EINVAL to zero-length READ/WRITE/TRIM/ZERO."""
    h = disk.connect(structured=structured, strict=False)
    h.pwrite(b"z" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.pread, 0, 0)
    good_read_after_error(h, b"z" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.pwrite, b"", 0)
    good_read_after_error(h, b"z" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.trim, 0, 0)
    good_read_after_error(h, b"z" * 4096, 0)
    expect_nbd_errno(errno.EINVAL, h.zero, 0, 0)
    good_read_after_error(h, b"z" * 4096, 0)
    h.shutdown()


def test_oversized_read(memdisk, structured):
    """A read above the payload limit is refused (EOVERFLOW or EINVAL)
    and the connection goes on. (libnbd itself refuses to send more than
    64 MiB, so the server's limit is lowered to 32 MiB here.)"""
    srv = memdisk("--max-request-size", "32M", size="128M")
    h = srv.connect(structured=structured, strict=False)
    h.pwrite(b"r" * 4096, 0)
    expect_nbd_errno((errno.EOVERFLOW, errno.EINVAL), h.pread,
                     32 * MiB + 4096, 0)
    good_read_after_error(h, b"r" * 4096, 0)
    h.shutdown()


def test_readonly_export_refuses_writes(memdisk, structured):
    srv = memdisk("--readonly", size="16M")
    h = srv.connect(structured=structured, strict=False)
    assert h.is_read_only()
    before = h.pread(4096, 0)
    expect_nbd_errno(errno.EPERM, h.pwrite, b"w" * 4096, 0)
    good_read_after_error(h, before, 0)
    # FUA is not advertised on a read-only export, so EINVAL (flag not
    # offered) is as right as EPERM here.
    expect_nbd_errno((errno.EPERM, errno.EINVAL), h.pwrite, b"w" * 4096, 0,
                     nbd.CMD_FLAG_FUA)
    good_read_after_error(h, before, 0)
    expect_nbd_errno(errno.EPERM, h.zero, 4096, 0)
    good_read_after_error(h, before, 0)
    expect_nbd_errno(errno.EPERM, h.trim, 4096, 0)
    good_read_after_error(h, before, 0)
    # Reads still work everywhere; the disk is untouched.
    assert h.pread(MiB, 15 * MiB) == bytes(MiB)
    h.shutdown()


# ---------------------------------------------------------------- raw client


def test_raw_flush_with_offset_or_length_rejected(disk, raw_nbd):
    c = raw_nbd(disk.sock)
    assert c.go() == REP_ACK
    assert c.size == SIZE
    err, _ = c.call(CMD_WRITE, 0, 8, payload=b"12345678")
    assert err == 0
    assert c.call(CMD_FLUSH, 4096, 0) == (NBD_EINVAL, b"")
    assert c.call(CMD_READ, 0, 8) == (0, b"12345678")
    assert c.call(CMD_FLUSH, 0, 4096) == (NBD_EINVAL, b"")
    assert c.call(CMD_READ, 0, 8) == (0, b"12345678")
    assert c.call(CMD_FLUSH, 0, 0) == (0, b"")


def test_raw_unknown_command_and_flags(disk, raw_nbd):
    c = raw_nbd(disk.sock)
    assert c.go() == REP_ACK
    assert c.call(CMD_WRITE, 0, 4, payload=b"abcd")[0] == 0
    assert c.call(99, 0, 4096) == (NBD_EINVAL, b"")
    assert c.call(CMD_READ, 0, 4) == (0, b"abcd")
    # Unknown command flag on a read.
    assert c.call(CMD_READ, 0, 4, flags=1 << 9) == (NBD_EINVAL, b"")
    assert c.call(CMD_READ, 0, 4) == (0, b"abcd")
    # Unknown flag on a write: the payload is consumed, nothing written.
    assert c.call(CMD_WRITE, 0, 4, flags=1 << 9,
                     payload=b"WXYZ") == (NBD_EINVAL, b"")
    assert c.call(CMD_READ, 0, 4) == (0, b"abcd")
    # NO_HOLE is only for WRITE_ZEROES.
    assert c.call(CMD_TRIM, 0, 4, flags=2) == (NBD_EINVAL, b"")
    assert c.call(CMD_READ, 0, 4) == (0, b"abcd")
    # CACHE is not offered by memdisk.
    assert c.call(CMD_CACHE, 0, 4) == (NBD_EINVAL, b"")
    assert c.call(CMD_WRITE_ZEROES, 0, 2) == (0, b"")
    assert c.call(CMD_READ, 0, 4) == (0, b"\0\0cd")


def test_raw_write_past_end_payload_consumed(disk, raw_nbd):
    """A refused WRITE's payload is skipped, not parsed as requests."""
    c = raw_nbd(disk.sock)
    assert c.go() == REP_ACK
    # The payload looks like a request header: it must not be taken as one.
    fake = bytes.fromhex("25609513") + bytes(24)
    err, _ = c.call(CMD_WRITE, SIZE, len(fake), payload=fake)
    assert err != 0
    assert c.call(CMD_READ, 0, 4) == (0, bytes(4))


def test_raw_readonly_write_payload_consumed(memdisk, raw_nbd):
    srv = memdisk("--readonly", size="1M")
    c = raw_nbd(srv.sock)
    assert c.go() == REP_ACK
    assert c.call(CMD_WRITE, 0, 4096, payload=b"p" * 4096) == \
        (NBD_EPERM, b"")
    assert c.call(CMD_READ, 0, 4096) == (0, bytes(4096))


def test_raw_oversized_write(disk, raw_nbd):
    """A WRITE above the 64 MiB payload limit is either refused with its
    payload consumed, or the connection is dropped (the spec allows both);
    the server keeps serving."""
    c = raw_nbd(disk.sock)
    assert c.go() == REP_ACK
    n = MAX_PAYLOAD + 4096
    try:
        c.send_request(CMD_WRITE, 0, n, payload=bytes(n))
        _, err, _ = c.reply()
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass                    # dropped: allowed
    else:
        assert err in (NBD_EINVAL, NBD_EOVERFLOW, NBD_ENOSPC), err
        assert c.call(CMD_READ, 0, 4) == (0, bytes(4))
    c2 = raw_nbd(disk.sock)
    assert c2.go() == REP_ACK
    assert c2.call(CMD_READ, 0, 4) == (0, bytes(4))


def test_raw_disc_finishes_outstanding_requests(memdisk, raw_nbd):
    """NBD_CMD_DISC right behind reads: every read is answered, then the
    server closes."""
    srv = memdisk("--latency-ms", "200", size="1M")
    c = raw_nbd(srv.sock)
    assert c.go() == REP_ACK
    cookies = {c.send_request(CMD_READ, i * 4096, 4096) for i in range(10)}
    c.send_request(CMD_DISC)    # no reply
    got = set()
    for _ in range(10):
        cookie, err, data = c.reply()
        assert err == 0 and data == bytes(4096)
        got.add(cookie)
    assert got == cookies
    assert c.at_eof(), "server did not close after NBD_CMD_DISC"


def test_raw_unknown_option_unsupported(disk, raw_nbd):
    c = raw_nbd(disk.sock)
    c.option(0x1234, b"hello")
    opt, rtype, _ = c.opt_reply()
    assert (opt, rtype) == (0x1234, REP_ERR_UNSUP)
    # Still in the handshake: GO works.
    assert c.go() == REP_ACK
    assert c.call(CMD_READ, 0, 16) == (0, bytes(16))


def test_raw_opt_list_and_abort(memdisk, raw_nbd):
    srv = memdisk("--export", "foo", size="1M")
    c = raw_nbd(srv.sock)
    c.option(OPT_LIST)
    names = []
    while True:
        opt, rtype, data = c.opt_reply()
        assert opt == OPT_LIST
        if rtype == REP_ACK:
            break
        assert rtype == REP_SERVER, rtype
        n = int.from_bytes(data[:4], "big")
        names.append(data[4:4 + n])
    assert names == [b"foo"]
    c.option(OPT_ABORT)
    # The server may acknowledge the abort; either way it then closes.
    try:
        opt, rtype, _ = c.opt_reply()
        assert (opt, rtype) == (OPT_ABORT, REP_ACK)
    except (EOFError, ConnectionResetError):
        pass
    assert c.at_eof()


def test_raw_go_unknown_export(memdisk, raw_nbd):
    srv = memdisk("--export", "foo", size="1M")
    c = raw_nbd(srv.sock)
    assert c.go(b"bar") == REP_ERR_UNKNOWN
    assert c.go(b"foo") == REP_ACK
    assert c.size == 1 << 20
    assert c.call(CMD_READ, 0, 16) == (0, bytes(16))


def test_raw_old_style_export_name(memdisk, raw_nbd):
    srv = memdisk("--export", "foo", size="1M")
    c = raw_nbd(srv.sock)
    c.export_name(b"foo")
    assert c.size == 1 << 20
    assert c.call(CMD_WRITE, 0, 3, payload=b"old")[0] == 0
    assert c.call(CMD_READ, 0, 3) == (0, b"old")


# ---------------------------------------------------------------- exports


def test_export_name(memdisk):
    srv = memdisk("--export", "foo", size="2M")
    assert srv.uri == srv.uri_for("foo")
    h = srv.connect(srv.uri_for("foo"))
    assert h.get_size() == 2 * MiB
    h.pwrite(b"foo!", 0)
    h.shutdown()

    # "" is the default export: the same disk.
    h = nbd.NBD()
    h.set_full_info(True)
    h.connect_uri(srv.uri_for(""))
    assert h.pread(4, 0) == b"foo!"
    assert h.get_canonical_export_name() == "foo"
    h.shutdown()

    # An unknown name fails cleanly...
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(srv.uri_for("bar"))
    del h
    # ... and the server keeps serving.
    h = srv.connect(srv.uri_for("foo"))
    assert h.pread(4, 0) == b"foo!"
    h.shutdown()


def test_export_name_opt_mode(memdisk):
    """In one handshake: INFO for a wrong name fails, GO for the right one
    still works."""
    srv = memdisk("--export", "foo", size="2M")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(srv.uri_for("bar"))
    with pytest.raises(nbd.Error):
        h.opt_info()
    with pytest.raises(nbd.Error):
        h.opt_go()
    h.set_export_name("foo")
    h.opt_info()
    assert h.get_size() == 2 * MiB
    h.opt_go()
    assert h.pread(8, 0) == bytes(8)
    h.shutdown()
