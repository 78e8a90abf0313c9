"""Plugin faults, driven through tests/c/api_harness.c built with
AddressSanitizer (leak checking on): a plugin that never replies (request
timeout, late replies), the `cancel` callback (client gone, server
stopping), shutdown with 1,000 ops in flight (drained, or answered
ESHUTDOWN after a grace period and released by nbdkit_server_free), a
reply to an op of a freed server while a new server runs, and the memory
caps (per connection, over all connections, and given back when the
handshake timeout cuts a client).

Every harness must end with exit status 0, "main_loop returned 0", as many
plugin `close` calls as `open` calls, and nothing from ASan/LSan, no
HARNESS-ERROR and no panic on stderr.

Covered elsewhere and not repeated here: double replies and callbacks that
return -1 without errno (tests/test_c_api.py).

Harness conventions (see the comment at the top of api_harness.c): the disk
is 64 MiB holding byte (offset % 251) at every offset; stdout says "ready"
once listening and "op KIND OFFSET COUNT" for every I/O callback.
"""

import errno
import os
import select
import signal
import socket
import struct
import threading
import time

import pytest

import nbd

from nbdwire import (C_FLAGS, CMD_READ, CMD_WRITE, OPT_INFO, OPT_LIST,
                     REP_ACK, REP_ERR_SHUTDOWN, Client, Sender, go_data, option_bytes)
from support import (C_DIR, HarnessProcess, compile_c_harness, noise, pattern,
                     proc_status, wait_aio)
from support import close_abruptly as close

KiB = 1 << 10
MiB = 1 << 20
DISK = 64 * MiB
HELD = 32 * MiB     # cancel mode holds reads/writes/trims/zeroes from here on

BAD_MARKS = ("ERROR: AddressSanitizer", "LeakSanitizer", "HARNESS-ERROR",
             "panicked", "internal error")
DOUBLE_REPLY = "second reply to"
UNKNOWN_REPLY = "unknown op handle"

# ---------------------------------------------------------------- harness

@pytest.fixture(scope="module")
def harness_bin(tmp_path_factory):
    """The ASan build of the harness, compiled once for this module."""
    return compile_c_harness(C_DIR / "api_harness.c",
                             tmp_path_factory.mktemp("faults") / "api_harness-asan")


class Harness(HarnessProcess):
    """One api_harness process on a Unix socket in a private tmp dir
    (SIGUSR1 releases held ops, SIGUSR2 prints the server's counters)."""

    stats_signal = signal.SIGUSR2

    def __init__(self, binary, mode, args=(), env=None):
        super().__init__(binary, args, before=("--mode", mode), prefix="nbdka-f-",
                         env=env)

    def ops(self):
        return self.count("op ")

    def wait_ops(self, n, timeout=10):
        self.wait_for(lambda: self.ops() >= n, timeout, "%d ops to reach the plugin" % n)

    def connect(self, structured=True):
        h = nbd.NBD()
        if not structured:
            h.set_request_structured_replies(False)
        h.connect_unix(self.sock)
        return h

    def rss_kib(self):
        return proc_status(self.proc.pid, "VmRSS")

    def assert_clean_exit(self):
        err = self.assert_exit_ok(BAD_MARKS)
        assert DOUBLE_REPLY not in err and UNKNOWN_REPLY not in err, (
            "an op was answered twice\n" + self.report())
        out = self.out()
        assert "main_loop returned 0" in out, self.report()
        assert "reply-rc" not in out, "a reply call failed\n" + self.report()
        assert self.count("open ") == self.count("close "), (
            "a plugin handle was never closed\n" + self.report())


@pytest.fixture
def start(harness_bin):
    """start(mode, *args) -> a ready Harness; always killed at teardown."""
    servers = []

    def _start(mode, *args, env=None):
        s = Harness(harness_bin, mode, args, env)
        servers.append(s)
        s.wait_ready()
        return s

    try:
        yield _start
    finally:
        for s in servers:
            s.cleanup()


# ---------------------------------------------------------------- clients

def errname(e):
    return errno.errorcode.get(e, str(e)) if e is not None else "ok"


def assert_all(results, want, what):
    bad = {c: (round(t, 3), errname(e)) for c, (t, e) in results.items() if e != want}
    assert not bad, "%s: expected %s for every command, got %s" % (what, errname(want), bad)


