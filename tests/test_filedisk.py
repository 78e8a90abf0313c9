"""c-examples/filedisk.c: a real file-backed disk on the synchronous API
(parallel thread model, multi-conn), driven by real clients: qemu-img,
nbdcopy with several connections, nbdinfo, libnbd and fio's nbd engine.

Every server is build/filedisk on a sparse temp file (truncate), listening
on a Unix socket in a private tmp dir; it is always stopped at teardown
with SIGTERM and must exit 0 (kill -9 and fail otherwise). Server stderr
(NBDKIT_ASYNC_LOG=debug: one line per connection event, none per request)
is shown in assertion messages.

Run with: /usr/bin/python3 -m pytest -q tests/test_filedisk.py
"""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from support import close_politely as close
from support import HarnessProcess, make_ca, make_leaf, stop_all, tool_env

ROOT = Path(__file__).resolve().parent.parent
FILEDISK = ROOT / "build" / "filedisk"

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB
START_TIMEOUT = 10
STOP_TIMEOUT = 10
TOOL_TIMEOUT = 60

CONN_RE = re.compile(r"debug: conn \d+: new connection from ")


class Filedisk(HarnessProcess):
    """One build/filedisk process."""

    name = "filedisk"

    def __init__(self, image, args=(), unix=True):
        self.image = str(image)
        log = os.environ.get("NBDKIT_ASYNC_LOG", "")
        # NBDKIT_ASYNC_LOG=debug unless trace: connections() counts debug lines
        super().__init__(FILEDISK, args, before=(self.image,), prefix="nbdka-fd-", unix=unix,
                         asan=False,
                         env=None if log.lower() == "trace" else {"NBDKIT_ASYNC_LOG": "debug"})
        self.uris = []

    @property
    def uri(self):
        return self.uris[0]

    def describe(self):
        return self.report()

    def wait_ready(self, lines):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            out = self.out()
            if out.count("\n") >= lines and (self.sock is None or os.path.exists(self.sock)):
                break
            if self.proc.poll() is not None:
                pytest.fail("filedisk exited before printing its URI\n" + self.describe())
            if time.monotonic() > deadline:
                pytest.fail("filedisk printed no URI within %ss\n%s" % (START_TIMEOUT, self.describe()))
            time.sleep(0.01)
        self.uris = out.splitlines()[:lines]

    def connections(self):
        """Connections accepted so far (from the debug log)."""
        return len(CONN_RE.findall(self.err()))

    def connect(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        return h

    def run(self, argv, timeout=TOOL_TIMEOUT, cwd=None):
        """Runs a client tool; it must exit 0 in time."""
        argv = [str(a) for a in argv]
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout, env=tool_env(), cwd=cwd)
        except subprocess.TimeoutExpired as e:
            pytest.fail("%s did not finish within %ss\nstdout: %s\nstderr: %s\n%s" % (
                " ".join(argv), timeout, e.stdout, e.stderr, self.describe()))
        assert p.returncode == 0, "%s exited %d\nstdout: %s\nstderr: %s\n%s" % (
            " ".join(argv), p.returncode, p.stdout, p.stderr, self.describe())
        return p

    def stop(self):
        """SIGTERM; the server must exit 0 within STOP_TIMEOUT."""
        self.send(signal.SIGTERM)
        self.wait_exit(STOP_TIMEOUT)
        self.assert_exit_ok(("panicked",))


