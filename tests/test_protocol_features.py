"""Protocol completeness (issue 7) with real clients: block status and the
base:allocation meta context, sparse reads (OFFSET_HOLE chunks, DF), FAST_ZERO,
several exports with descriptions, block size constraints, and the
CVE-2025-47711/47712 class of bad plugin extents.

Servers under test:
  * build/memdisk (sparse, multi-export, can_fast_zero) through the
    `memdisk` fixture of conftest.py;
  * tests/c/features_harness.c, compiled here with AddressSanitizer, for
    what memdisk cannot do: plugins reporting bad extents, block size
    constraints, FAST_ZERO refused with ENOTSUP, a description per export.
    Each behaviour is an export of the one harness server (see the comment
    at the top of the C file).

Extended headers (NBD_OPT_EXTENDED_HEADERS) are not implemented yet and are
not tested here.
"""

import errno
import json
import os
import random
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import nbd
import pytest

from conftest import run_tool
from nbdwire import (CMD_READ, INFO_BLOCK_SIZE, INFO_EXPORT, NBD_EINVAL, REP_ACK,
                     REP_ERR_BLOCK_SIZE_REQD, REP_ERR_UNKNOWN)
from support import C_DIR, HarnessProcess, compile_c_harness, stop_all

SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "HARNESS-ERROR",
                   "panicked")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
U32_MAX = (1 << 32) - 1
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO     # 3: how holes are reported
MAX_DESCRIPTORS = 65536                         # per reply (header doc)


# The harness: 5 GiB, [0, 1 MiB) data reading (offset % 251) + 1, the
# rest a hole reading as zeroes.
HARNESS_SIZE = 5 * GiB
HARNESS_DATA_END = MiB

MEASUREMENTS = []


def note(text):
    """Record a measurement; shown with `pytest -s` and in failures."""
    MEASUREMENTS.append(text)
    print(f"\n[measure] {text}")


def harness_bytes(offset, count):
    return bytes(((o % 251) + 1) if o < HARNESS_DATA_END else 0
                 for o in range(offset, offset + count))


# --------------------------------------------------------------------------
# libnbd helpers


def connect(uri, export=None, meta=True, strict=True, structured=True,
            full_info=False):
    """A libnbd handle; base:allocation is requested unless meta=False."""
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not structured:
        h.set_request_structured_replies(False)
    if not strict:
        h.set_strict_mode(0)
    if full_info:
        h.set_full_info(True)
    if export is not None:
        h.set_export_name(export)
    h.connect_uri(uri)
    return h


def block_status(h, count, offset, flags=0):
    """One NBD_CMD_BLOCK_STATUS; returns [(length, flags)] after checking the
    reply is one base:allocation chunk at the requested offset."""
    calls = []

    def cb(metacontext, off, entries, err):
        calls.append((metacontext, off, list(entries), err.value))
        return 0

    h.block_status(count, offset, cb, flags)
    assert len(calls) == 1, f"expected one extent callback, got {calls!r:.2000}"
    ctx, off, entries, err = calls[0]
    assert ctx == nbd.CONTEXT_BASE_ALLOCATION, ctx
    assert off == offset, (off, offset)
    assert err == 0, err
    assert len(entries) % 2 == 0
    return list(zip(entries[0::2], entries[1::2]))


def check_extents_valid(ext, count, offset, size, flags=0):
    """What the spec (and the library's documented clipping) demands of any
    successful block-status reply."""
    assert ext, "a successful block status reply must carry an extent"
    assert all(length > 0 for length, _ in ext), f"zero-length extent {ext[:8]}"
    assert all(f & ~HOLE_ZERO == 0 for _, f in ext), \
        f"undefined base:allocation flags {[f for _, f in ext if f & ~3][:8]}"
    total = sum(length for length, _ in ext)
    assert total <= count, f"extents cover {total} > requested {count}"
    assert offset + total <= size, \
        f"extents reach {offset + total}, past the export end {size}"
    assert len(ext) <= MAX_DESCRIPTORS, len(ext)
    if flags & nbd.CMD_FLAG_REQ_ONE:
        assert len(ext) == 1, f"REQ_ONE answered with {len(ext)} extents"


def clip(extents, count, req_one=False):
    """The library's documented treatment of a plugin's extents: empty ones
    skipped, the last cut at the end of the request, one for REQ_ONE, at
    most 65536."""
    out, left = [], count
    for length, ty in extents:
        if length == 0:
            continue
        take = min(length, left)
        out.append((take, ty & HOLE_ZERO))
        left -= take
        if left == 0 or req_one or len(out) == MAX_DESCRIPTORS:
            break
    return out


def merge(ext):
    """Adjacent runs of one type merged: [(start, length, type)]."""
    out = []
    for start, length, ty in ext:
        if out and out[-1][2] == ty and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, ty)
        else:
            out.append((start, length, ty))
    return out


def with_starts(offset, ext):
    out, pos = [], offset
    for length, ty in ext:
        out.append((pos, length, ty))
        pos += length
    return out


