"""The C API driven directly: tests/c/api_harness.c is a plugin + server
whose way of answering ops is chosen with --mode. Each mode is served by an
AddressSanitizer build (leak checking on) and by a plain build, driven with
real NBD clients (python3-libnbd), and must end with exit status 0 and no
sanitizer report. One short valgrind run covers the plain build.

Harness conventions (see the comment at the top of api_harness.c): the disk
is 64 MiB holding byte (offset % 251) at every offset; stdout says "ready"
once listening and "op KIND OFFSET COUNT" for every I/O callback; harness
self-check failures go to stderr as "HARNESS-ERROR".
"""

import errno
import os
import re
import shutil
import signal
import time

import pytest

import nbd

from support import (ASAN_FLAGS, C_DIR, HarnessProcess, compile_c_harnesses,
                     noise, pattern, wait_aio)
from support import close_abruptly as close

BUILDS = {
    "asan": ASAN_FLAGS,
    "plain": ["-O2"],
}

KiB = 1 << 10
MiB = 1 << 20
DISK = 64 * MiB
BAD = DISK - MiB  # thread/inline modes: reads fail ENOMEM, writes EIO from here on

SANITIZER_MARKS = ("ERROR: AddressSanitizer", "LeakSanitizer", "HARNESS-ERROR", "panicked")

# ---------------------------------------------------------------- building

@pytest.fixture(scope="session")
def harness_bins(tmp_path_factory):
    """Compiles the harness once per session, with ASan and plain, in parallel."""
    out = tmp_path_factory.mktemp("api_harness")
    return compile_c_harnesses({
        name: (C_DIR / "api_harness.c", out / ("api_harness-" + name), flags)
        for name, flags in BUILDS.items()})


# ---------------------------------------------------------------- running

class Harness(HarnessProcess):
    """One api_harness process serving a Unix socket in a private tmp dir
    (SIGUSR1 releases held ops, SIGUSR2 prints the server's counters)."""

    stats_signal = signal.SIGUSR2

    def __init__(self, binary, mode, args=(), env=None, wrapper=()):
        self.mode = mode
        super().__init__(binary, args, before=("--mode", mode), prefix="nbdka-c-",
                         env=env, wrapper=wrapper)

    def op_lines(self):
        return [l for l in self.out().splitlines() if l.startswith("op ")]

    def wait_ops(self, n, timeout=5):
        self.wait_for(lambda: len(self.op_lines()) >= n, timeout, "%d ops to reach the plugin" % n)

    def connect(self, structured=True):
        h = nbd.NBD()
        if not structured:
            h.set_request_structured_replies(False)
        h.connect_unix(self.sock)
        assert h.get_structured_replies_negotiated() == structured
        return h

    def stop(self, sig=signal.SIGTERM, timeout=15):
        self.send(sig)
        return self.wait_exit(timeout)

    def assert_clean_exit(self):
        """Exit status 0, the loop returned 0, no sanitizer or harness report."""
        self.assert_exit_ok(SANITIZER_MARKS)
        out = self.out()
        assert "main_loop returned 0" in out, self.report()
        assert self.count("open ") == self.count("close "), "a plugin handle was never closed\n" + self.report()


@pytest.fixture
def start(request):
    """start(build, mode, *args, env=..., wrapper=..., ready_timeout=...) -> ready Harness."""
    bins = request.getfixturevalue("harness_bins")
    servers = []

    def _start(build, mode, *args, env=None, wrapper=(), ready_timeout=10):
        s = Harness(bins[build], mode, args, env=env, wrapper=wrapper)
        servers.append(s)
        s.wait_ready(ready_timeout)
        return s

    try:
        yield _start
    finally:
        for s in servers:
            s.cleanup()


@pytest.fixture(params=sorted(BUILDS))
def build(request):
    return request.param


# ---------------------------------------------------------------- client helpers

def expect_errno(err, fn, *args, **kwargs):
    with pytest.raises(nbd.Error) as ei:
        fn(*args, **kwargs)
    assert ei.value.errnum == err, "%s: expected %s, got errnum %s (%s)" % (
        fn.__name__, errno.errorcode[err], ei.value.errnum, ei.value)


