"""The synchronous plugin API (struct nbdkit_plugin, nbdkit_server_new_sync)
and its thread models, driven through tests/c/sync_harness.c.

The harness is an in-memory disk whose pread/pwrite sleep --sleep-ms while
counted as running; at exit it prints the most I/O callbacks that ran at
once in the whole server (max_global) and on one handle (max_per_handle),
and the most connections open at once (max_open). Each thread model must
show exactly the concurrency nbdkit promises for it:

  parallel                 overlaps within a connection and across them
  serialize-requests       never two on one handle, but across handles yes
  serialize-all-requests   never two anywhere
  serialize-connections    never two anywhere, and never two clients open:
                           a later client waits ungreeted for its turn

plus the error paths (nbdkit_set_error, errno only, neither -> EIO) and the
size of the worker pool. The harness is built with AddressSanitizer (leak
checking on) and every run must end with exit status 0, "main_loop
returned 0" and no sanitizer or harness report on stderr.

Run with: /usr/bin/python3 -m pytest -q tests/test_sync_api.py
"""

import errno
import os
import signal
import socket
import threading

import nbd
import pytest

import support
from support import (C_DIR, HarnessProcess, compile_c_harness, noise, pattern,
                     proc_status)
from support import close_politely as close
from nbdwire import CMD_READ, Client

KiB = 1 << 10
MiB = 1 << 20
DISK = 16 * MiB                  # the harness default
ERRNO_ONLY_OFFSET = 1 * MiB      # see sync_harness.c, --fail-errno
ERRNO_ZERO_OFFSET = 2 * MiB
SLEEP_MS = 20

SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "HARNESS-ERROR", "panicked")
START_TIMEOUT = 10
STOP_TIMEOUT = 10
IO_TIMEOUT = 20

# ---------------------------------------------------------------- building

@pytest.fixture(scope="session")
def harness_bin(tmp_path_factory):
    """The harness, built once per session with AddressSanitizer."""
    return compile_c_harness(C_DIR / "sync_harness.c",
                             tmp_path_factory.mktemp("sync_harness") / "sync_harness-asan")


# ---------------------------------------------------------------- the server

class Harness(HarnessProcess):
    """One sync_harness process serving a Unix socket in a private tmp dir."""

    name = "harness"

    def __init__(self, binary, model, args=()):
        # NBDKIT_ASYNC_LOG=debug unless set: per connection, not per request
        super().__init__(binary, args, before=("--model", model), prefix="nbdka-sync-",
                         env={"NBDKIT_ASYNC_LOG": os.environ.get("NBDKIT_ASYNC_LOG", "debug")})
        self.final_stats = None

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def wait_ready(self):
        self.wait_for(lambda: self.out().endswith("\n") and os.path.exists(self.sock),
                      START_TIMEOUT, "the harness to listen")
        assert self.out().splitlines()[0] == self.uri, self.report()

    def threads(self):
        return proc_status(self.proc.pid, "Threads")

    def stop(self):
        """SIGTERM; must exit 0 within STOP_TIMEOUT with a clean report.
        Returns the printed statistics as a dict."""
        self.send(signal.SIGTERM)
        self.wait_exit(STOP_TIMEOUT)
        self.assert_exit_ok(SANITIZER_MARKS)
        stats = {}
        for line in self.out().splitlines()[1:]:
            if line.startswith("STATS "):      # counters printed on SIGUSR1
                continue
            key, _, value = line.rpartition(" ")
            stats[key] = int(value)
        assert stats.get("main_loop returned") == 0, self.report()
        for key in ("max_global", "max_per_handle", "max_open", "opens", "closes", "calls"):
            assert key in stats, "no %r line\n%s" % (key, self.report())
        assert stats["opens"] == stats["closes"], self.report()
        self.final_stats = stats
        return stats