def full_map(h, size):
    """The whole allocation map, walked the way clients do it."""
    pos, out = 0, []
    while pos < size:
        ext = block_status(h, min(size - pos, U32_MAX), pos)
        check_extents_valid(ext, min(size - pos, U32_MAX), pos, size)
        out += with_starts(pos, ext)
        pos += sum(length for length, _ in ext)
    return merge(out)


def read_chunks(h, count, offset, flags=0):
    """pread_structured; returns (data, [(offset, length, status)])."""
    chunks = []

    def cb(buf, off, status, err):
        chunks.append((off, len(buf), status))
        if status == nbd.READ_HOLE:
            assert buf == bytes(len(buf)), "hole chunk buffer not zeroed"
        return 0

    data = h.pread_structured(count, offset, cb, flags)
    assert len(data) == count
    tiles = sorted(chunks)
    pos = offset
    for off, length, _ in tiles:
        assert off == pos and length > 0, f"chunks do not tile the read: {tiles}"
        pos += length
    assert pos == offset + count, f"chunks do not cover the read: {tiles}"
    return data, tiles


def expect_errno(want, fn, *args):
    want = want if isinstance(want, tuple) else (want,)
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errnum in want, (
            f"{getattr(fn, '__name__', fn)}{args!r:.200}: expected "
            f"{[errno.errorcode[w] for w in want]}, got {e.errnum} ({e})")
        return e
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args!r:.200} "
                         f"succeeded, expected {[errno.errorcode[w] for w in want]}")


# --------------------------------------------------------------------------
# A byte-counting relay: proof of how much data really crossed the wire.


class CountingProxy:
    """Unix-socket relay in front of an NBD server; counts the bytes in each
    direction over every connection made through it."""

    def __init__(self, target_sock, path):
        self.target = str(target_sock)
        self.path = str(path)
        self.to_server = 0
        self.to_client = 0
        self.lock = threading.Lock()
        self.stop = False
        self.socks = []
        self.threads = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def uri(self, export=""):
        return f"nbd+unix:///{export}?socket={self.path}"

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.target)
            with self.lock:
                self.socks += [c, s]
            for src, dst, up in ((c, s, True), (s, c, False)):
                t = threading.Thread(target=self._pipe, args=(src, dst, up),
                                     daemon=True)
                t.start()
                self.threads.append(t)

    def _pipe(self, src, dst, up):
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
                with self.lock:
                    if up:
                        self.to_server += len(data)
                    else:
                        self.to_client += len(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def counts(self):
        with self.lock:
            return self.to_server, self.to_client

    def close(self):
        self.stop = True
        self.listener.close()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture
def proxies(tmp_path):
    made = []
    d = Path(tempfile.mkdtemp(prefix="nbdpx-"))

    def make(target_sock):
        p = CountingProxy(target_sock, d / f"p{len(made)}.sock")
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# The C harness


@pytest.fixture(scope="module")
def harness_bin(tmp_path_factory):
    return compile_c_harness(
        C_DIR / "features_harness.c",
        tmp_path_factory.mktemp("features_harness") / "features_harness")


class Harness(HarnessProcess):
    name = "harness"

    def __init__(self, binary, size, log):
        super().__init__(binary, args=("--size", size), prefix="nbdfh-",
                         env={"NBDKIT_ASYNC_LOG": log} if log else None)
        self.size = size
        self.wait_ready(10)

    def uri(self, export=""):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self):
        """SIGTERM; exit 0, no sanitizer report, every handle closed."""
        self.send(signal.SIGTERM)
        self.wait_exit(15)
        self.assert_exit_ok(SANITIZER_MARKS)
        out = self.out()
        assert "main_loop returned 0" in out, self.report()
        opens, closes = self.count("open "), self.count("close ")
        assert opens == closes, f"{opens} opens, {closes} closes\n{self.report()}"


@pytest.fixture
def harness(harness_bin, request):
    """Factory: harness(size=HARNESS_SIZE) -> running Harness, always stopped."""
    started = []

    def start(size=HARNESS_SIZE):
        h = Harness(harness_bin, size, request.config.getoption("--memdisk-log"))
        started.append(h)
        return h

    try:
        yield start
    finally:
        stop_all(started)


# --------------------------------------------------------------------------
# A layout written to a memdisk, and its expected map

LAYOUT_SIZE = 64 * MiB


