"""build/asio-memdisk: the first C++ example, driven by libnbd."""

import os
import signal
import sys
import time
from pathlib import Path

import nbd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cpp"))
import procs  # noqa: E402
from support import wait_until_consumed  # noqa: E402

MEMDISK = Path(os.environ.get("ASIO_MEMDISK", procs.BUILD / "asio-memdisk"))
MiB = 1 << 20


@pytest.fixture
def ps():
    assert MEMDISK.exists(), f"{MEMDISK} missing: run make"
    p = procs.Procs()
    try:
        yield p
    finally:
        failures = p.close()
        assert not failures, "\n\n".join(failures)


def memdisk(ps, *args, size="64M"):
    sock = ps.sock("memdisk")
    srv = ps.server([MEMDISK, "--unix", sock, "--size", size, *args],
                    "asio-memdisk")
    assert srv.uri == f"nbd+unix:///?socket={sock}", srv.uri
    return srv


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_write_read_zero_trim_flush(ps):
    srv = memdisk(ps, "--latency-ms", "1")
    h = connect(srv.uri)
    assert h.get_size() == 64 * MiB
    assert h.can_flush() and h.can_zero() and h.can_trim()
    assert h.can_multi_conn() and not h.is_read_only()
    data = os.urandom(3 * MiB + 123)
    h.pwrite(data, 5 * MiB + 7)
    assert h.pread(len(data), 5 * MiB + 7) == data
    h.zero(4096, 5 * MiB + 7)
    h.trim(4096, 5 * MiB + 7 + 8192)
    got = h.pread(16384, 5 * MiB + 7)
    assert got == (bytes(4096) + data[4096:8192] +
                   bytes(4096) + data[12288:16384])
    h.pwrite(b"f" * 512, 0, nbd.CMD_FLAG_FUA)
    h.flush()
    # A second client sees the same disk.
    assert connect(srv.uri).pread(512, 0) == b"f" * 512


def test_1000_reads_in_flight_on_few_threads(ps):
    srv = memdisk(ps, "--latency-ms", "100", "--threads", "2", size="8M")
    h = connect(srv.uri)
    n, block = 1000, 4096
    pattern = b"".join(i.to_bytes(8, "little") * (block // 8) for i in range(n))
    h.pwrite(pattern, 0)
    bufs = [nbd.Buffer(block) for _ in range(n)]
    threads = []
    t0 = time.monotonic()
    cookies = [h.aio_pread(bufs[i], i * block) for i in range(n)]
    deadline = t0 + 10
    while h.aio_in_flight() > 0:
        threads.append(srv.threads())
        assert time.monotonic() < deadline, "reads did not finish in 10 s"
        h.poll(1000)
    elapsed = time.monotonic() - t0
    for i in range(n):
        assert h.aio_command_completed(cookies[i])
    for i in (0, 1, 499, 999):
        assert bufs[i].to_bytearray() == pattern[i * block:(i + 1) * block]
    print(f"asio-memdisk: 1000 reads at 100 ms latency in {elapsed:.3f} s, "
          f"threads {max(threads)}")
    assert elapsed < 1.0, f"took {elapsed:.2f} s\n{srv.describe()}"
    assert max(threads) <= 4, threads


def test_tcp_listener_and_sigint(ps):
    srv = ps.server([MEMDISK, "--tcp", "127.0.0.1:0", "--size", "1M"],
                    "asio-memdisk")
    assert srv.uri.startswith("nbd://127.0.0.1:") and srv.uri.endswith("/")
    h = connect(srv.uri)
    h.pwrite(b"t" * 1024, 0)
    assert h.pread(1024, 0) == b"t" * 1024
    h.shutdown()
    srv.stop(signal.SIGINT)


def test_shutdown_waits_for_requests_in_flight(ps):
    srv = memdisk(ps, "--latency-ms", "500")
    h = connect(srv.uri)
    h.pwrite(b"w" * 4096, 0)
    bufs = [nbd.Buffer(4096) for _ in range(20)]
    cookies = [h.aio_pread(b, 0) for b in bufs]
    wait_until_consumed(h)          # the server has read them all
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline
        h.poll(1000)
    for c, b in zip(cookies, bufs):
        assert h.aio_command_completed(c)
        assert b.to_bytearray() == b"w" * 4096
    srv.stop()