@pytest.fixture
def start(harness_bin):
    """start(model, *args) -> a listening Harness; always killed at teardown
    (tests call .stop() themselves to check the clean exit)."""
    servers = []

    def _start(model, *args):
        h = Harness(harness_bin, model, args)
        servers.append(h)
        h.wait_ready()
        return h

    try:
        yield _start
    finally:
        for s in servers:
            s.cleanup()


# ---------------------------------------------------------------- clients

def connect(srv):
    h = nbd.NBD()
    h.connect_unix(srv.sock)
    return h


def wait_aio(h, cookies, timeout=IO_TIMEOUT):
    """Polls h until every cookie completed; returns {cookie: errnum or None}."""
    done = support.wait_aio(h, cookies, timeout, poll_ms=50)
    return {c: err for c, (_, err) in done.items()}


def burst(h, tag, n):
    """n commands in flight at once on h: 4 KiB writes of noise to this
    tag's region alternating with 4 KiB reads of untouched disk; then checks
    every reply and the written data."""
    base = MiB * (4 + 2 * tag)
    bufs, cookies = [], []
    for i in range(n):
        if i % 2 == 0:
            wb = nbd.Buffer.from_bytearray(bytearray(noise(tag * 1000 + i, 4 * KiB)))
            bufs.append(wb)
            cookies.append(h.aio_pwrite(wb, base + i * 4 * KiB))
        else:
            rb = nbd.Buffer(4 * KiB)
            bufs.append(rb)
            cookies.append(h.aio_pread(rb, base + MiB + i * 4 * KiB))
    results = wait_aio(h, cookies)
    assert all(e is None for e in results.values()), results
    for i in range(1, n, 2):
        off = base + MiB + i * 4 * KiB
        assert bufs[i].to_bytearray() == pattern(off, 4 * KiB), (tag, i)
    for i in range(0, n, 2):
        assert h.pread(4 * KiB, base + i * 4 * KiB) == noise(tag * 1000 + i, 4 * KiB), (tag, i)


def run_concurrently(handles, n):
    """burst() on every handle at once, one thread each; re-raises the
    first failure. Bounded by IO_TIMEOUT inside each thread."""
    errors = []
    gate = threading.Barrier(len(handles))

    def one(tag, h):
        try:
            gate.wait(timeout=IO_TIMEOUT)
            burst(h, tag, n)
        except BaseException as e:  # noqa: B902 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, h), daemon=True) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=IO_TIMEOUT + 10)
        assert not t.is_alive(), "client thread still running"
    if errors:
        raise errors[0]


def serve_clients(srv, n_conns, n_requests):
    """n_conns clients at once, each with n_requests in flight; returns
    the server's statistics after a clean stop."""
    handles = [connect(srv) for _ in range(n_conns)]
    try:
        for h in handles:
            assert h.can_multi_conn()
        run_concurrently(handles, n_requests)
    finally:
        for h in handles:
            close(h)
    return srv.stop()


# ---------------------------------------------------------------- thread models

def test_parallel_overlaps(start):
    """PARALLEL: callbacks overlap on one connection and across connections."""
    srv = start("parallel", "--sleep-ms", SLEEP_MS)
    st = serve_clients(srv, 2, 16)
    assert st["max_per_handle"] > 1, srv.report()
    assert st["max_global"] > 1, srv.report()
    assert st["max_global"] <= 16, "more callbacks at once than worker threads\n" + srv.report()
    assert st["max_open"] == 2 and st["opens"] == 2, srv.report()


def test_serialize_requests(start):
    """SERIALIZE_REQUESTS: one callback at a time per connection, but
    different connections run side by side."""
    srv = start("serialize-requests", "--sleep-ms", SLEEP_MS)
    st = serve_clients(srv, 3, 12)
    assert st["max_per_handle"] == 1, srv.report()
    assert st["max_global"] > 1, srv.report()
    assert st["max_open"] == 3, srv.report()