def write_layout(h):
    """Writes, trims and zeroes page-aligned ranges; returns the expected
    merged map [(start, length, type)] and the expected contents of the
    whole disk."""
    rnd = random.Random(7)
    writes = [(0, 64 * KiB), (MiB, 8 * KiB), (4 * MiB, 128 * KiB),
              (10 * MiB, MiB)]
    content = bytearray(LAYOUT_SIZE)
    for off, n in writes:
        data = rnd.randbytes(n)
        h.pwrite(data, off)
        content[off:off + n] = data
    h.trim(256 * KiB, 10 * MiB + 256 * KiB)
    content[10 * MiB + 256 * KiB:10 * MiB + 512 * KiB] = bytes(256 * KiB)
    h.zero(64 * KiB, 4 * MiB + 64 * KiB)
    content[4 * MiB + 64 * KiB:4 * MiB + 128 * KiB] = bytes(64 * KiB)
    expected = [
        (0, 64 * KiB, 0),
        (64 * KiB, MiB - 64 * KiB, HOLE_ZERO),
        (MiB, 8 * KiB, 0),
        (MiB + 8 * KiB, 3 * MiB - 8 * KiB, HOLE_ZERO),
        (4 * MiB, 64 * KiB, 0),
        (4 * MiB + 64 * KiB, 6 * MiB - 64 * KiB, HOLE_ZERO),
        (10 * MiB, 256 * KiB, 0),
        (10 * MiB + 256 * KiB, 256 * KiB, HOLE_ZERO),
        (10 * MiB + 512 * KiB, 512 * KiB, 0),
        (11 * MiB, LAYOUT_SIZE - 11 * MiB, HOLE_ZERO),
    ]
    return expected, bytes(content)


def nbdinfo_map(uri, srv=None):
    p = run_tool(["nbdinfo", "--map", uri], srv=srv)
    out = []
    for line in p.stdout.splitlines():
        fields = line.split()
        if not fields:
            continue
        out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return merge(out)


def qemu_img_map(uri, srv=None):
    p = run_tool(["qemu-img", "map", "--output=json", "-f", "raw", uri], srv=srv)
    out = []
    for e in json.loads(p.stdout):
        if e["data"]:
            ty = 0
            assert not e["zero"], e
        else:
            assert e["zero"], f"non-data extent not reported as zero: {e}"
            ty = HOLE_ZERO
        out.append((e["start"], e["length"], ty))
    return merge(out)


# ==========================================================================
# nbdinfo --map and qemu-img map


def test_map_matches_written_layout(memdisk):
    """nbdinfo --map and qemu-img map --output=json show exactly the data and
    hole extents written (writes, a trim and a zero punching holes), and
    the same map comes from block status walked through libnbd."""
    srv = memdisk(size=LAYOUT_SIZE)
    h = connect(srv.uri)
    expected, content = write_layout(h)
    for off in range(0, LAYOUT_SIZE, 16 * MiB):
        assert h.pread(16 * MiB, off) == content[off:off + 16 * MiB]
    assert full_map(h, LAYOUT_SIZE) == expected
    h.shutdown()

    assert nbdinfo_map(srv.uri, srv) == expected
    assert qemu_img_map(srv.uri, srv) == expected
    assert srv.alive()


# ==========================================================================
# Sparse copies of a 1 GiB disk


COPY_SIZE = GiB


def fill_sparse_1g(uri):
    """A few MB of data scattered over 1 GiB; returns (bytes written, map)."""
    h = connect(uri)
    rnd = random.Random(1)
    ranges = [(0, MiB), (3 * MiB + 4 * KiB, 12 * KiB), (300 * MiB, 2 * MiB),
              (512 * MiB - 4 * KiB, 8 * KiB), (COPY_SIZE - MiB, MiB)]
    for off, n in ranges:
        h.pwrite(rnd.randbytes(n), off)
    m = full_map(h, COPY_SIZE)
    h.shutdown()
    written = sum(n for _, n in ranges)
    assert sum(n for _, n, t in m if t == 0) == written, m
    return written, m


def allocated(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("tool", ["nbdcopy", "qemu-img"])
def test_sparse_copy_transfers_only_data(memdisk, proxies, tmp_path, tool):
    """Copying a mostly sparse 1 GiB memdisk to a local file and to another
    memdisk moves only the data: the bytes crossing the wire (counted by a
    relay in front of each server) are close to the data written, not
    1 GiB; the local copy is sparse; the copies compare identical."""
    src = memdisk(size="1G")
    dst = memdisk(size="1G")
    written, src_map = fill_sparse_1g(src.uri)
    slack = 2 * MiB        # headers, block status replies, handshake
    psrc = proxies(src.sock)

    # To a local file.
    out = tmp_path / "copy.img"
    if tool == "nbdcopy":
        argv = ["nbdcopy", psrc.uri(), str(out)]
    else:
        argv = ["qemu-img", "convert", "-f", "raw", "-O", "raw", psrc.uri(), str(out)]
    t0 = time.monotonic()
    run_tool(argv, srv=src)
    elapsed = time.monotonic() - t0
    up, down = psrc.counts()
    note(f"{tool} 1 GiB sparse -> file: {elapsed:.2f} s, server sent {down} B, "
         f"client sent {up} B, data {written} B, file allocated {allocated(out)} B")
    assert down >= written, (down, written)
    assert down < written + slack, \
        f"{tool} pulled {down} bytes from the server for {written} bytes of data"
    assert os.path.getsize(out) == COPY_SIZE
    assert written <= allocated(out) <= written + MiB, \
        f"local copy allocates {allocated(out)} bytes for {written} of data"
    run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri, str(out)], srv=src)

    # To another memdisk.
    pdst = proxies(dst.sock)
    before = psrc.counts()
    if tool == "nbdcopy":
        argv = ["nbdcopy", psrc.uri(), pdst.uri()]
    else:
        argv = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                psrc.uri(), pdst.uri()]
    t0 = time.monotonic()
    run_tool(argv, srv=dst)
    elapsed = time.monotonic() - t0
    down = psrc.counts()[1] - before[1]
    up_dst, _ = pdst.counts()
    note(f"{tool} 1 GiB sparse -> memdisk: {elapsed:.2f} s, source sent {down} B, "
         f"destination received {up_dst} B, data {written} B")
    assert down < written + slack, (down, written)
    assert written <= up_dst < written + slack, \
        f"{tool} pushed {up_dst} bytes to the destination for {written} bytes of data"
    run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri, dst.uri], srv=dst)
    h = connect(dst.uri)
    assert full_map(h, COPY_SIZE) == src_map, "destination map differs from the source's"
    h.shutdown()