# raw protocol (nbdwire), for the memory-cap tests: libnbd does not let a
# client pipeline beyond what the server reads

def raw(srv):
    """A raw client past NBD_OPT_GO, simple replies."""
    return Client(path=srv.sock).connect()


def stall_writers(srv, conns, senders, n=8):
    """n connections each send a WRITE header for 32 MiB and 30 MiB of its
    payload, then stall; returns once one stalled payload is all in."""
    chunk = b"\x5a" * (30 * MiB)
    for k in range(n):
        c = raw(srv)
        conns.append(c)
        s = Sender(c.s, c.request_bytes(CMD_WRITE, k * 4 * MiB, 32 * MiB) + chunk)
        s.start()
        senders.append(s)
    srv.wait_for(lambda: any(not s.is_alive() for s in senders), 10,
                 "a stalled WRITE's 30 MiB to be taken in")


def settled(srv, at_least, timeout=8, quiet=0.4):
    """Waits until at least `at_least` ops reached the plugin (the case is
    exercised), then until their count stops changing; returns it. The
    quiet window is deliberate: it is the time given to the server to take
    in more than its cap allows, which must not happen."""
    srv.wait_ops(at_least, timeout)
    deadline = time.monotonic() + timeout
    last, since = srv.ops(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        n = srv.ops()
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return n
    return srv.ops()


# ---------------------------------------------------------------- request timeout

def test_request_timeout_and_late_reply(start):
    """--request-timeout-ms 300 on a plugin that sits on every op: each
    client gets EIO after ~0.3 s (the server counts each as an error); the
    plugin's late replies (SIGUSR1 releases them) are taken back (the
    server's in-flight count drops to 0) and ignored: they never reach the
    clients, count no error, and the write buffers stay valid until then
    (ASan). The connections stay in step and are served normally
    afterwards."""
    srv = start("never-reply", "--request-timeout-ms", "300")
    h1 = srv.connect(structured=True)
    h2 = srv.connect(structured=False)
    h3 = srv.connect()

    late_data = noise(1, 64 * KiB)
    t_issue = time.monotonic()
    bufs = [nbd.Buffer(64 * KiB), nbd.Buffer.from_bytearray(late_data),
            nbd.Buffer(4 * KiB), nbd.Buffer.from_bytearray(noise(2, 4 * KiB)),
            nbd.Buffer.from_bytearray(noise(3, 4 * KiB))]
    c1 = [h1.aio_pread(bufs[0], 1 * MiB), h1.aio_pwrite(bufs[1], 2 * MiB),
          h1.aio_flush(), h1.aio_zero(4 * KiB, 3 * MiB), h1.aio_trim(4 * KiB, 3 * MiB + 8 * KiB),
          h1.aio_cache(4 * KiB, 0), h1.aio_pwrite(bufs[4], 4 * MiB, flags=nbd.CMD_FLAG_FUA)]
    c2 = [h2.aio_pread(bufs[2], 5 * MiB), h2.aio_pwrite(bufs[3], 6 * MiB)]
    b3 = nbd.Buffer.from_bytearray(noise(4, 16 * KiB))
    c3 = [h3.aio_pwrite(b3, 7 * MiB)]
    n_ops = len(c1) + len(c2) + len(c3)
    srv.wait_ops(n_ops)

    r1 = wait_aio(h1, c1, 10, t_issue)
    r2 = wait_aio(h2, c2, 10, t_issue)
    r3 = wait_aio(h3, c3, 10, t_issue)
    for r, what in ((r1, "structured client"), (r2, "simple client"), (r3, "third client")):
        assert_all(r, errno.EIO, what)
        times = [t for t, _ in r.values()]
        assert min(times) >= 0.25, "answered before the timeout: %s" % times
        assert max(times) < 3.0, "the timeout took too long: %s" % times
        # ~300 ms: the slack covers the time to issue the ops and ASan.
    # h3 goes away while its op is still held by the plugin.
    close(h3)
    st = srv.stats()
    assert st["errors"] == n_ops and st["in_flight"] == n_ops, (st, srv.report())
    assert srv.ops() == n_ops, srv.report()

    # The plugin answers now, far too late: taken back, ignored, no stray reply.
    srv.send(signal.SIGUSR1)
    st = srv.wait_stats(lambda st: st["in_flight"] == 0, 10,
                        "the plugin's %d late replies to be taken back" % n_ops)
    assert st["errors"] == n_ops, (st, srv.report())
    assert h1.aio_in_flight() == 0 and h2.aio_in_flight() == 0
    # The late write went through a buffer the library kept alive.
    assert h1.pread(len(late_data), 2 * MiB) == late_data
    assert h1.pread(4 * KiB, 1 * MiB) == pattern(1 * MiB, 4 * KiB)
    assert h2.pread(4 * KiB, 5 * MiB) == pattern(5 * MiB, 4 * KiB)
    fresh = noise(5, 8 * KiB)
    h2.pwrite(fresh, 9 * MiB)
    assert h1.pread(len(fresh), 9 * MiB) == fresh
    # Prompt replies leave their (still armed) deadlines behind: once
    # those pass, nothing happens to the connection. (The sleep is the
    # case: 0.4 s lets every 300 ms deadline of those replies pass.)
    before = srv.stats()
    time.sleep(0.4)
    h1.flush()
    assert h2.pread(len(fresh), 9 * MiB) == fresh
    st = srv.stats()
    assert st["errors"] == before["errors"] == n_ops, (before, st, srv.report())
    assert sum(st["requests"]) == sum(before["requests"]) + 2, (before, st)
    for h in (h1, h2):
        h.shutdown()
        close(h)
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(15) == 0, srv.report()
    srv.assert_clean_exit()


def _shutdown_within(h, seconds):
    """nbd_shutdown() in a thread; True if it returned within `seconds`.
    (It waits for the server to close the connection.)"""
    t = threading.Thread(target=h.shutdown, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def test_timed_out_ops_hold_neither_client_nor_shutdown(start):
    """The plugin never answers (grace mode, and no shutdown grace: the
    library's default waits for every answer). After the request timeout
    the client is answered and the plugin told through `cancel`; then
    nbd_shutdown() returns at once (the connection is let go although the
    plugin still holds its ops), and SIGTERM ends the loop at once, since
    no client waits for those ops. The plugin's replies after the loop
    ended give -ESHUTDOWN, after nbdkit_server_free -ESTALE, and
    nbdkit_server_free releases the rest (LeakSanitizer, ASan)."""
    srv = start("grace", "--request-timeout-ms", "300")
    h = srv.connect()
    bufs = [nbd.Buffer(16 * KiB) for _ in range(6)]
    cookies = [h.aio_pread(b, i * MiB) for i, b in enumerate(bufs)]
    data = nbd.Buffer.from_bytearray(noise(7, 16 * KiB))
    cookies.append(h.aio_pwrite(data, 8 * MiB))
    srv.wait_ops(7)
    results = wait_aio(h, cookies, 10)
    assert_all(results, errno.EIO, "timed-out ops")   # ETIMEDOUT is EIO on the wire
    srv.wait_for(lambda: srv.count("cancel held ") >= 7, 5,
                 "the plugin to be told of each timeout through cancel")
    assert _shutdown_within(h, 3), (
        "nbd_shutdown() hung: the connection waits for ops its client was answered for\n"
        + srv.report())
    t0 = time.monotonic()
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(10) == 0, srv.report()
    assert time.monotonic() - t0 < 3, "the shutdown waited for timed-out ops"
    srv.assert_clean_exit()
    assert srv.count("cancel held ") == 7, srv.report()
    close(h)


# ---------------------------------------------------------------- cancel

def _held_cancel_ops(h, tag, n):
    """n ops the cancel-mode plugin holds (offset >= 32 MiB)."""
    bufs, cookies = [], []
    for i in range(n):
        off = HELD + (tag * 64 + i) * 64 * KiB
        k = i % 4
        if k == 0:
            b = nbd.Buffer(16 * KiB)
            bufs.append(b)
            cookies.append(h.aio_pread(b, off))
        elif k == 1:
            b = nbd.Buffer.from_bytearray(noise(tag + i, 16 * KiB))
            bufs.append(b)
            cookies.append(h.aio_pwrite(b, off))
        elif k == 2:
            cookies.append(h.aio_zero(8 * KiB, off))
        else:
            cookies.append(h.aio_trim(8 * KiB, off))
    return bufs, cookies


def test_cancel_on_disconnect_and_on_shutdown(start):
    """The `cancel` callback fires once for every unanswered op of a client
    that disconnected abruptly, and for every op in flight when the server
    shuts down; the plugin answers each cancelled op exactly once
    (ECANCELED, half inside the callback, half from a worker), the client
    still connected sees EIO, and other clients are served throughout."""
    srv = start("cancel")
    healthy = srv.connect()

    # A: 40 held ops and 2 ordinary ones, then gone without NBD_CMD_DISC.
    a = srv.connect()
    a_bufs, a_cookies = _held_cancel_ops(a, 0, 40)
    fine = nbd.Buffer(4 * KiB)
    done = wait_aio(a, [a.aio_pread(fine, 1 * MiB), a.aio_flush()], 10)
    assert_all(done, None, "ordinary ops")
    srv.wait_ops(42)
    assert srv.count("cancel ") == 0, "cancelled while the client was there\n" + srv.report()
    close(a)
    srv.wait_for(lambda: srv.count("cancel held ") >= 40, 10, "40 cancels")
    srv.wait_for(lambda: srv.count("close ") == srv.count("open ") - 1, 10,
                 "the gone client's handle to be closed")
    assert srv.count("cancel held ") == 40, srv.report()

    # Meanwhile and afterwards the other client is fine.
    data = noise(9, 32 * KiB)
    healthy.pwrite(data, 2 * MiB)
    assert healthy.pread(len(data), 2 * MiB) == data
    assert healthy.pread(4 * KiB, 7 * MiB) == pattern(7 * MiB, 4 * KiB)

    # B: 30 held ops (simple replies) when the server is told to stop.
    b = srv.connect(structured=False)
    b_bufs, b_cookies = _held_cancel_ops(b, 1, 30)
    srv.wait_ops(42 + 3 + 30)   # + healthy's three
    t0 = time.monotonic()
    srv.send(signal.SIGTERM)
    results = wait_aio(b, b_cookies, 10)
    # ECANCELED is not an NBD error: the client sees EIO.
    assert_all(results, errno.EIO, "ops cancelled by the shutdown")
    assert max(t for t, _ in results.values()) < 5
    assert srv.wait_exit(15) == 0, srv.report()
    took = time.monotonic() - t0
    srv.assert_clean_exit()
    assert srv.count("cancel held ") == 70, srv.report()
    assert took < 5, "shutdown took %.1fs" % took
    close(b)
    close(healthy)


# ---------------------------------------------------------------- shutdown

def test_shutdown_drains_1000_ops_in_flight(start):
    """1,000 ops held by the plugin over two connections when SIGTERM
    arrives (shutdown mode: the plugin releases them 300 ms after the
    shutdown): every op completes successfully with the right data,
    clients still negotiating are told NBD_REP_ERR_SHUTDOWN, then
    nbdkit_main_loop returns 0, with no leak."""
    srv = start("shutdown", "--shutdown-after", "1000000")
    h1 = srv.connect(structured=True)
    h2 = srv.connect(structured=False)
    negotiating = Client(path=srv.sock)
    try:
        negotiating.start()

        bufs, cookies, checks = [], {h1: [], h2: []}, []
        for i in range(1000):
            h = h1 if i % 2 == 0 else h2
            off = (i * 37 * KiB) % (60 * MiB)
            if i % 5 == 4:
                b = nbd.Buffer.from_bytearray(noise(i, 4 * KiB))
                cookies[h].append(h.aio_pwrite(b, 61 * MiB + (i // 5) * 4 * KiB % (2 * MiB)))
            else:
                b = nbd.Buffer(4 * KiB)
                cookies[h].append(h.aio_pread(b, off))
                checks.append((b, off))
            bufs.append(b)
        srv.wait_ops(1000)
        h1.poll(50)
        assert h1.aio_in_flight() == 500 and h2.aio_in_flight() == 500, "answered early"

        t0 = time.monotonic()
        srv.send(signal.SIGTERM)
        srv.wait_for(lambda: "shutdown requested" in srv.out(), 5, "the shutdown")
        # A client still negotiating: its next option is refused with
        # NBD_REP_ERR_SHUTDOWN once the loop has seen the shutdown (the
        # plugin holds the ops for 300 ms more, so the loop is still there).
        # (A wait on a condition: the option is asked again every 20 ms,
        # up to 0.25 s, until the answer is NBD_REP_ERR_SHUTDOWN.)
        seen = []
        deadline = time.monotonic() + 0.25
        while True:
            negotiating.option(OPT_LIST)
            seen.append(negotiating.final_reply(OPT_LIST))
            if seen[-1] != REP_ACK or time.monotonic() > deadline:
                break
            time.sleep(0.02)            # the loop has not seen the shutdown yet
        assert seen[-1] == REP_ERR_SHUTDOWN, "expected NBD_REP_ERR_SHUTDOWN, got %s" % [hex(r) for r in seen]

        for h in (h1, h2):
            assert_all(wait_aio(h, cookies[h], 20), None, "drained ops")
        for b, off in checks:
            assert b.to_bytearray() == pattern(off, 4 * KiB), off
        assert srv.wait_exit(15) == 0, srv.report()
        took = time.monotonic() - t0
        srv.assert_clean_exit()
        assert srv.count("op ") == 1000, srv.report()
        assert took >= 0.25, "the loop did not wait for the held ops (%.2fs)" % took
        assert not os.path.exists(srv.sock), "socket file left behind"
    finally:
        negotiating.close()
        close(h1)
        close(h2)


def test_shutdown_grace_answers_eshutdown_and_frees(start):
    """A plugin that ignores cancellation and never answers, 1,000 ops in
    flight, --shutdown-grace-ms 500: on SIGTERM every op is cancelled,
    then after ~0.5 s answered ESHUTDOWN, and nbdkit_main_loop returns 0.
    Replies after main_loop give -ESHUTDOWN, after nbdkit_server_free
    -ESTALE; the ops never answered are released by nbdkit_server_free:
    LeakSanitizer finds nothing."""
    srv = start("grace", "--shutdown-grace-ms", "500")
    h1 = srv.connect(structured=True)
    h2 = srv.connect(structured=False)
    bufs, cookies = [], {h1: [], h2: []}
    for i in range(1000):
        h = h1 if i < 900 else h2
        if i % 3 == 2:
            b = nbd.Buffer.from_bytearray(noise(i, 4 * KiB))
            cookies[h].append(h.aio_pwrite(b, (i * 8 * KiB) % (60 * MiB)))
        else:
            b = nbd.Buffer(4 * KiB)
            cookies[h].append(h.aio_pread(b, (i * 8 * KiB) % (60 * MiB)))
        bufs.append(b)
    cookies[h2].append(h2.aio_flush())
    srv.wait_ops(1001)
    t0 = time.monotonic()
    srv.send(signal.SIGTERM)
    results = {h: wait_aio(h, cookies[h], 15, t0) for h in (h1, h2)}
    for h, what in ((h1, "structured client"), (h2, "simple client")):
        assert_all(results[h], errno.ESHUTDOWN, what)
        times = [t for t, _ in results[h].values()]
        assert min(times) >= 0.4, "answered before the grace period ended: %.3f" % min(times)
        assert max(times) < 4.0, "the grace period took too long: %.3f" % max(times)
    assert srv.wait_exit(15) == 0, srv.report()
    took = time.monotonic() - t0
    assert took < 6, "main_loop took %.1fs to return after the grace period" % took
    srv.assert_clean_exit()
    assert srv.count("cancel held ") == 1001, "cancel was not called for every op\n" + srv.report()
    line = [l for l in srv.out().splitlines() if l.startswith("grace late replies:")]
    assert line, srv.report()
    nums = [int(w) for w in line[0].replace(",", " ").split() if w.isdigit()]
    assert sum(nums) == 1001 and all(n > 0 for n in nums), line
    close(h1)
    close(h2)


def test_stale_op_of_a_freed_server_cannot_touch_a_new_server(start):
    """An op of a server that was freed unanswered (grace period 0), then
    replied to while a new server runs in the same process: the header
    promises -ESTALE ("Ops of this server replied to afterwards are
    ignored"). It must not complete the new server's op: that client gets
    its own data, once, after the new server's plugin answers it."""
    srv = start("restart")
    a = srv.connect()
    buf = nbd.Buffer(4 * KiB)
    c = a.aio_pread(buf, 1 * MiB)
    res = wait_aio(a, [c], 10)
    assert res[c][1] == errno.ESHUTDOWN, res
    close(a)
    srv.wait_for(lambda: "ready again" in srv.out(), 10, "server B")

    b = srv.connect()
    t0 = time.monotonic()
    buf = nbd.Buffer(64 * KiB)
    off = 3 * MiB + 17
    c = b.aio_pread(buf, off)
    res = wait_aio(b, [c], 10, t0)
    t, err = res[c]
    stale = [l for l in srv.out().splitlines() if l.startswith("stale reply")]
    assert err is None, res
    assert buf.to_bytearray() == pattern(off, 64 * KiB), (
        "server B's read was completed by the reply to server A's op: %s\n%s"
        % (stale, srv.report()))
    assert t >= 0.25, "answered before B's plugin replied (%.3fs): %s" % (t, stale)
    assert b.pread(4 * KiB, 5 * MiB) == pattern(5 * MiB, 4 * KiB)
    b.shutdown()
    close(b)
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(15) == 0, srv.report()
    srv.assert_clean_exit()


# ---------------------------------------------------------------- memory caps

def test_per_connection_memory_cap(start):
    """--memory-limits 8M:1G on a plugin that holds every op: one
    connection pipelining ten 2 MiB WRITEs gets at most 8 MiB (+ one
    request) into the plugin, then the server stops reading it; the other
    writes are not lost: once the plugin answers, all ten succeed."""
    srv = start("never-reply", "--memory-limits", "8M:1G")
    c = raw(srv)
    try:
        payload = noise(3, 2 * MiB)
        data = b"".join(c.request_bytes(CMD_WRITE, i * 2 * MiB, 2 * MiB, payload=payload)
                        for i in range(10))
        sender = Sender(c.s, data)
        sender.start()
        held = settled(srv, 4)
        assert 4 <= held <= 5, "the plugin got %d 2-MiB writes past an 8 MiB cap\n%s" % (held, srv.report())

        # Another client is not affected by this connection's cap.
        other = raw(srv)
        other.send(other.request_bytes(CMD_WRITE, 40 * MiB, 4096, payload=b"x" * 4096, cookie=99))
        srv.wait_ops(held + 1, timeout=5)
        srv.send(signal.SIGUSR1)
        assert other.replies(1) == {99: 0}
        other.close()
        sender.join(20)
        assert not sender.is_alive() and sender.error is None, sender.error
        got = c.replies(10)
        assert got == {i + 1: 0 for i in range(10)}, got
    finally:
        c.close()
    h = srv.connect()
    assert h.pread(2 * MiB, 18 * MiB) == payload
    h.shutdown()
    close(h)
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(15) == 0, srv.report()
    srv.assert_clean_exit()


def test_connection_cap_resumes_by_itself_over_tcp(start):
    """--memory-limits 64K:1G, ops answered inside their callbacks, a TCP
    client pipelining 300 READs of 32 KiB. The connection pauses at its
    byte cap with requests still buffered; its replies then go out without
    the socket blocking, so TCP raises no event and nothing else will: the
    server must resume reading by itself. Every READ completes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = start("inline", "--memory-limits", "64K:1G", "--tcp-port", str(port))
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(port))
    bufs = [nbd.Buffer(32 * KiB) for _ in range(300)]
    cookies = [h.aio_pread(b, i * 64 * KiB) for i, b in enumerate(bufs)]
    results = wait_aio(h, cookies, 20)
    assert all(err is None for _, err in results.values()), results
    for i, b in enumerate(bufs):
        assert b.to_bytearray() == pattern(i * 64 * KiB, 32 * KiB), i
    h.shutdown()
    close(h)
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(15) == 0, srv.report()
    srv.assert_clean_exit()


def test_total_memory_cap_one_connection(start):
    """--memory-limits 256M:8M on a plugin that holds every op: one
    connection pipelines sixty-four 1 MiB READs (1.8 KB of requests). Its
    read buffers count against the total cap, so the plugin may get at
    most 8 MiB + one request of them; the rest wait, and all 64 succeed
    once the plugin answers."""
    srv = start("never-reply", "--memory-limits", "256M:8M")
    c = raw(srv)
    try:
        reqs = b"".join(c.request_bytes(CMD_READ, i * MiB, MiB) for i in range(64))
        c.send(reqs)
        held = settled(srv, 8)
        srv.send(signal.SIGUSR1)
        got = {}
        for _ in range(64):
            cookie, error, data = c.reply()
            assert error == 0, (cookie, error)
            assert data == pattern((cookie - 1) * MiB, MiB), cookie
            got[cookie] = error
        assert sorted(got) == list(range(1, 65))
        assert held <= 8 + 1, (
            "the plugin was made to hold %d MiB of read buffers (%d READs of "
            "1 MiB) with a total cap of 8 MiB\n%s" % (held, held, srv.report()))
    finally:
        c.close()
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(15) == 0, srv.report()
    srv.assert_clean_exit()


def test_total_memory_cap_many_connections(start):
    """--memory-limits 256M:8M on a plugin that holds every op: six
    connections each pipelining four 2 MiB WRITEs. The header contract
    ("any connection holding memory while the total is at its cap is not
    read ... One request may overshoot a cap by its own size") bounds what
    the plugin can be made to hold at 8 MiB + one 2 MiB request."""
    srv = start("never-reply", "--memory-limits", "256M:8M")
    conns, senders = [], []
    try:
        payload = noise(4, 2 * MiB)
        for k in range(6):
            c = raw(srv)
            conns.append(c)
            data = b"".join(c.request_bytes(CMD_WRITE, (k * 4 + i) * 2 * MiB, 2 * MiB,
                                            payload=payload) for i in range(4))
            s = Sender(c.s, data)
            s.start()
            senders.append(s)
            # One connection after the other, each once the previous one
            # got in what the caps let it: the first fills the 8 MiB total
            # with four writes, the second (holding nothing) may start one
            # more, the rest get nothing. (Payloads started at once would
            # all be received to their ends: a bound of one request more
            # than the cap holds for connections that start one by one.)
            srv.wait_ops(min(4 * (k + 1), 5))
        held = settled(srv, 5)
        srv.send(signal.SIGUSR1)
        for c in conns:
            assert c.replies(4) == {i: 0 for i in range(1, 5)}
        for s in senders:
            s.join(20)
            assert s.error is None, s.error
        assert held * 2 <= 8 + 2, (
            "the plugin was made to hold %d MiB (%d writes of 2 MiB) with a "
            "total cap of 8 MiB\n%s" % (held * 2, held, srv.report()))
    finally:
        for c in conns:
            c.close()
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(15) == 0, srv.report()
    srv.assert_clean_exit()


def _ten_reads_seconds(srv):
    """Seconds for 10 concurrent 4 KiB reads on a fresh connection."""
    h = srv.connect()
    try:
        bufs = [nbd.Buffer(4 * KiB) for _ in range(10)]
        t0 = time.monotonic()
        wait_aio(h, [h.aio_pread(b, i * 64 * KiB) for i, b in enumerate(bufs)], 30)
        took = time.monotonic() - t0
        h.shutdown()
    finally:
        close(h)
    return took


def test_handshake_timeout_gives_back_memory_budget(start):
    """Clients that pile up unread option replies (NBD_OPT_INFO for an
    unknown 4096-byte export name, answered with an error that echoes the
    name: 4 KiB a reply, a thousand of them), then are cut by the handshake
    timeout: their memory is freed, so the total budget (--memory-limits
    4M:8M) must be available again. A later client's 10 concurrent reads
    (each held 200 ms by the plugin) run in parallel, as before (~0.2 s),
    not one at a time (~2 s) as over budget."""
    srv = start("after-disconnect", "--hold-ms", "200", "--memory-limits", "4M:8M",
                "--handshake-timeout-ms", "1000")
    before = _ten_reads_seconds(srv)
    assert before < 1.0, "10 concurrent reads took %.2fs on a fresh server" % before

    opt = option_bytes(OPT_INFO, go_data(b"x" * 4096))
    data = struct.pack(">I", C_FLAGS) + opt * 1000     # under the 1,024 options
    rss0 = srv.rss_kib()
    hostile = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            hostile.append(s)
            s.connect(srv.sock)
            s.setblocking(False)
            # Sends it all, waiting on writability (up to 0.5 s) whenever
            # the socket is full.
            sent, deadline = 0, time.monotonic() + 0.5
            while sent < len(data):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if select.select([], [s], [], left)[1]:
                    try:
                        sent += s.send(data[sent:])
                    except BlockingIOError:
                        pass
        # The replies nobody reads are held by the server (~4 MB a client).
        grown = (srv.rss_kib() - rss0) // 1024
        assert grown >= 6, (
            "three clients that read none of their ~4 MB of option replies "
            "made the server hold only %d MiB\n%s" % (grown, srv.report()))
        # The handshake timeout cuts all three: the server counts no
        # connection any more while they are still open on this side.
        srv.wait_stats(lambda st: st["connections"] == 0, 5,
                       "the handshake timeout to cut the three clients")
    finally:
        for s in hostile:
            s.close()
    after = _ten_reads_seconds(srv)
    assert after < 1.0, (
        "after three clients were cut by the handshake timeout, 10 concurrent "
        "reads took %.2fs (before: %.2fs): the server still counts their "
        "freed output against its total memory budget" % (after, before))
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(15) == 0, srv.report()
    srv.assert_clean_exit()


def test_total_memory_cap_partial_payloads(start):
    """--memory-limits 256M:16M, a prompt plugin: eight connections each
    send a WRITE header for 32 MiB and 30 MiB of its payload, then stall.
    A payload is always received to its end once started (pausing it could
    deadlock connections that all wait on memory only they would free), and
    its buffer grows only with what the client sent: so each stalled
    connection holds at most what it sent (30 MiB here), never the 32 MiB it
    claimed, and a client that holds nothing is still served at once.
    Measured as the growth of the server's VmRSS."""
    srv = start("thread", "--memory-limits", "256M:16M")
    conns, senders = [], []
    try:
        base = srv.rss_kib()
        stall_writers(srv, conns, senders)
        # Waits until the payloads the server started are all in (their
        # senders are done) and nothing more moves: the quiet window is the
        # time given to the server to take in more than the caps allow.
        deadline = time.monotonic() + 10
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = (sum(not s.is_alive() for s in senders), srv.rss_kib() // 1024)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= 0.3:
                break
            time.sleep(0.02)
        done = sum(not s.is_alive() for s in senders)
        grown = (srv.rss_kib() - base) // 1024
        assert grown >= 30, (
            "%d payloads of 30 MiB were taken in, but the server holds only "
            "%d MiB more\n%s" % (done, grown, srv.report()))
        # The healthy client check: the server still answers. Not before
        # the library let go of the turn past the cap that a connection
        # stalled mid-WRITE holds (1 s): a client arriving before then
        # starves (test_client_arriving_during_a_stalled_turn_is_served).
        time.sleep(1.2)
        h = srv.connect()
        assert h.pread(4 * KiB, 0) == pattern(0, 4 * KiB)
        h.shutdown()
        close(h)
        assert grown <= 8 * 30 + 16, (
            "eight stalled WRITEs that sent 30 MiB each made the server hold "
            "%d MiB more\n%s" % (grown, srv.report()))
    finally:
        for c in conns:
            c.close()
    srv.send(signal.SIGTERM)
    assert srv.wait_exit(15) == 0, srv.report()
    srv.assert_clean_exit()


def test_client_arriving_during_a_stalled_turn_is_served(start):
    """--memory-limits 256M:16M: eight connections each send a WRITE header
    for 32 MiB and 30 MiB of its payload, then stall. A client that holds
    nothing arriving right then must still be served ("no client
    starves"): the turn past the cap passes on after 1 s of stalling, and
    the paused connections are woken to take it, so it is served once the
    stalled writers ahead of it had theirs (at most 8 s here). Before,
    it was never woken."""
    srv = start("thread", "--memory-limits", "256M:16M")
    conns, senders = [], []
    try:
        stall_writers(srv, conns, senders)
        h = srv.connect()
        try:
            done = wait_aio(h, [h.aio_pread(nbd.Buffer(4 * KiB), 0)], 15)
            assert all(err is None for _, err in done.values()), done
        finally:
            close(h)
    finally:
        for c in conns:
            c.close()
        srv.kill()
