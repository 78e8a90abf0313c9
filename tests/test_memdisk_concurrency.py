"""Concurrency: thousands of requests in flight on a few threads, replies
out of order, several clients at once, back-pressure, and shutdown with
requests in flight."""

import errno
import signal
import struct
import threading
import time

import nbd
import pytest

from conftest import LOOPS
from nbdwire import CMD_READ, REP_ACK

KiB = 1024
MiB = 1 << 20
BLOCK = 4 * KiB


def block_pattern(i):
    """4 KiB that identify block i."""
    return struct.pack("<Q", i) * (BLOCK // 8)


def drain(h, srv, deadline_s, on_poll=None):
    """Poll `h` until no command is in flight; bounded by deadline_s."""
    deadline = time.monotonic() + deadline_s
    while h.aio_in_flight() > 0:
        if on_poll:
            on_poll()
        assert time.monotonic() < deadline, (
            f"{h.aio_in_flight()} commands still in flight after "
            f"{deadline_s} s\n{srv.describe()}")
        h.poll(1000)


def pump_until(h, srv, predicate, what, timeout=10):
    """Runs h (so that it sends what it queued) until predicate(stats) holds
    for the server's counters; returns them."""
    deadline = time.monotonic() + timeout
    while True:
        h.poll(10)
        st = srv.stats()
        if predicate(st):
            return st
        assert time.monotonic() < deadline, (
            f"timed out waiting for {what}: {st}\n{srv.describe()}")


def retire_all(h, cookies):
    """Every command completed successfully (raises nbd.Error if not)."""
    for c in cookies:
        assert h.aio_command_completed(c), f"cookie {c} not completed"


def test_1000_reads_in_flight_on_few_threads(memdisk):
    """With 100 ms latency, 1000 reads on one connection finish in well
    under a second, while the server runs at most 4 threads."""
    srv = memdisk("--latency-ms", "100", "--workers", "2", size="8M")
    h = srv.connect()
    n = 1000
    # Known data first: one 4 MiB write, then check a few blocks later.
    h.pwrite(b"".join(block_pattern(i) for i in range(n)), 0)

    bufs = [nbd.Buffer(BLOCK) for _ in range(n)]
    threads_seen = []

    def sample_threads():
        if h.aio_in_flight() > 0:
            threads_seen.append((srv.threads(), h.aio_in_flight()))

    t0 = time.monotonic()
    cookies = [h.aio_pread(bufs[i], i * BLOCK) for i in range(n)]
    # All were issued before any poll: none can have completed yet.
    assert h.aio_in_flight() == n
    sample_threads()
    drain(h, srv, 10, on_poll=sample_threads)
    elapsed = time.monotonic() - t0
    retire_all(h, cookies)
    print(f"1000 reads: {elapsed:.3f} s; (threads, in flight) samples: "
          f"{threads_seen[:3]} ... {threads_seen[-3:]}")

    assert elapsed < 1.0, (
        f"1000 reads with 100 ms latency took {elapsed:.2f} s; the server "
        f"does not keep them in flight concurrently\n{srv.describe()}")
    assert threads_seen, "never sampled the thread count while in flight"
    worst = max(t for t, _ in threads_seen)
    assert worst <= 4 + LOOPS - 1, (
        f"server had {worst} threads with requests in flight "
        f"(samples {threads_seen[:10]}...)\n{srv.describe()}")
    # The reads really were in flight together when sampled.
    assert max(f for _, f in threads_seen) >= 900
    for i in (0, 1, 2, 499, 500, 777, 998, 999):
        assert bufs[i].to_bytearray() == block_pattern(i), f"block {i}"
    for i in range(n):
        assert bufs[i].to_bytearray()[:8] == struct.pack("<Q", i), \
            f"block {i} holds wrong data"
    h.shutdown()


def test_mixed_aio_writes_and_reads(memdisk):
    """Many writes in flight at once, then reads, data checked."""
    srv = memdisk("--latency-ms", "50", "--workers", "2", size="8M")
    h = srv.connect()
    n = 512
    t0 = time.monotonic()
    wbufs = [nbd.Buffer.from_bytearray(block_pattern(i + 7)) for i in range(n)]
    cookies = [h.aio_pwrite(wbufs[i], i * BLOCK) for i in range(n)]
    cookies.append(h.aio_flush())
    drain(h, srv, 10)
    retire_all(h, cookies)
    rbufs = [nbd.Buffer(BLOCK) for _ in range(n)]
    cookies = [h.aio_pread(rbufs[i], i * BLOCK) for i in range(n)]
    drain(h, srv, 10)
    retire_all(h, cookies)
    elapsed = time.monotonic() - t0
    for i in range(n):
        assert rbufs[i].to_bytearray() == block_pattern(i + 7), f"block {i}"
    # Three rounds of 50 ms, far from 1024 * 50 ms sequentially.
    assert elapsed < 2.0, f"took {elapsed:.2f} s\n{srv.describe()}"
    h.shutdown()


def test_fast_reply_overtakes_slow_request(memdisk):
    """On one connection, a request the server answers at once (an
    invalid read) is not held back behind slow reads issued before it:
    replies leave in completion order."""
    srv = memdisk("--latency-ms", "300", "--workers", "2", size="1M")
    h = srv.connect(strict=False)
    bufs = [nbd.Buffer(BLOCK) for _ in range(8)]
    t0 = time.monotonic()
    slow = [h.aio_pread(bufs[i], i * BLOCK) for i in range(8)]
    bad = h.aio_pread(nbd.Buffer(BLOCK), 4 * MiB)    # past the end
    deadline = t0 + 10
    while True:
        try:
            if h.aio_command_completed(bad):
                raise AssertionError("read past the end succeeded")
        except nbd.Error as e:
            assert e.errnum == errno.EINVAL, e
            break
        assert time.monotonic() < deadline, srv.describe()
        h.poll(1000)
    fast = time.monotonic() - t0
    assert fast < 0.25, f"the error reply took {fast:.3f} s"
    # The slow reads are still pending at that point.
    assert h.aio_in_flight() == 8, h.aio_in_flight()
    for c in slow:
        assert not h.aio_command_completed(c)
    drain(h, srv, 10)
    retire_all(h, slow)
    h.shutdown()


def test_back_pressure_beyond_inflight_limit(memdisk):
    """More requests than the per-connection in-flight limit (default
    4096): none is dropped, all complete."""
    srv = memdisk("--latency-ms", "100", "--workers", "2", size="64M")
    h = srv.connect()
    n = 6000
    bufs = [nbd.Buffer(BLOCK) for _ in range(n)]
    t0 = time.monotonic()
    cookies = [h.aio_pread(bufs[i], (i * BLOCK) % (64 * MiB))
               for i in range(n)]
    drain(h, srv, 20, on_poll=None)
    retire_all(h, cookies)
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, f"took {elapsed:.2f} s\n{srv.describe()}"
    assert srv.threads() <= 4 + LOOPS - 1   # each further loop is a thread
    h.shutdown()


def test_small_inflight_limit_applies_back_pressure(memdisk):
    """--max-inflight 8 with 100 ms per op: 64 reads issued at once all
    complete (none dropped or refused), in batches of at most 8, so no
    sooner than 8 x 100 ms."""
    srv = memdisk("--latency-ms", "100", "--max-inflight", "8", size="1M")
    h = srv.connect()
    h.pwrite(b"".join(block_pattern(i) for i in range(64)), 0)
    bufs = [nbd.Buffer(BLOCK) for _ in range(64)]
    t0 = time.monotonic()
    cookies = [h.aio_pread(bufs[i], i * BLOCK) for i in range(64)]
    drain(h, srv, 10)
    elapsed = time.monotonic() - t0
    retire_all(h, cookies)
    for i in range(64):
        assert bufs[i].to_bytearray() == block_pattern(i), f"block {i}"
    assert elapsed >= 0.75, (
        f"64 reads took only {elapsed:.3f} s: more than 8 were in flight "
        f"at once\n{srv.describe()}")
    assert elapsed < 3.0, f"took {elapsed:.2f} s\n{srv.describe()}"
    h.shutdown()


def test_two_clients_at_once(memdisk):
    srv = memdisk("--latency-ms", "20", size="8M")
    a = srv.connect()
    b = srv.connect()
    assert a.can_multi_conn() and b.can_multi_conn()
    # Interleaved requests in flight on both connections at once.
    abufs = [nbd.Buffer.from_bytearray(block_pattern(i)) for i in range(100)]
    bbufs = [nbd.Buffer.from_bytearray(block_pattern(1000 + i))
             for i in range(100)]
    ac = [a.aio_pwrite(abufs[i], i * BLOCK) for i in range(100)]
    bc = [b.aio_pwrite(bbufs[i], (100 + i) * BLOCK) for i in range(100)]
    deadline = time.monotonic() + 10
    while a.aio_in_flight() or b.aio_in_flight():
        assert time.monotonic() < deadline, srv.describe()
        if a.aio_in_flight():
            a.poll(10)
        if b.aio_in_flight():
            b.poll(10)
    retire_all(a, ac)
    retire_all(b, bc)
    a.flush()
    b.flush()
    # Each sees the other's writes (one shared disk, multi-conn).
    assert a.pread(100 * BLOCK, 100 * BLOCK) == \
        b"".join(block_pattern(1000 + i) for i in range(100))
    assert b.pread(100 * BLOCK, 0) == \
        b"".join(block_pattern(i) for i in range(100))
    a.shutdown()
    # b survives a's departure.
    assert b.pread(BLOCK, 0) == block_pattern(0)
    b.shutdown()


def test_many_clients_in_parallel_threads(memdisk):
    """16 clients, each in its own thread with its own region."""
    srv = memdisk("--latency-ms", "10", size="16M")
    errors = []

    def client(k):
        try:
            h = srv.connect()
            base = k * MiB
            for j in range(8):
                data = bytes([k * 8 + j]) * (64 * KiB)
                h.pwrite(data, base + j * 64 * KiB)
            for j in range(8):
                got = h.pread(64 * KiB, base + j * 64 * KiB)
                assert got == bytes([k * 8 + j]) * (64 * KiB), (k, j)
            h.shutdown()
        except BaseException as e:       # reported by the main thread
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), f"client thread hung\n{srv.describe()}"
    assert not errors, f"{errors}\n{srv.describe()}"