# ==========================================================================
# Several exports


def test_memdisk_exports_listed_and_separate(memdisk, raw_nbd):
    """nbdinfo --list shows every export with its description; each export
    has its own contents; "" is the first; an unknown name fails cleanly
    and the server keeps serving."""
    srv = memdisk("--export", "a", "--export", "b", "--export", "c", size="16M")
    p = run_tool(["nbdinfo", "--list", "--json", srv.uri], srv=srv)
    listed = {e["export-name"]: e.get("description") for e in json.loads(p.stdout)["exports"]}
    assert listed == {n: "in-memory disk (libnbdkit-async example)" for n in "abc"}, listed
    p = run_tool(["nbdinfo", "--list", srv.uri], srv=srv)
    for n in "abc":
        assert f'export="{n}":' in p.stdout, p.stdout

    ha = connect(srv.uri_for("a"))
    hb = connect(srv.uri_for("b"))
    ha.pwrite(b"A" * 4096, 0)
    hb.pwrite(b"B" * 8192, 0)
    hb.pwrite(b"b" * 4096, MiB)
    assert ha.pread(8192, 0) == b"A" * 4096 + bytes(4096)
    assert ha.pread(4096, MiB) == bytes(4096)
    assert hb.pread(8192, 0) == b"B" * 8192
    assert hb.pread(4096, MiB) == b"b" * 4096
    assert block_status(ha, 2 * MiB, 0) == [(4096, 0), (2 * MiB - 4096, HOLE_ZERO)]
    assert block_status(hb, 2 * MiB, 0) == [(8192, 0), (MiB - 8192, HOLE_ZERO),
                                            (4096, 0), (MiB - 4096, HOLE_ZERO)]
    hc = connect(srv.uri_for("c"))
    assert hc.pread(2 * MiB, 0) == bytes(2 * MiB)
    assert block_status(hc, 2 * MiB, 0) == [(2 * MiB, HOLE_ZERO)]
    hdef = connect(srv.uri_for(""))
    assert hdef.pread(4096, 0) == b"A" * 4096, "the default export is not the first"
    for h in (ha, hb, hc, hdef):
        h.shutdown()

    # Unknown export: every client fails cleanly, the server stays up.
    p = run_tool(["nbdinfo", srv.uri_for("nosuch")], srv=srv, check=False)
    assert p.returncode != 0, p.stdout
    with pytest.raises(nbd.Error):
        connect(srv.uri_for("nosuch"))
    c = raw_nbd(srv.sock)
    assert c.go(b"nosuch") == REP_ERR_UNKNOWN
    assert c.go(b"b") == REP_ACK, "handshake did not go on after an unknown export"
    assert c.size == 16 * MiB
    err, data = c.call(CMD_READ, 0, 4096)
    assert (err, data) == (0, b"B" * 4096)
    assert srv.alive()
    h = connect(srv.uri_for("c"))
    assert h.pread(16, 0) == bytes(16)
    h.shutdown()


def test_harness_export_descriptions(harness):
    """Per-export descriptions from the export_description callback, in the
    NBD_OPT_LIST reply (nbdinfo --list) and in NBD_INFO_DESCRIPTION."""
    s = harness()
    p = run_tool(["nbdinfo", "--list", "--json", s.uri()])
    exports = json.loads(p.stdout)["exports"]
    names = [e["export-name"] for e in exports]
    assert len(names) == 17 and "good" in names and "bs512" in names, names
    for e in exports:
        assert e.get("description") == f"features harness: {e['export-name']}", e
    for name in ("good", "bs512", "tiny-2000000", "fastzero-enotsup"):
        h = connect(s.uri(name), full_info=True)
        assert h.get_export_description() == f"features harness: {name}"
        h.shutdown()
    h = connect(s.uri(""), full_info=True)
    assert h.get_export_description() == "features harness: good"
    assert h.pread(16, 0) == harness_bytes(0, 16)
    h.shutdown()
    with pytest.raises(nbd.Error):
        connect(s.uri("nosuch"))
    assert s.alive()