@pytest.fixture
def image(tmp_path):
    """A sparse 64 MiB file: no blocks allocated."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


@pytest.fixture
def filedisk(request):
    """Factory: filedisk(image, *args, unix=True) -> a listening Filedisk.
    Every server is stopped at teardown (SIGTERM, exit 0 required)."""
    if not FILEDISK.exists():
        pytest.fail("%s does not exist: build it with `flock /tmp/nbdkit-async-build.lock make`" % FILEDISK)
    servers = []

    def start(img, *args, unix=True):
        srv = Filedisk(img, args, unix=unix)
        servers.append(srv)
        srv.wait_ready(int(unix) + sum(1 for a in args if a == "--tcp"))
        return srv

    try:
        yield start
    finally:
        stop_all(servers)


def wait_aio(h, cookies, srv, timeout=20):
    """Polls h until every cookie completed successfully (each cookie is
    retired exactly once: a retired cookie reads as not completed)."""
    deadline = time.monotonic() + timeout
    pending = set(cookies)
    while pending:
        for ck in list(pending):
            if h.aio_command_completed(ck):   # raises nbd.Error on failure
                pending.discard(ck)
        if pending:
            assert time.monotonic() < deadline, "%d aio commands not complete after %ss\n%s" % (
                len(pending), timeout, srv.describe())
            h.poll(50)


def random_image(path, size=SIZE, seed=4):
    """Random data with about a third of its MiBs all zero (so that clients
    send zero/trim requests too), written as a fully allocated file."""
    rnd = random.Random(seed)
    data = bytearray(os.urandom(size))
    for off in range(0, size, MiB):
        if rnd.random() < 0.33:
            data[off:off + MiB] = bytes(MiB)
    path.write_bytes(data)
    return bytes(data)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def blocks(path):
    return os.stat(path).st_blocks  # 512-byte units


# ---------------------------------------------------------------- copying

def test_qemu_img_convert_in_and_out(filedisk, image, tmp_path):
    """qemu-img convert a random 64 MiB image in (onto the sparse file) and
    back out; all three copies are identical."""
    src = tmp_path / "src.img"
    data = random_image(src)
    srv = filedisk(image)
    srv.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, srv.uri])
    assert file_bytes(image) == data, "the backing file differs from what qemu-img wrote"
    out = tmp_path / "out.img"
    srv.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, out])
    srv.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, out])
    srv.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri])
    assert file_bytes(out) == data


def test_nbdcopy_four_connections_both_ways(filedisk, image, tmp_path):
    """nbdcopy --connections=4 in and out: really 4 connections each way
    (the export advertises multi-conn; nbdcopy caps connections at its
    thread count, which defaults to the CPU count, hence --threads=4),
    byte-identical results."""
    src = tmp_path / "src.img"
    data = random_image(src, seed=5)
    srv = filedisk(image)

    before = srv.connections()
    srv.run(["nbdcopy", "--connections=4", "--threads=4", src, srv.uri])
    used_in = srv.connections() - before
    assert file_bytes(image) == data, "the backing file differs from what nbdcopy wrote"

    out = tmp_path / "out.img"
    before = srv.connections()
    srv.run(["nbdcopy", "--connections=4", "--threads=4", srv.uri, out])
    used_out = srv.connections() - before
    assert file_bytes(out) == data

    assert used_in >= 4 and used_out >= 4, (
        "nbdcopy used %d connections in and %d out, expected 4 (multi-conn)\n%s"
        % (used_in, used_out, srv.describe()))


# ---------------------------------------------------------------- capabilities

def nbdinfo(srv):
    p = srv.run(["nbdinfo", "--json", srv.uri])
    info = json.loads(p.stdout)
    assert len(info["exports"]) == 1, p.stdout
    return info["exports"][0]


def test_nbdinfo_shows_multi_conn(filedisk, image):
    srv = filedisk(image)
    e = nbdinfo(srv)
    assert e["export-size"] == SIZE, e
    assert e["can_multi_conn"] is True, e
    assert e["is_read_only"] is False, e
    for cap in ("can_flush", "can_trim", "can_zero", "can_fua"):
        assert e[cap] is True, (cap, e)


def test_readonly(filedisk, image, tmp_path):
    """--readonly: advertised read-only (still multi-conn); a write that
    reaches the server anyway is refused with EPERM; the file is untouched."""
    src = tmp_path / "src.img"
    data = random_image(src, size=SIZE, seed=6)
    shutil.copyfile(src, image)
    srv = filedisk(image, "--readonly")
    e = nbdinfo(srv)
    assert e["is_read_only"] is True, e
    assert e["can_multi_conn"] is True, e
    assert e["can_trim"] is False and e["can_zero"] is False, e

    h = srv.connect()
    try:
        assert h.is_read_only()
        assert h.pread(MiB, 3 * MiB) == data[3 * MiB:4 * MiB]
        h.set_strict_mode(0)                  # let the write reach the server
        with pytest.raises(nbd.Error) as ei:
            h.pwrite(b"\xff" * 4096, 0)
        assert ei.value.errnum == errno.EPERM, ei.value
        assert h.pread(4096, 0) == data[:4096]
    finally:
        close(h)
    out = tmp_path / "out.img"
    srv.run(["nbdcopy", "--connections=4", "--threads=4", srv.uri, out])
    assert file_bytes(out) == data
    assert file_bytes(image) == data


def test_tcp_listener(filedisk, image):
    """--tcp HOST:0 prints the real port, after the Unix URI; both name
    the file's export."""
    srv = filedisk(image, "--tcp", "127.0.0.1:0")
    assert srv.uris[0].startswith("nbd+unix:///%s?socket=" % image.name), srv.uris
    m = re.fullmatch(r"nbd://127\.0\.0\.1:(\d+)/" + re.escape(image.name), srv.uris[1])
    assert m and int(m.group(1)) > 0, srv.uris
    h = nbd.NBD()
    h.connect_uri(srv.uris[1])
    try:
        h.pwrite(b"tcp!" * 1024, MiB)
        assert h.pread(4096, MiB) == b"tcp!" * 1024
    finally:
        close(h)
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), 4096, MiB) == b"tcp!" * 1024