def test_serialize_requests_is_per_connection_not_per_handle(start):
    """SERIALIZE_REQUESTS serializes per connection (nbdkit's meaning, and
    the header's "connections overlap"), even when the plugin's open returns
    the same handle pointer for every connection, as a plugin with no
    per-connection state does (or one with open == NULL, whose handle is
    user_data)."""
    srv = start("serialize-requests", "--shared-handle", "--sleep-ms", SLEEP_MS)
    st = serve_clients(srv, 3, 12)
    assert st["max_open"] == 3, srv.report()
    assert st["max_global"] > 1, (
        "three connections sharing one handle pointer never overlapped: "
        "SERIALIZE_REQUESTS behaved like SERIALIZE_ALL_REQUESTS\n" + srv.report())


def test_serialize_all_requests(start):
    """SERIALIZE_ALL_REQUESTS: one callback at a time in the whole server,
    while several clients stay connected at once."""
    srv = start("serialize-all-requests", "--sleep-ms", SLEEP_MS)
    st = serve_clients(srv, 3, 12)
    assert st["max_global"] == 1, srv.report()
    assert st["max_per_handle"] == 1, srv.report()
    assert st["max_open"] == 3, srv.report()
    assert st["calls"] >= 3 * 12, srv.report()


class Connector:
    """Connects a client in a thread; .done is set once the handshake
    completed (or failed: see .error)."""

    def __init__(self, srv):
        self.h = nbd.NBD()
        self.error = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(srv.sock,), daemon=True)
        self.thread.start()

    def _run(self, sock):
        try:
            self.h.connect_unix(sock)
        except BaseException as e:  # noqa: B902 - reported by the test
            self.error = e
        finally:
            self.done.set()

    def wait(self, timeout):
        assert self.done.wait(timeout), "client still not connected after %ss" % timeout
        self.thread.join(timeout=5)
        return self.h


def test_serialize_connections(start):
    """SERIALIZE_CONNECTIONS: a second client is not greeted while the first
    is connected (even while the first is busy), then gets its turn."""
    srv = start("serialize-connections", "--sleep-ms", SLEEP_MS)
    a = connect(srv)
    b = None
    try:
        # A is busy with requests while B knocks.
        bufs = [nbd.Buffer(4 * KiB) for _ in range(12)]
        cookies = [a.aio_pread(buf, i * 4 * KiB) for i, buf in enumerate(bufs)]
        waiter = Connector(srv)
        srv.wait_stats(lambda st: st["connections_total"] == 2, IO_TIMEOUT,
                       "the server to accept (and queue) the second client")
        assert not waiter.done.is_set(), (
            "second client completed its handshake while the first is connected "
            "(error: %r)\n%s" % (waiter.error, srv.report()))
        results = wait_aio(a, cookies)
        assert all(e is None for e in results.values()), results
        assert all(buf.to_bytearray() == pattern(i * 4 * KiB, 4 * KiB) for i, buf in enumerate(bufs))
        burst(a, 0, 12)              # A is fully served meanwhile
        assert not waiter.done.is_set(), "second client greeted while the first is connected\n" + srv.report()

        close(a)
        b = waiter.wait(10)
        assert waiter.error is None, "second client failed to connect: %r\n%s" % (waiter.error, srv.report())
        assert b.pread(4 * KiB, 4 * MiB) == noise(0, 4 * KiB), "B must see A's writes"
        burst(b, 1, 12)
    finally:
        close(a)
        if b is not None:
            close(b)
    st = srv.stop()
    assert st["max_global"] == 1, srv.report()
    assert st["max_open"] == 1, srv.report()
    assert st["opens"] == 2, srv.report()