# ==========================================================================
# Block status through libnbd


def test_block_status_req_one_and_full(memdisk):
    """Block status with and without REQ_ONE, from aligned and unaligned
    offsets, against the written layout."""
    srv = memdisk(size=LAYOUT_SIZE)
    h = connect(srv.uri)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    expected, _ = write_layout(h)
    exp = [(n, t) for _, n, t in expected]
    assert block_status(h, LAYOUT_SIZE, 0) == exp

    one = nbd.CMD_FLAG_REQ_ONE
    assert block_status(h, LAYOUT_SIZE, 0, one) == [(64 * KiB, 0)]
    assert block_status(h, LAYOUT_SIZE - 32 * KiB, 32 * KiB, one) == [(32 * KiB, 0)]
    assert block_status(h, LAYOUT_SIZE - 64 * KiB, 64 * KiB, one) == [
        (MiB - 64 * KiB, HOLE_ZERO)]
    assert block_status(h, MiB, 10 * MiB + 300 * KiB, one) == [(212 * KiB, HOLE_ZERO)]
    assert block_status(h, 1000, 5, one) == [(1000, 0)]
    assert block_status(h, 1000, 5) == [(1000, 0)]
    # From inside a hole, across a data run, ending inside another hole.
    assert block_status(h, 2 * MiB, MiB - 4 * KiB) == [
        (4 * KiB, HOLE_ZERO), (8 * KiB, 0), (2 * MiB - 12 * KiB, HOLE_ZERO)]
    # Every extent of every answer is consistent with the expected map.
    rnd = random.Random(3)
    for _ in range(50):
        off = rnd.randrange(LAYOUT_SIZE)
        count = rnd.randrange(1, LAYOUT_SIZE - off + 1)
        for flags in (0, one):
            ext = block_status(h, count, off, flags)
            check_extents_valid(ext, count, off, LAYOUT_SIZE, flags)
            for start, n, ty in with_starts(off, ext):
                run = next(r for r in expected if r[0] <= start < r[0] + r[1])
                assert ty == run[2] and start + n <= run[0] + run[1], \
                    (off, count, flags, ext, run)
    h.shutdown()


EDGE_SIZE = 4 * GiB + 4 * MiB


def test_block_status_edges(memdisk):
    """Last byte, lengths crossing the end (EINVAL, server survives), huge
    lengths near the end, offset 0 length 2^32-1 on a >4 GiB sparse disk;
    nothing past the export end is ever reported."""
    srv = memdisk(size=EDGE_SIZE)
    size = EDGE_SIZE
    h = connect(srv.uri)
    h.pwrite(b"d" * 4096, 0)
    h.pwrite(b"e" * 8192, (1 << 32) - 4096)      # straddles 4 GiB
    h.pwrite(b"f" * 4096, size - 4096)
    one = nbd.CMD_FLAG_REQ_ONE

    assert block_status(h, 1, size - 1) == [(1, 0)]
    assert block_status(h, 1, size - 1, one) == [(1, 0)]
    assert block_status(h, 4096, size - 4096) == [(4096, 0)]
    assert block_status(h, 8192, size - 8192) == [(4096, HOLE_ZERO), (4096, 0)]

    ext = block_status(h, U32_MAX, 0)
    check_extents_valid(ext, U32_MAX, 0, size)
    assert ext == [(4096, 0), ((1 << 32) - 8192, HOLE_ZERO), (4095, 0)], ext
    assert block_status(h, U32_MAX, 0, one) == [(4096, 0)]
    ext = block_status(h, U32_MAX, 4096, one)
    assert ext == [((1 << 32) - 8192, HOLE_ZERO)], ext

    # A maximal request ending exactly at the export end.
    off = size - U32_MAX
    ext = block_status(h, U32_MAX, off)
    check_extents_valid(ext, U32_MAX, off, size)
    want = clip([((1 << 32) - 4096 - off, HOLE_ZERO), (8192, 0),
                 (size - 4096 - (1 << 32) - 4096, HOLE_ZERO), (4096, 0)], U32_MAX)
    assert ext == want, (ext, want)
    ext = block_status(h, U32_MAX, off, one)
    check_extents_valid(ext, U32_MAX, off, size, one)

    # Requests the spec forbids: the server answers EINVAL and stays usable.
    loose = connect(srv.uri, strict=False)
    for count, offset in [(2, size - 1), (U32_MAX, size - 4096), (1, size),
                          (U32_MAX, size), (4096, (1 << 64) - 2048),
                          (0, 0), (0, size - 1)]:
        for flags in (0, one):
            expect_errno(errno.EINVAL, block_status, loose, count, offset, flags)
            assert block_status(loose, 1, size - 1) == [(1, 0)]
    loose.shutdown()
    h.shutdown()

    # Without base:allocation negotiated, BLOCK_STATUS is refused.
    bare = connect(srv.uri, meta=False, strict=False)
    assert not bare.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    expect_errno(errno.EINVAL, block_status, bare, 4096, 0)
    assert bare.pread(4096, 0) == b"d" * 4096
    bare.shutdown()
    assert srv.alive()