# ---------------------------------------------------------------- trim / zero / flush

def test_trim_makes_the_file_sparse(filedisk, image):
    """Trim punches a hole: st_blocks drops by the trimmed range, and the
    range reads back as zeroes (through NBD and in the file)."""
    srv = filedisk(image)
    h = srv.connect()
    try:
        assert h.can_trim()
        data = os.urandom(8 * MiB)
        h.pwrite(data, 8 * MiB)
        h.flush()
        full = blocks(image)
        assert full >= 8 * MiB // 512, "writing 8 MiB allocated only %d blocks" % full
        h.trim(4 * MiB, 10 * MiB)
        after = blocks(image)
        assert after <= full - 4 * MiB // 512 + 64, (
            "trim of 4 MiB left st_blocks %d -> %d (expected a drop of %d)\n%s"
            % (full, after, 4 * MiB // 512, srv.describe()))
        assert h.pread(4 * MiB, 10 * MiB) == bytes(4 * MiB)
        assert h.pread(2 * MiB, 8 * MiB) == data[:2 * MiB]
        assert h.pread(2 * MiB, 14 * MiB) == data[6 * MiB:]
        with open(image, "rb") as f:
            assert os.pread(f.fileno(), 4 * MiB, 10 * MiB) == bytes(4 * MiB)
    finally:
        close(h)


def test_zero_with_and_without_no_hole(filedisk, image):
    """Write-zeroes reads back as zeroes either way; with NO_HOLE the range
    must stay provisioned (st_blocks does not drop)."""
    srv = filedisk(image)
    h = srv.connect()
    try:
        assert h.can_zero()
        data = os.urandom(8 * MiB)
        h.pwrite(data, 16 * MiB)
        h.flush()

        full = blocks(image)
        h.zero(2 * MiB, 16 * MiB, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(2 * MiB, 16 * MiB) == bytes(2 * MiB)
        provisioned = blocks(image)
        assert provisioned >= full - 64, (
            "zero with NO_HOLE deallocated: st_blocks %d -> %d\n%s" % (full, provisioned, srv.describe()))

        h.zero(2 * MiB, 20 * MiB)
        assert h.pread(2 * MiB, 20 * MiB) == bytes(2 * MiB)

        # Unaligned edges, FUA, and the data around the zeroed ranges.
        h.zero(5000, 18 * MiB + 123, nbd.CMD_FLAG_FUA)
        h.zero(7000, 22 * MiB + 1, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        expect = bytearray(data)
        for off, n in ((0, 2 * MiB), (4 * MiB, 2 * MiB), (2 * MiB + 123, 5000), (6 * MiB + 1, 7000)):
            expect[off:off + n] = bytes(n)
        assert h.pread(8 * MiB, 16 * MiB) == bytes(expect)
    finally:
        close(h)
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), 8 * MiB, 16 * MiB) == bytes(expect)


def test_flush_and_fua(filedisk, image):
    srv = filedisk(image)
    h = srv.connect()
    try:
        assert h.can_flush() and h.can_fua()
        h.pwrite(b"A" * 65536, 0)
        h.flush()
        h.pwrite(b"B" * 65536, 65536, nbd.CMD_FLAG_FUA)
        h.flush()
        assert h.pread(131072, 0) == b"A" * 65536 + b"B" * 65536
    finally:
        close(h)
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), 131072, 0) == b"A" * 65536 + b"B" * 65536


def test_multi_conn_write_flush_read(filedisk, image):
    """Write on A (completed), flush on B, read on C: C sees A's data, and
    so does the file."""
    srv = filedisk(image)
    a, b, c = srv.connect(), srv.connect(), srv.connect()
    try:
        for h in (a, b, c):
            assert h.can_multi_conn()
        data = os.urandom(1 * MiB + 4096)
        a.pwrite(data, 5 * MiB - 4096)
        b.flush()
        assert c.pread(len(data), 5 * MiB - 4096) == data
        # ... with A's writes in flight as aio, completed before B's flush.
        bufs = [nbd.Buffer.from_bytearray(bytearray(os.urandom(64 * KiB))) for _ in range(32)]
        cookies = [a.aio_pwrite(buf, 32 * MiB + i * 64 * KiB) for i, buf in enumerate(bufs)]
        wait_aio(a, cookies, srv)
        b.flush()
        assert c.pread(32 * 64 * KiB, 32 * MiB) == b"".join(buf.to_bytearray() for buf in bufs)
    finally:
        for h in (a, b, c):
            close(h)
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), len(data), 5 * MiB - 4096) == data


# ---------------------------------------------------------------- fio

FIO_JOBS = 4
FIO_SIZE = 16 * MiB        # per job; jobs cover disjoint 16 MiB ranges