def test_serialize_connections_waiter_gives_up(start):
    """SERIALIZE_CONNECTIONS: a queued client that hangs up before its turn
    does not take the turn of the one queued behind it, nor let anybody in
    early."""
    srv = start("serialize-connections")
    a = connect(srv)
    b = None
    try:
        quitter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        quitter.settimeout(5)
        quitter.connect(srv.sock)
        srv.wait_stats(lambda st: st["connections_total"] == 2, IO_TIMEOUT,
                       "the quitter to be accepted (and queued) before B")
        waiter = Client(path=srv.sock)
        srv.wait_stats(lambda st: st["connections_total"] == 3, IO_TIMEOUT,
                       "B to be accepted (and queued)")
        quitter.close()
        # (A queued client is not watched: the server finds the quitter
        # gone only when its turn comes.) A round trip on A: a greeting
        # for B sent early would be waiting by now.
        assert a.pread(512, 0) == pattern(0, 512)
        assert not waiter.greeted(), "client greeted while the first is connected\n" + srv.report()
        close(a)
        waiter.connect()
        assert waiter.call(CMD_READ, 512, 512) == (0, pattern(512, 512))
        b = waiter
    finally:
        close(a)
        if b is not None:
            b.close()
    st = srv.stop()
    assert st["max_open"] == 1, srv.report()


def test_serialize_connections_shutdown_with_queued_client(start):
    """SIGTERM while a client is connected and another waits ungreeted:
    clean exit, and the waiting client is refused rather than hung."""
    srv = start("serialize-connections")
    a = connect(srv)
    try:
        assert a.pread(512, 0) == pattern(0, 512)
        waiter = Connector(srv)
        srv.wait_stats(lambda st: st["connections_total"] == 2, IO_TIMEOUT,
                       "the server to accept (and queue) the second client")
        assert not waiter.done.is_set(), srv.report()
        st = srv.stop()
        waiter.wait(10)
        assert waiter.error is not None, "the queued client was greeted during shutdown\n" + srv.report()
    finally:
        close(a)
    assert st["max_open"] == 1, srv.report()


def test_parallel_with_one_thread(start):
    """PARALLEL with --threads 1: one worker runs one callback at a time."""
    srv = start("parallel", "--threads", 1, "--sleep-ms", SLEEP_MS)
    st = serve_clients(srv, 2, 8)
    assert st["max_global"] == 1, srv.report()
    assert st["max_open"] == 2, srv.report()


# ---------------------------------------------------------------- workers

@pytest.mark.parametrize("threads", [None, 4])
def test_worker_thread_count(start, threads):
    """The pool has the configured size (default 16, like nbdkit), and it
    does not grow with clients or requests."""
    args = ["--sleep-ms", 5] + (["--threads", threads] if threads else [])
    srv = start("parallel", *args)
    workers = threads or 16
    handles = [connect(srv) for _ in range(3)]
    try:
        run_concurrently(handles, 40)
        n = srv.threads()
        assert workers + 1 <= n <= workers + 3, (
            "Threads: %d with %d workers (expected 1 + %d, plus at most 2 helpers)\n%s"
            % (n, workers, workers, srv.report()))
    finally:
        for h in handles:
            close(h)
    st = srv.stop()
    assert 1 < st["max_global"] <= workers, srv.report()


# ---------------------------------------------------------------- errors

def expect_errno(want, fn, *args):
    with pytest.raises(nbd.Error) as ei:
        fn(*args)
    assert ei.value.errnum == want, "%s%r: expected %s, got %s (%s)" % (
        fn.__name__, args[1:], errno.errorcode[want], errno.errorcode.get(ei.value.errnum, ei.value.errnum), ei.value)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EPERM], ids=["ENOSPC", "EPERM"])