# ==========================================================================
# FAST_ZERO


def test_fast_zero_memdisk(memdisk):
    srv = memdisk(size="16M")
    h = connect(srv.uri)
    assert h.can_fast_zero()
    h.pwrite(b"z" * MiB, 0)
    h.zero(MiB - 4096, 4096, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(MiB, 0) == b"z" * 4096 + bytes(MiB - 4096)
    assert block_status(h, 2 * MiB, 0) == [(4096, 0), (2 * MiB - 4096, HOLE_ZERO)]
    h.zero(8192, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(8192, 8 * MiB) == bytes(8192)
    h.shutdown()


def test_fast_zero_enotsup(harness):
    """A plugin that cannot zero fast answers ENOTSUP to FAST_ZERO; the
    flag is only offered (and passed) where can_fast_zero says so."""
    s = harness()
    h = connect(s.uri("fastzero-enotsup"))
    assert h.can_fast_zero() and h.can_zero()
    expect_errno(errno.ENOTSUP, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(4096, 0)                       # the slow way still works
    assert h.pread(16, 0) == harness_bytes(0, 16)
    h.shutdown()
    lines = [l for l in s.out().splitlines() if l.startswith("zero ")]
    assert len(lines) == 2, lines
    assert int(lines[0].split()[2]) & 8, lines        # NBDKIT_FLAG_FAST_ZERO
    assert not int(lines[1].split()[2]) & 8, lines

    g = connect(s.uri("good"), strict=False)
    assert not g.can_fast_zero()
    expect_errno(errno.EINVAL, g.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    g.zero(4096, 0)
    g.shutdown()
    assert len([l for l in s.out().splitlines() if l.startswith("zero ")]) == 3


# ==========================================================================
# Sparse reads: OFFSET_HOLE chunks and DF


def test_sparse_reads_and_df(memdisk):
    srv = memdisk(size="16M")
    h = connect(srv.uri)
    assert h.get_structured_replies_negotiated() and h.can_df()
    d1, d2 = os.urandom(4096), os.urandom(4096)
    h.pwrite(d1, 0)
    h.pwrite(d2, 12 * KiB)
    want = d1 + bytes(8192) + d2

    data, chunks = read_chunks(h, 16 * KiB, 0)
    assert data == want
    assert chunks == [(0, 4096, nbd.READ_DATA), (4096, 8192, nbd.READ_HOLE),
                      (12 * KiB, 4096, nbd.READ_DATA)], chunks

    # A half-hole read: a data chunk and an OFFSET_HOLE chunk.
    data, chunks = read_chunks(h, 8192, 2048)
    assert data == d1[2048:] + bytes(6144)
    assert chunks == [(2048, 2048, nbd.READ_DATA), (4096, 6144, nbd.READ_HOLE)], chunks

    # DF: exactly one data chunk, holes as real zeroes.
    for off, n in [(0, 16 * KiB), (2048, 8192), (4096, 8192), (MiB, 64 * KiB)]:
        data, chunks = read_chunks(h, n, off, nbd.CMD_FLAG_DF)
        assert data == (want + bytes(16 * MiB))[off:off + n]
        assert chunks == [(off, n, nbd.READ_DATA)], (off, n, chunks)

    # A read entirely in a hole is one hole chunk.
    data, chunks = read_chunks(h, 64 * KiB, MiB)
    assert data == bytes(64 * KiB)
    assert chunks == [(MiB, 64 * KiB, nbd.READ_HOLE)], chunks
    h.shutdown()

    # Without structured replies the same reads return the same bytes.
    s = connect(srv.uri, structured=False, meta=False)
    assert not s.get_structured_replies_negotiated()
    assert s.pread(16 * KiB, 0) == want
    assert s.pread(8192, 2048) == d1[2048:] + bytes(6144)
    s.shutdown()


def test_structured_holes_read_back_as_zeroes(memdisk):
    """Data overwritten by trim and zero reads back as zeroes, sent as
    OFFSET_HOLE chunks, and as zeroes in one chunk with DF."""
    srv = memdisk(size="16M")
    h = connect(srv.uri)
    data = os.urandom(MiB)
    h.pwrite(data, MiB)
    h.trim(512 * KiB, MiB)
    h.zero(256 * KiB, MiB + 512 * KiB)
    want = bytes(768 * KiB) + data[768 * KiB:]
    got, chunks = read_chunks(h, MiB, MiB)
    assert got == want
    assert chunks == [(MiB, 768 * KiB, nbd.READ_HOLE),
                      (MiB + 768 * KiB, 256 * KiB, nbd.READ_DATA)], chunks
    got, chunks = read_chunks(h, MiB, MiB, nbd.CMD_FLAG_DF)
    assert got == want and len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA
    assert h.pread(MiB, MiB) == want
    h.shutdown()


# ==========================================================================
# Block sizes


def test_block_size_info_and_misaligned_requests(memdisk, harness):
    srv = memdisk(size="16M")
    h = connect(srv.uri)
    assert [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                          nbd.SIZE_MAXIMUM)] == [1, 4096, 64 * MiB]
    h.shutdown()

    s = harness()
    h = connect(s.uri("bs512"), strict=False)
    assert [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                          nbd.SIZE_MAXIMUM)] == [512, 4096, 64 * KiB]
    # Aligned requests work.
    assert h.pread(4096, 512) == harness_bytes(512, 4096)
    assert h.pread(64 * KiB, 0) == harness_bytes(0, 64 * KiB)
    h.pwrite(b"x" * 512, 1024)
    h.trim(64 * KiB, 0)
    h.zero(64 * KiB, 64 * KiB)
    assert block_status(h, 2 * MiB, 0) == [(MiB, 0), (MiB, HOLE_ZERO)]
    # Aligned maximal block status, from 0 and ending at the export end
    # (CVE-2025-47712 was a rounding overflow on such requests).
    big = (1 << 32) - 512
    assert block_status(h, big, 0) == [(MiB, 0), (big - MiB, HOLE_ZERO)]
    assert block_status(h, big, HARNESS_SIZE - big) == [(big, HOLE_ZERO)]
    assert block_status(h, big, 512, nbd.CMD_FLAG_REQ_ONE) == [(MiB - 512, 0)]
    # Misaligned or oversized ones are refused before the plugin sees them.
    bad = [
        (h.pread, 512, 100), (h.pread, 100, 512), (h.pread, 1000, 0),
        (h.pread, 128 * KiB, 0), (h.pread, 64 * KiB + 512, 0),
        (h.pwrite, b"x" * 100, 0), (h.pwrite, b"x" * 512, 1),
        (h.pwrite, b"x" * (128 * KiB), 0),
        (h.trim, 100, 0), (h.trim, 512, 7), (h.zero, 512, 100),
        (h.zero, 1000, 0), (block_status, h, 100, 0),
        (block_status, h, 512, 256),
    ]
    for fn, *args in bad:
        expect_errno(errno.EINVAL, fn, *args)
        assert h.pread(512, 0) == harness_bytes(0, 512)
    h.shutdown()
    assert "HARNESS-ERROR" not in s.err(), s.report()


def _raw_go(c, name, infos=()):
    rtype = c.go(name, infos)
    return rtype, c.infos


def test_block_size_required_at_go(harness, raw_nbd):
    """A client that does not ask for NBD_INFO_BLOCK_SIZE is refused at GO
    with NBD_REP_ERR_BLOCK_SIZE_REQD when the minimum is above 1; asking
    for it then succeeds on the same connection, with the constraints
    enforced."""
    s = harness()
    c = raw_nbd(s.sock)
    rtype, _ = _raw_go(c, b"bs512")
    assert rtype == REP_ERR_BLOCK_SIZE_REQD, hex(rtype)
    rtype, infos = _raw_go(c, b"bs512", [INFO_BLOCK_SIZE])
    assert rtype == REP_ACK, hex(rtype)
    assert struct.unpack(">III", infos[INFO_BLOCK_SIZE]) == (512, 4096, 64 * KiB)
    size, _ = struct.unpack(">QH", infos[INFO_EXPORT])
    assert size == HARNESS_SIZE
    assert c.call(CMD_READ, 512, 512) == (0, harness_bytes(512, 512))
    assert c.call(CMD_READ, 100, 512)[0] == NBD_EINVAL
    assert c.call(CMD_READ, 0, 512) == (0, harness_bytes(0, 512))

    # An export without constraints needs no block-size request.
    c2 = raw_nbd(s.sock)
    assert _raw_go(c2, b"good")[0] == REP_ACK
    assert c2.call(CMD_READ, 1, 3) == (0, harness_bytes(1, 3))
    assert "HARNESS-ERROR" not in s.err(), s.report()


# ==========================================================================
# Bad extents from a plugin (CVE-2025-47711/47712 class)


def plugin_extents(mode, count, offset):
    """What the harness's extents callback replies with (see the C file)."""
    size = HARNESS_SIZE
    if mode == "good" or mode == "zero-length":
        out = []
        end = offset + count
        if offset < HARNESS_DATA_END:
            stop = min(end, HARNESS_DATA_END)
            out.append((stop - offset, 0))
            offset = stop
        if offset < end:
            out.append((end - offset, HOLE_ZERO))
        return out
    if mode == "past-end":
        return [(size - offset + GiB, 0)]
    if mode == "huge":
        return [((1 << 64) - 1, 0)]
    if mode == "exact4g":
        return [(1 << 32, 0)]
    if mode == "more":
        m = min((count + MiB + 4095) // 4096, 200000)
        return [(4096, HOLE_ZERO if i % 2 else 0) for i in range(m)]
    if mode.startswith("tiny-"):
        n = min(int(mode[5:]), 70000)      # no more are ever sent
        return [(1, HOLE_ZERO if i % 2 else 0) for i in range(n)]
    if mode == "types":
        return [(count // 2 or 1, 0xfffffffc), (count, 0xffffffff)]
    return None                             # no valid extent: EIO


WALKABLE_MODES = ("good", "past-end", "huge", "exact4g", "zero-length", "types")
BAD_MODES = ["good", "past-end", "huge", "exact4g", "zero-length",
             "only-zero-length", "none", "null", "more", "tiny-100000",
             "tiny-2000000", "types", "fail"]


@pytest.mark.parametrize("mode", BAD_MODES)
def test_bad_plugin_extents_never_break_the_spec(harness, mode):
    """Whatever a plugin replies to `extents`, a strict libnbd client gets
    either a valid reply (one chunk, at least one extent, none empty, none
    past the request or the export, one for REQ_ONE, at most 65536) that is
    the documented clipping of what the plugin said, or a clean EIO; the
    connection and the server stay usable."""
    s = harness()
    size = HARNESS_SIZE
    h = connect(s.uri(mode))                      # strict mode ON
    assert h.get_strict_mode() & nbd.STRICT_BOUNDS
    requests = [(U32_MAX, 0), (U32_MAX, size - U32_MAX), (1, size - 1),
                (4096, size - 4096), (MiB, 12345), (1, 0),
                (3 * MiB, MiB - 5), (1 << 31, 3 * GiB)]
    outcomes = []
    for count, offset in requests:
        for flags in (0, nbd.CMD_FLAG_REQ_ONE):
            req_one = bool(flags)
            want = plugin_extents(mode, count, offset)
            want = clip(want, count, req_one) if want is not None else None
            try:
                ext = block_status(h, count, offset, flags)
            except nbd.Error as e:
                assert e.errnum == errno.EIO, \
                    f"{mode} ({count}, {offset}, {flags}): {e}\n{s.report()}"
                assert want is None or mode == "tiny-2000000", \
                    f"{mode} ({count}, {offset}, {flags}) failed: {e}\n{s.report()}"
                outcomes.append("EIO")
            else:
                check_extents_valid(ext, count, offset, size, flags)
                assert want is not None, f"{mode}: expected EIO, got {ext[:8]}"
                assert ext == want, f"{mode} ({count}, {offset}, {flags}): " \
                                    f"got {ext[:8]}... ({len(ext)}), want {want[:8]}... ({len(want)})"
                outcomes.append(len(ext))
            # The connection is still good.
            assert h.pread(64, 0) == harness_bytes(0, 64)
    h.shutdown()
    if mode in WALKABLE_MODES:
        # Real clients walking the whole export get a map that ends exactly
        # at the export end, however far the plugin's extents reached.
        for tool_map in (nbdinfo_map, qemu_img_map):
            m = tool_map(s.uri(mode))
            assert m[0][0] == 0 and all(n > 0 for _, n, _ in m), m
            assert all(a[0] + a[1] == b[0] for a, b in zip(m, m[1:])), m
            assert m[-1][0] + m[-1][1] == size, (tool_map.__name__, m)
            if mode in ("good", "zero-length"):
                assert m == [(0, MiB, 0), (MiB, size - MiB, HOLE_ZERO)], m
            if mode in ("past-end", "huge", "exact4g"):
                assert m == [(0, size, 0)], m
    if mode == "tiny-2000000":
        note(f"2,000,000 one-byte extents from the plugin -> {set(outcomes)} "
             f"(EIO = rejected by the library)")
    g = connect(s.uri("good"))
    assert block_status(g, 2 * MiB, 0) == [(MiB, 0), (MiB, HOLE_ZERO)]
    g.shutdown()
    assert s.alive()


@pytest.mark.parametrize("mode", ["badread", "read-wrap"])
def test_bad_sparse_read_extents(harness, mode):
    """nbdkit_reply_read_extents with extents that do not cover the read
    (short by a byte, or lengths overflowing u64 to exactly the count)
    answers a clean EIO with or without structured replies and DF; the
    connection stays usable."""
    s = harness()
    for structured in (True, False):
        h = connect(s.uri(mode), structured=structured, meta=structured)
        for flags in ((0, nbd.CMD_FLAG_DF) if structured else (0,)):
            for count, offset in [(4096, 0), (8192, 2 * MiB), (1, 5)]:
                if structured:
                    expect_errno(errno.EIO, h.pread_structured, count, offset,
                                 lambda *a: 0, flags)
                else:
                    expect_errno(errno.EIO, h.pread, count, offset)
                # Other requests on the same connection are answered.
                if structured:
                    assert block_status(h, 4096, 0) == [(4096, 0)]
                h.flush()
        h.shutdown()
    g = connect(s.uri("good"))
    assert g.pread(64, 0) == harness_bytes(0, 64)
    g.shutdown()
    assert s.alive()