def test_fio_verify(filedisk, image, tmp_path):
    """fio --ioengine=nbd: 4 jobs (4 connections), queue depth 32, random
    4 KiB reads and writes with crc32c verification of every written block,
    bounded in time; no errors and no verify failures."""
    srv = filedisk(image)
    out = tmp_path / "fio.json"
    before = srv.connections()
    srv.run(["fio", "--name=filedisk-verify", "--ioengine=nbd", "--uri=" + srv.uri,
             "--rw=randrw", "--bs=4k", "--iodepth=32", "--numjobs=%d" % FIO_JOBS,
             "--size=%d" % FIO_SIZE, "--offset_increment=%d" % FIO_SIZE,
             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
             "--loops=2", "--runtime=10", "--group_reporting=0",
             "--output-format=json", "--output=%s" % out], timeout=60, cwd=tmp_path)
    result = json.loads(out.read_text())
    jobs = result["jobs"]
    assert len(jobs) == FIO_JOBS, out.read_text()
    for j in jobs:
        assert j["error"] == 0, "fio job error %s\n%s" % (j["error"], srv.describe())
        assert j["write"]["io_bytes"] > 0, j["write"]
        # The verify pass reads back every written block.
        assert j["read"]["io_bytes"] >= j["write"]["io_bytes"], (j["read"], j["write"])
    assert srv.connections() - before >= FIO_JOBS, srv.describe()
    iops = sum(j["read"]["iops"] + j["write"]["iops"] for j in jobs)
    print("fio: %d jobs, %.0f IOPS total (read+write, incl. verify reads)" % (FIO_JOBS, iops))


# ---------------------------------------------------------------- parity with memdisk

def test_socket_activation_and_fd(image):
    """libnbd's systemd socket activation (it binds a socket and starts the
    server with LISTEN_FDS) and a client on the server's stdin (--fd 0)."""
    h = nbd.NBD()
    h.connect_systemd_socket_activation([str(FILEDISK), str(image)])
    h.pwrite(b"act!" * 1024, 2 * MiB)
    assert h.pread(4096, 2 * MiB) == b"act!" * 1024
    h.shutdown()
    h = nbd.NBD()
    h.connect_command([str(FILEDISK), str(image), "--fd", "0"])
    assert h.pread(4096, 2 * MiB) == b"act!" * 1024
    h.shutdown()


def test_several_files_are_several_exports(filedisk, image, tmp_path):
    """Each file is an export named after it; the first is the default."""
    other = tmp_path / "other.img"
    other.write_bytes(b"\x11" * MiB)
    srv = filedisk(image, str(other))
    listing = json.loads(subprocess.run(["nbdinfo", "--list", "--json", srv.uri], capture_output=True,
                                        text=True, timeout=30, env=tool_env(), check=True).stdout)
    assert sorted(e["export-name"] for e in listing["exports"]) == sorted([image.name, "other.img"])
    h = nbd.NBD()
    h.set_export_name("other.img")
    h.connect_unix(srv.sock)
    assert h.get_size() == MiB
    h.pwrite(b"\x22" * 4096, 0)
    close(h)
    assert other.read_bytes()[:4096] == b"\x22" * 4096
    d = nbd.NBD()
    d.set_export_name("")
    d.connect_unix(srv.sock)
    assert d.get_size() == SIZE, "the default export is the first file"
    close(d)


def test_block_status_shows_the_files_holes(filedisk, image):
    """Block status from SEEK_DATA/SEEK_HOLE: written ranges are data, the
    rest of the sparse file holes, as nbdinfo --map shows."""
    with open(image, "r+b") as f:
        os.pwrite(f.fileno(), os.urandom(2 * MiB), 8 * MiB)
    srv = filedisk(image)
    out = subprocess.run(["nbdinfo", "--map", "--json", srv.uri], capture_output=True, text=True,
                         timeout=30, env=tool_env(), check=True).stdout
    extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    assert extents == [(0, 8 * MiB, 3), (8 * MiB, 2 * MiB, 0), (10 * MiB, SIZE - 10 * MiB, 3)], extents


def test_tls_flags(filedisk, image, tmp_path):
    """--tls=require --tls-certificates DIR: TLS clients are served,
    plaintext ones refused."""
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "ca", "filedisk test CA")
    make_leaf(d, "server", "ca", "localhost", "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n")
    srv = filedisk(image, "--tls=require", "--tls-certificates", str(d))
    assert srv.uri.startswith("nbds+unix://"), srv.uri
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri("nbds+unix:///%s?socket=%s&tls-certificates=%s" % (image.name, srv.sock, d))
    assert h.get_size() == SIZE
    close(h)
    plain = nbd.NBD()
    with pytest.raises(nbd.Error):
        plain.connect_unix(srv.sock)