def exercise_disk(h, tag):
    """Every command with data checks, sync and async, on one connection."""
    assert h.get_size() == DISK
    assert not h.is_read_only()
    for what in ("can_flush", "can_trim", "can_zero", "can_cache", "can_fua", "can_multi_conn"):
        assert getattr(h, what)(), what

    # Reads; the harness alternates between filling the library's buffer
    # and nbdkit_reply_read, so consecutive reads cover both paths.
    for off, n in ((0, 512), (5000, 1000), (MiB + 17, 64 * KiB), (3 * MiB, 1), (7 * MiB - 5, 300 * KiB)):
        assert h.pread(n, off) == pattern(off, n), (off, n)
    assert h.pread(32 * MiB, 16 * MiB) == pattern(16 * MiB, 32 * MiB)

    base = 8 * MiB + tag * 2 * MiB
    data = noise(tag, 64 * KiB + 3)
    h.pwrite(data, base + 1)
    assert h.pread(len(data) + 2, base) == pattern(base, 1) + data + pattern(base + 1 + len(data), 1)
    fua = noise(tag + 100, 4 * KiB)
    h.pwrite(fua, base + 256 * KiB, nbd.CMD_FLAG_FUA)
    assert h.pread(len(fua), base + 256 * KiB) == fua
    h.flush()
    h.zero(8 * KiB, base + 4 * KiB)
    h.zero(4 * KiB, base + 512 * KiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(8 * KiB, base + 4 * KiB) == bytes(8 * KiB)
    assert h.pread(4 * KiB, base + 512 * KiB) == bytes(4 * KiB)
    h.trim(64 * KiB, base + MiB)
    h.cache(MiB, base)

    # Many commands in flight at once: writes to distinct blocks and reads.
    bufs, cookies = [], []
    wbase = base + MiB + 128 * KiB
    for i in range(48):
        wb = nbd.Buffer.from_bytearray(noise(tag * 1000 + i, 4 * KiB))
        rb = nbd.Buffer(8 * KiB)
        bufs += [wb, rb]
        cookies.append(h.aio_pwrite(wb, wbase + i * 4 * KiB))
        cookies.append(h.aio_pread(rb, 40 * MiB + i * 9 * KiB))
    cookies.append(h.aio_flush())
    results = wait_aio(h, cookies, 20)
    assert all(err is None for _, err in results.values()), results
    for i in range(48):
        assert bufs[2 * i + 1].to_bytearray() == pattern(40 * MiB + i * 9 * KiB, 8 * KiB), i
    assert h.pread(48 * 4 * KiB, wbase) == b"".join(noise(tag * 1000 + i, 4 * KiB) for i in range(48))

    # Errors answered through nbdkit_reply_error (the harness's bad MiB).
    expect_errno(errno.ENOMEM, h.pread, 4 * KiB, BAD)
    expect_errno(errno.EIO, h.pwrite, b"x" * 512, DISK - 512)
    expect_errno(errno.EIO, h.zero, 4 * KiB, BAD + 8 * KiB)
    # ... and the connection is still fine.
    assert h.pread(4 * KiB, BAD - 4 * KiB) == pattern(BAD - 4 * KiB, 4 * KiB)

    # Requests the library itself must refuse (libnbd's own checks off).
    h.set_strict_mode(0)
    expect_errno(errno.EINVAL, h.pread, 4 * KiB, DISK - 2 * KiB)
    expect_errno(errno.ENOSPC, h.pwrite, b"y" * 4 * KiB, DISK - 2 * KiB)
    assert h.pread(512, 0) == pattern(0, 512)


# ---------------------------------------------------------------- the modes

def test_thread_mode(start, build):
    """Every op answered from a worker thread, never inside the callback."""
    srv = start(build, "thread")
    h1 = srv.connect()
    h2 = srv.connect(structured=False)  # two clients at once
    exercise_disk(h1, 1)
    exercise_disk(h2, 2)
    h1.shutdown()
    h2.shutdown()
    close(h1)
    close(h2)
    srv.stop()
    srv.assert_clean_exit()
    assert srv.count("open ") >= 2


def test_inline_mode(start, build):
    """Every op answered inside its callback; SIGINT stops the server."""
    srv = start(build, "inline")
    h1 = srv.connect()
    h2 = srv.connect(structured=False)
    exercise_disk(h1, 1)
    exercise_disk(h2, 2)
    h1.shutdown()
    close(h1)
    close(h2)  # abrupt
    srv.stop(signal.SIGINT)
    srv.assert_clean_exit()


def test_back_pressure_small_inflight_limit(start, build):
    """With --max-inflight 4, 300 commands in flight on one connection all
    complete (the server pauses reading, it never drops requests)."""
    srv = start(build, "thread", "--max-inflight", "4")
    h = srv.connect()
    bufs, cookies = [], []
    for i in range(300):
        b = nbd.Buffer(4 * KiB)
        bufs.append(b)
        cookies.append(h.aio_pread(b, i * 13 * KiB))
    results = wait_aio(h, cookies, 20)
    assert all(err is None for _, err in results.values())
    for i, b in enumerate(bufs):
        assert b.to_bytearray() == pattern(i * 13 * KiB, 4 * KiB), i
    h.shutdown()
    close(h)
    srv.stop()
    srv.assert_clean_exit()


def test_reply_after_disconnect(start, build):
    """Ops answered ~1 s after their client went away (abruptly, and after
    NBD_CMD_DISC): no crash, write buffers stay valid until the reply, and
    the server keeps serving new clients meanwhile and afterwards."""
    srv = start(build, "after-disconnect", "--hold-ms", "1000")
    data_a, data_b, data_c = noise(1, 64 * KiB), noise(2, 32 * KiB), noise(3, 16 * KiB)

    # Client A: three ops held by the plugin, then an abrupt close.
    a = srv.connect()
    a_bufs = [nbd.Buffer.from_bytearray(data_a), nbd.Buffer(64 * KiB)]
    a.aio_pwrite(a_bufs[0], 1 * MiB)
    a.aio_pread(a_bufs[1], 0)
    a.aio_flush()
    srv.wait_ops(3)
    t_gone = time.monotonic()
    close(a)

    # Client B: two ops held, then NBD_CMD_DISC and gone without waiting.
    b = srv.connect(structured=False)
    b_bufs = [nbd.Buffer.from_bytearray(data_b), nbd.Buffer(4 * KiB)]
    b.aio_pwrite(b_bufs[0], 2 * MiB)
    b.aio_pread(b_bufs[1], 3 * MiB)
    srv.wait_ops(5)
    b.aio_disconnect(0)
    for _ in range(5):
        b.poll(10)
    close(b)

    # Client C, while A's and B's ops are still held: served normally.
    c = srv.connect()
    t0 = time.monotonic()
    cw = nbd.Buffer.from_bytearray(data_c)
    cr = nbd.Buffer(64 * KiB)
    results = wait_aio(c, [c.aio_pwrite(cw, 4 * MiB), c.aio_pread(cr, 5 * MiB)], 10)
    assert all(err is None for _, err in results.values()), results
    assert time.monotonic() - t0 >= 0.8, "ops were not held"
    assert cr.to_bytearray() == pattern(5 * MiB, 64 * KiB)
    c.shutdown()
    close(c)

    # Every held op gets answered (~1 s after A left) and every
    # connection closed.
    srv.wait_stats(lambda st: st["in_flight"] == 0 and st["connections"] == 0, 10,
                   "every held op answered and every connection closed")
    assert time.monotonic() - t_gone >= 0.9, "A's ops were not held"
    srv.wait_for(lambda: srv.count("close ") == srv.count("open ") >= 3, 10,
                 "every plugin handle to be closed")
    assert srv.proc.poll() is None

    # Client D: the abandoned writes reached the disk through buffers the
    # library kept alive until the (late) reply.
    d = srv.connect()
    bufs = [nbd.Buffer(len(data_a)), nbd.Buffer(len(data_b)), nbd.Buffer(len(data_c))]
    results = wait_aio(d, [d.aio_pread(bufs[0], 1 * MiB), d.aio_pread(bufs[1], 2 * MiB),
                           d.aio_pread(bufs[2], 4 * MiB)], 10)
    assert all(err is None for _, err in results.values()), results
    assert bufs[0].to_bytearray() == data_a
    assert bufs[1].to_bytearray() == data_b
    assert bufs[2].to_bytearray() == data_c
    d.shutdown()
    close(d)

    srv.stop()
    srv.assert_clean_exit()


def test_lent_reads_come_back(start, build):
    """Every third read is answered with nbdkit_reply_read_nocopy: the data
    reaches simple and structured clients intact from the plugin's own
    memory, and each lent buffer is released exactly once, both after it
    was sent and when its client vanished before the reply."""
    srv = start(build, "after-disconnect", "--hold-ms", "200")
    offsets = [i * MiB + i for i in range(6)]
    for structured in (True, False):
        h = srv.connect(structured=structured)
        bufs = [nbd.Buffer(64 * KiB) for _ in offsets]
        results = wait_aio(h, [h.aio_pread(b, o) for b, o in zip(bufs, offsets)], 10)
        assert all(err is None for _, err in results.values()), results
        for b, o in zip(bufs, offsets):
            assert b.to_bytearray() == pattern(o, 64 * KiB), o
        h.shutdown()
        close(h)

    gone = srv.connect()
    held = [nbd.Buffer(64 * KiB) for _ in offsets]
    for b, o in zip(held, offsets):
        gone.aio_pread(b, o)
    srv.wait_ops(3 * len(offsets))
    close(gone)
    srv.wait_stats(lambda st: st["in_flight"] == 0, 10,
                   "the held reads to be answered into the void")

    srv.stop()
    srv.assert_clean_exit()
    loans = re.search(r"loans: (\d+) made, (\d+) released", srv.out())
    assert loans, srv.report()
    assert int(loans[1]) == 6 and loans[1] == loans[2], srv.report()


def _held_ops(h, n_writes, n_reads):
    bufs, cookies, checks = [], [], []
    for i in range(n_writes):
        b = nbd.Buffer.from_bytearray(noise(40 + i, 64 * KiB))
        bufs.append(b)
        cookies.append(h.aio_pwrite(b, 8 * MiB + i * MiB))
    for i in range(n_reads):
        b = nbd.Buffer(64 * KiB)
        bufs.append(b)
        cookies.append(h.aio_pread(b, 20 * MiB + i * MiB + i))
        checks.append((b, pattern(20 * MiB + i * MiB + i, 64 * KiB)))
    return bufs, cookies, checks


def test_shutdown_on_nth_op(start, build):
    """On the 8th op the harness calls nbdkit_server_shutdown from another
    thread, then answers the held ops from a worker 300 ms later: every
    client gets its replies, idle clients are let go, the socket file is
    removed and nbdkit_main_loop returns 0."""
    srv = start(build, "shutdown", "--shutdown-after", "8")
    idle = srv.connect()
    h = srv.connect()
    t0 = time.monotonic()
    bufs, cookies, checks = _held_ops(h, 4, 4)
    results = wait_aio(h, cookies, 15)
    elapsed = time.monotonic() - t0
    assert all(err is None for _, err in results.values()), results
    for b, want in checks:
        assert b.to_bytearray() == want
    assert elapsed >= 0.25, "the replies were not held until after the shutdown (%.2fs)" % elapsed
    assert "shutdown requested" in srv.out()

    rc = srv.wait_exit(15)  # no signal: the shutdown alone ends the loop
    assert rc == 0, srv.report()
    srv.assert_clean_exit()
    assert not os.path.exists(srv.sock), "socket file left behind"
    with pytest.raises(nbd.Error):
        idle.pread(512, 0)
    close(idle)
    close(h)


def test_shutdown_on_sigusr1(start, build):
    """Shutdown triggered by SIGUSR1 (handled by another thread) with three
    ops held: all three are answered, then the loop returns 0."""
    srv = start(build, "shutdown", "--shutdown-after", "1000000")
    h = srv.connect()
    data = noise(7, 8 * KiB)
    wb = nbd.Buffer.from_bytearray(data)
    rb = nbd.Buffer(8 * KiB)
    cookies = [h.aio_pwrite(wb, 3 * MiB), h.aio_pread(rb, 6 * MiB + 3), h.aio_flush()]
    srv.wait_ops(3)
    h.poll(50)
    assert all(not h.aio_command_completed(c) for c in cookies), "ops answered before the shutdown"
    srv.send(signal.SIGUSR1)
    results = wait_aio(h, cookies, 15)
    assert all(err is None for _, err in results.values()), results
    assert rb.to_bytearray() == pattern(6 * MiB + 3, 8 * KiB)
    rc = srv.wait_exit(15)
    assert rc == 0, srv.report()
    srv.assert_clean_exit()
    close(h)


def test_sigterm_drains_inflight_ops(start, build):
    """SIGTERM (nbdkit_shutdown from the signal handler) while ops are held:
    the loop stops taking requests but answers the ops in flight, then
    returns 0."""
    srv = start(build, "after-disconnect", "--hold-ms", "700")
    h = srv.connect()
    data = noise(11, 16 * KiB)
    wb = nbd.Buffer.from_bytearray(data)
    rb = nbd.Buffer(16 * KiB)
    cookies = [h.aio_pwrite(wb, 9 * MiB), h.aio_pread(rb, 10 * MiB + 1)]
    srv.wait_ops(2)
    srv.send(signal.SIGTERM)
    results = wait_aio(h, cookies, 10)
    assert all(err is None for _, err in results.values()), results
    assert rb.to_bytearray() == pattern(10 * MiB + 1, 16 * KiB)
    assert srv.wait_exit(10) == 0, srv.report()
    srv.assert_clean_exit()
    close(h)


def test_shutdown_after_client_vanished(start, build):
    """Ops held, their client gone abruptly, then the shutdown: the late
    replies go nowhere, and the loop returns 0 promptly."""
    srv = start(build, "shutdown", "--shutdown-after", "1000000")
    h = srv.connect()
    bufs, cookies, _ = _held_ops(h, 2, 2)
    srv.wait_ops(4)
    close(h)
    t0 = time.monotonic()
    srv.send(signal.SIGUSR1)
    assert srv.wait_exit(10) == 0, srv.report()
    took = time.monotonic() - t0
    srv.assert_clean_exit()
    assert took < 4, "the loop took %.1fs to end with no client left" % took


def test_double_reply(start, build):
    """Every op is answered twice (worker+worker, inline+worker,
    inline+inline; the second answer an error, a success or read data): the
    client sees exactly one reply per request, the second is logged."""
    env = {}
    if os.environ.get("NBDKIT_ASYNC_LOG", "warn").lower() not in ("warn", "info", "debug", "trace"):
        env["NBDKIT_ASYNC_LOG"] = "warn"
    srv = start(build, "double-reply", env=env)
    for tag, structured in ((1, True), (2, False)):
        h = srv.connect(structured=structured)
        base = 8 * MiB + tag * 4 * MiB
        for i in range(12):
            data = noise(tag * 50 + i, 4 * KiB)
            h.pwrite(data, base + i * 8 * KiB)
            assert h.pread(4 * KiB, base + i * 8 * KiB) == data
            assert h.pread(1000, 30 * MiB + i * 999) == pattern(30 * MiB + i * 999, 1000)
        h.flush()
        h.zero(4 * KiB, base)
        assert h.pread(4 * KiB, base) == bytes(4 * KiB)
        h.trim(4 * KiB, base + 8 * KiB)
        h.cache(4 * KiB, base)
        bufs, cookies = [], []
        for i in range(60):
            b = nbd.Buffer(2 * KiB)
            bufs.append(b)
            cookies.append(h.aio_pread(b, 40 * MiB + i * 5 * KiB))
        results = wait_aio(h, cookies, 15)
        assert all(err is None for _, err in results.values()), results
        for i, b in enumerate(bufs):
            assert b.to_bytearray() == pattern(40 * MiB + i * 5 * KiB, 2 * KiB), i
        # Once every op was answered a second time, prove the connection
        # is still in step: a stray reply would have broken it.
        srv.wait_for(lambda: srv.count("answered again ") >= srv.count("op "), 10,
                     "every op to be answered again")
        assert h.pread(4 * KiB, base + 16 * KiB) == noise(tag * 50 + 2, 4 * KiB)
        assert h.aio_in_flight() == 0
        h.shutdown()
        close(h)
    srv.stop()
    srv.assert_clean_exit()
    # Each names the command, its offset and its connection.
    assert re.search(r"nbdkit-async: warn: second reply to NBD_CMD_\w+ at offset \d+ "
                     r"on conn \d+ \(the op was already answered\); ignored", srv.err()), (
        "second replies were not logged\n" + srv.report())
    # The harness answered the last op again after nbdkit_main_loop returned
    # and after nbdkit_server_free (checked there: -ESHUTDOWN, -ESTALE).
    assert "late replies after nbdkit_server_free" in srv.out(), srv.report()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_fail_immediately(start, build, structured):
    """Callbacks returning -1: the client gets the errno the plugin set
    (mapped to NBD's set), EIO when errno was 0; the connection survives."""
    srv = start(build, "fail-immediately")
    h = srv.connect(structured=structured)
    expect_errno(errno.EIO, h.pread, 4 * KiB, 0)            # errno 0
    expect_errno(errno.ENOSPC, h.pwrite, b"z" * 4 * KiB, 0)
    expect_errno(errno.EPERM, h.flush)
    expect_errno(errno.EINVAL, h.trim, 4 * KiB, 0)
    expect_errno(errno.ENOMEM, h.zero, 4 * KiB, 0)
    expect_errno(errno.EPERM, h.cache, 4 * KiB, 0)          # EROFS
    expect_errno(errno.ENOSPC, h.pwrite, b"z" * 4 * KiB, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(4 * KiB, 2 * MiB) == pattern(2 * MiB, 4 * KiB)

    # Failures and successes in flight together.
    bufs, cookies, want = [], [], {}
    for i in range(20):
        b = nbd.Buffer(4 * KiB)
        bufs.append(b)
        off = (i % 2) * 2 * MiB + i * 4 * KiB
        c = h.aio_pread(b, off)
        cookies.append(c)
        want[c] = (errno.EIO if off < MiB else None, b, off)
        w = nbd.Buffer.from_bytearray(b"w" * 512)
        bufs.append(w)
        c = h.aio_pwrite(w, i * 512)
        cookies.append(c)
        want[c] = (errno.ENOSPC, None, None)
    results = wait_aio(h, cookies, 15)
    for c, (err, b, off) in want.items():
        assert results[c][1] == err, (c, results[c], err)
        if err is None:
            assert b.to_bytearray() == pattern(off, 4 * KiB)
    h.shutdown()
    close(h)
    srv.stop()
    srv.assert_clean_exit()


def test_out_of_order_replies(start, build):
    """A read answered after 2 s does not hold back a read issued after it
    on the same connection."""
    srv = start(build, "out-of-order")
    h = srv.connect()
    slow = nbd.Buffer(64 * KiB)
    fast = nbd.Buffer(64 * KiB)
    c_slow = h.aio_pread(slow, 48 * MiB)
    c_fast = h.aio_pread(fast, 0)
    results = wait_aio(h, [c_slow, c_fast], 10)
    t_slow, e_slow = results[c_slow]
    t_fast, e_fast = results[c_fast]
    assert e_slow is None and e_fast is None, results
    assert t_fast < t_slow, results
    assert t_fast < 1.0, "the fast read took %.2fs" % t_fast
    assert t_slow >= 1.8, "the slow read was not slow (%.2fs)" % t_slow
    assert slow.to_bytearray() == pattern(48 * MiB, 64 * KiB)
    assert fast.to_bytearray() == pattern(0, 64 * KiB)
    h.shutdown()
    close(h)
    srv.stop()
    srv.assert_clean_exit()


def test_valgrind_thread_mode(start):
    """The plain build in thread mode under valgrind: no memory error, no
    definite leak."""
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is not installed (tests/install-deps.sh installs it)")
    wrapper = ["valgrind", "--quiet", "--error-exitcode=99", "--leak-check=full",
               "--errors-for-leak-kinds=definite"]
    srv = start("plain", "thread", "--size", "8M", wrapper=wrapper, ready_timeout=60)
    h = srv.connect()
    assert h.get_size() == 8 * MiB
    assert h.pread(64 * KiB, 12345) == pattern(12345, 64 * KiB)
    data = noise(9, 32 * KiB)
    h.pwrite(data, MiB)
    h.pwrite(data[:4 * KiB], 2 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    h.zero(4 * KiB, MiB)
    assert h.pread(32 * KiB, MiB) == bytes(4 * KiB) + data[4 * KiB:]
    expect_errno(errno.ENOMEM, h.pread, 4 * KiB, 7 * MiB)
    bufs = [nbd.Buffer(4 * KiB) for _ in range(16)]
    results = wait_aio(h, [h.aio_pread(b, i * 40 * KiB) for i, b in enumerate(bufs)], 30)
    assert all(err is None for _, err in results.values()), results
    for i, b in enumerate(bufs):
        assert b.to_bytearray() == pattern(i * 40 * KiB, 4 * KiB)
    h.shutdown()
    close(h)
    srv.stop(timeout=60)
    srv.assert_clean_exit()