def test_client_vanishes_with_requests_in_flight(memdisk):
    """A client that disconnects abruptly with reads in flight does not
    disturb the server: its late replies are dropped, others go on."""
    srv = memdisk("--latency-ms", "200", size="4M")
    h = srv.connect()
    bufs = [nbd.Buffer(BLOCK) for _ in range(200)]
    for i in range(200):
        h.aio_pread(bufs[i], i * BLOCK)
    st = pump_until(h, srv, lambda st: st["reads"] == 200,
                    "the 200 reads to reach the server")
    assert st["in_flight"] > 0, st
    del h               # closes the socket without NBD_CMD_DISC
    srv.wait_stats(lambda st: st["in_flight"] == 0 and st["connections"] == 0,
                   "the late replies to be dropped")
    h2 = srv.connect()
    h2.pwrite(b"alive" * 100, 0)
    assert h2.pread(500, 0) == b"alive" * 100
    h2.shutdown()
    assert srv.alive(), srv.describe()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_shutdown_drains_requests_in_flight(memdisk, sig):
    """A shutdown signal with requests in flight: every request is
    answered, then the connection closes and the server exits 0."""
    srv = memdisk("--latency-ms", "300", "--workers", "2", size="4M")
    h = srv.connect()
    h.pwrite(b"".join(block_pattern(i) for i in range(200)), 0)
    bufs = [nbd.Buffer(BLOCK) for _ in range(200)]
    cookies = [h.aio_pread(bufs[i], i * BLOCK) for i in range(200)]
    # Make sure the server has read the requests before the signal.
    pump_until(h, srv, lambda st: st["reads"] == 200,
               "the 200 reads to reach the server")
    assert h.aio_in_flight() == 200
    srv.send_signal(sig)
    deadline = time.monotonic() + 10
    while h.aio_in_flight() > 0 and not h.aio_is_closed():
        assert time.monotonic() < deadline, srv.describe()
        try:
            h.poll(1000)
        except nbd.Error:
            break
    for i, c in enumerate(cookies):
        try:
            ok = h.aio_command_completed(c)
        except nbd.Error as e:
            raise AssertionError(
                f"read {i} failed during shutdown: {e}\n{srv.describe()}")
        assert ok, f"read {i} not answered before shutdown"
        assert bufs[i].to_bytearray() == block_pattern(i)
    srv.stop(sig)


def test_shutdown_with_idle_clients(memdisk, raw_nbd):
    """Connected but idle clients (one still in the handshake) do not
    keep the server from exiting cleanly."""
    srv = memdisk(size="1M")
    h = srv.connect()
    assert h.pread(16, 0) == bytes(16)
    c = raw_nbd(srv.sock)          # handshake started, never finished
    d = raw_nbd(srv.sock)
    assert d.go() == REP_ACK
    assert d.call(CMD_READ, 0, 16) == (0, bytes(16))
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5
    assert c.at_eof() and d.at_eof()
    assert not srv.sock.exists(), "socket file left behind after shutdown"