def test_errors(start, err):
    """nbdkit_set_error reaches the client (and wins over errno); errno alone
    works; neither gives EIO; an error set by a call that then succeeded
    leaks into nothing. One worker, so every call runs on the same thread."""
    srv = start("parallel", "--threads", 1, "--fail-errno", err)
    h = connect(srv)
    try:
        expect_errno(err, h.pwrite, b"x" * 4096, 0)
        expect_errno(errno.ENOMEM, h.pread, 4096, ERRNO_ONLY_OFFSET)
        expect_errno(errno.EIO, h.pread, 4096, ERRNO_ZERO_OFFSET)
        h.flush()                                   # set_error, then success
        expect_errno(errno.EIO, h.pread, 4096, ERRNO_ZERO_OFFSET)
        expect_errno(err, h.pwrite, b"y" * 512, 8 * MiB)
        expect_errno(errno.ENOMEM, h.pread, 512, ERRNO_ONLY_OFFSET + 1024)
        # The connection is fine, and reads elsewhere work.
        assert h.pread(4096, 0) == pattern(0, 4096)
        h.zero(4096, 3 * MiB)
        assert h.pread(4096, 3 * MiB) == bytes(4096)
        h.trim(4096, 4 * MiB)
        h.cache(4096, 0)
        # Errors in flight together with successes.
        rbufs = [nbd.Buffer(4096) for _ in range(6)]
        cookies = [h.aio_pread(rbufs[0], ERRNO_ZERO_OFFSET), h.aio_pread(rbufs[1], 5 * MiB),
                   h.aio_pread(rbufs[2], ERRNO_ONLY_OFFSET), h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(4096)), 0),
                   h.aio_pread(rbufs[3], 6 * MiB)]
        res = wait_aio(h, cookies)
        assert [res[c] for c in cookies] == [errno.EIO, None, errno.ENOMEM, err, None], res
        assert rbufs[1].to_bytearray() == pattern(5 * MiB, 4096)
        assert rbufs[3].to_bytearray() == pattern(6 * MiB, 4096)
    finally:
        close(h)
    srv.stop()


# ---------------------------------------------------------------- lifetimes

@pytest.mark.parametrize("model", ["parallel", "serialize-all-requests"])
def test_client_vanishes_with_ops_in_flight(start, model):
    """A client that hangs up (no NBD_CMD_DISC) with callbacks running and
    queued: its handle is closed only after the last callback returned (the
    harness reports a close with callbacks running, ASan a use after free),
    and the server keeps serving others."""
    srv = start(model, "--threads", 4, "--sleep-ms", 100)
    h = connect(srv)
    other = None
    try:
        bufs = [nbd.Buffer(4 * KiB) for _ in range(12)]
        for i, buf in enumerate(bufs):
            h.aio_pread(buf, i * 4 * KiB)
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(noise(9, 4 * KiB))), 12 * MiB)
        # All 13 taken in by the server: 4 running (or 1 in
        # serialize-all-requests), the rest queued.
        st = srv.wait_stats(lambda st: st["requests"][0] == 12 and st["requests"][1] == 1,
                            IO_TIMEOUT, "the 13 requests to reach the server")
        assert st["in_flight"] > 0, st
        h.__del__()                          # nbd_close: just hang up
        del h._o
        other = connect(srv)
        assert other.pread(4 * KiB, 8 * MiB) == pattern(8 * MiB, 4 * KiB)
        srv.wait_stats(lambda st: st["connections"] == 1 and st["in_flight"] == 0, IO_TIMEOUT,
                       "the vanished client's connection to finish")
    finally:
        close(h)
        if other is not None:
            close(other)
    st = srv.stop()
    assert st["opens"] == 2, srv.report()


def test_sigterm_with_ops_in_flight(start):
    """SIGTERM while a client has callbacks running and queued: every op
    read before the shutdown is still answered (successfully), then the
    server exits 0."""
    srv = start("parallel", "--threads", 2, "--sleep-ms", 150)
    h = connect(srv)
    try:
        bufs = [nbd.Buffer(4 * KiB) for _ in range(8)]
        cookies = [h.aio_pread(buf, MiB + i * 4 * KiB) for i, buf in enumerate(bufs)]
        # All read by the server (2 running, the rest queued) before SIGTERM.
        st = srv.wait_stats(lambda st: st["requests"][0] == 8, IO_TIMEOUT,
                            "the 8 reads to reach the server")
        assert st["in_flight"] > 0, st
        st = srv.stop()
        assert st["calls"] == 8, srv.report()
        results = wait_aio(h, cookies, timeout=5)
        assert all(results[c] is None for c in cookies), results
        for i, buf in enumerate(bufs):
            assert buf.to_bytearray() == pattern(MiB + i * 4 * KiB, 4 * KiB), i
    finally:
        close(h)
