"""Shared fixtures for the integration tests of libnbdkit-async.

Every test talks to a real build/memdisk process through real NBD clients
(nbdinfo, nbdsh, nbdcopy, qemu-img, qemu-io, libnbd's Python binding).

The `memdisk` fixture is a factory:

    srv = memdisk("--latency-ms", "10", size="64M")
    uri, sock, proc = srv          # also srv.uri, srv.sock, srv.proc

It starts build/memdisk on a Unix socket (or TCP with tcp="127.0.0.1:0"),
waits up to 10 s for the URI on the first stdout line, and at teardown
always stops it: SIGTERM, up to 10 s to exit, exit code 0 required (a
clean shutdown is part of the contract), kill -9 on timeout.

Server stderr goes to a file; it is shown in assertion messages and added
to the report of every failing test.  For library debug logs run

    /usr/bin/python3 -m pytest -q tests --memdisk-log=debug

(or export NBDKIT_ASYNC_LOG=debug, which the server inherits).
"""

import errno
import os
import shutil
import signal
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import nbd
import pytest

import nbdwire
from support import proc_status, stop_all, tool_env

ROOT = Path(__file__).resolve().parent.parent
MEMDISK = ROOT / "build" / "memdisk"

# MEMDISK_LOOPS=N runs every memdisk with --loops N: `make check` runs the
# memdisk modules a second time that way (see the Makefile).
LOOPS = int(os.environ.get("MEMDISK_LOOPS", "1"))
START_TIMEOUT = 10.0   # seconds until the URI line must appear
STOP_TIMEOUT = 10.0    # seconds from SIGTERM until the process must exit
TEST_TIMEOUT = 90.0    # watchdog: kill the servers of a test that hangs
TOOL_TIMEOUT = 60.0    # any external client command


def pytest_addoption(parser):
    parser.addoption(
        "--memdisk-log",
        default=None,
        metavar="LEVEL",
        help="run build/memdisk with NBDKIT_ASYNC_LOG=LEVEL (e.g. debug)",
    )


# --------------------------------------------------------------------------
# The server under test


class Memdisk:
    """One running build/memdisk process."""

    def __init__(self, args, uris, sock, proc, stderr_path, stdout_path, tmpdir):
        self.args = args
        self.uris = uris
        self.uri = uris[0] if uris else None
        self.sock = sock
        self.proc = proc
        self.stderr_path = stderr_path
        self.stdout_path = stdout_path
        self._tmpdir = tmpdir          # private short dir to remove, or None
        self.watchdog_fired = False
        self.returncode = None

    def __iter__(self):
        return iter((self.uri, self.sock, self.proc))

    @property
    def pid(self):
        return self.proc.pid

    def uri_for(self, export):
        """The URI of this server's Unix socket with another export name."""
        assert self.sock is not None, "uri_for needs a Unix-socket server"
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError as e:
            return f"<cannot read {self.stderr_path}: {e}>"

    def stderr_tail(self, limit=20000):
        text = self.stderr()
        if len(text) > limit:
            text = f"<... {len(text) - limit} bytes cut ...>\n" + text[-limit:]
        return text

    def describe(self):
        return (f"memdisk {' '.join(self.args)} (pid {self.pid})\n"
                f"--- server stderr ({self.stderr_path}) ---\n"
                f"{self.stderr_tail()}--- end of server stderr ---")

    def alive(self):
        return self.proc.poll() is None

    def threads(self):
        """The Threads: count of the server from /proc/PID/status."""
        return proc_status(self.pid, "Threads")

    def send_signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def _stats_lines(self):
        return [line for line in self.stderr().splitlines()
                if line.startswith("memdisk: connections")]

    def stats(self, timeout=5.0):
        """The server's nbdkit_server_stats counters now (memdisk prints
        them on SIGUSR1): {"connections", "connections_total",
        "in_flight", "reads", "writes", "bytes_read", "bytes_written",
        "errors"}."""
        before = len(self._stats_lines())
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while len(self._stats_lines()) == before:
            assert self.alive(), f"server died\n{self.describe()}"
            assert time.monotonic() < deadline, (
                f"no stats line {timeout:.0f} s after SIGUSR1\n{self.describe()}")
            time.sleep(0.005)
        line = self._stats_lines()[before]
        nums = [int(n) for n in re.findall(r"\d+", line)]
        keys = ("connections", "connections_total", "in_flight", "reads",
                "writes", "bytes_read", "bytes_written", "errors")
        assert len(nums) == len(keys), line
        return dict(zip(keys, nums))

    def wait_stats(self, predicate, what, timeout=10.0):
        """Polls stats() until predicate(stats) holds; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if predicate(st):
                return st
            assert time.monotonic() < deadline, (
                f"timed out after {timeout:.0f} s waiting for {what}: "
                f"last stats {st}\n{self.describe()}")
            time.sleep(0.005)

    def wait(self, timeout=STOP_TIMEOUT):
        """Wait for exit; kill -9 and fail on timeout.  Returns the code."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.returncode = self.proc.returncode
            raise AssertionError(
                f"server did not exit within {timeout:.0f} s after the "
                f"shutdown signal; killed with SIGKILL\n{self.describe()}")
        return self.returncode

    def stop(self, sig=signal.SIGTERM):
        """Shut the server down and assert a clean exit (code 0)."""
        if self.alive():
            self.proc.send_signal(sig)
        rc = self.wait()
        assert not self.watchdog_fired, (
            f"test watchdog ({TEST_TIMEOUT:.0f} s) killed the server\n"
            f"{self.describe()}")
        assert rc == 0, (
            f"server exit code {rc} after {signal.Signals(sig).name}, "
            f"expected 0 (clean shutdown)\n{self.describe()}")
        return rc

    def connect(self, uri=None, structured=True, strict=True, export=None,
                opt_mode=False):
        """A connected libnbd handle (see nbd_connect)."""
        return nbd_connect(uri or self.uri, structured=structured,
                           strict=strict, export=export, opt_mode=opt_mode)

    def cleanup_dir(self):
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def require_memdisk():
    """Fail (not skip) when the server under test has not been built."""
    if not MEMDISK.exists():
        pytest.fail(
            f"{MEMDISK} does not exist: build it first with `make` "
            f"(or `flock /tmp/nbdkit-async-build.lock make`) in {ROOT}",
            pytrace=False)
    return MEMDISK


def _socket_path(tmp_path):
    """A Unix socket path in tmp_path, or in a short private dir when
    tmp_path is too long for sun_path (108 bytes)."""
    path = tmp_path / "nbd.sock"
    if len(os.fsencode(str(path))) < 100:
        return path, None
    d = Path(tempfile.mkdtemp(prefix="memdisk-"))
    return d / "nbd.sock", d


def _server_env(request, log):
    env = dict(os.environ)
    level = log or request.config.getoption("--memdisk-log")
    if level:
        env["NBDKIT_ASYNC_LOG"] = level
    return env


def check_unix_uri(uri, sock):
    assert uri.startswith("nbd+unix://"), uri
    assert f"socket={sock}" in uri, (uri, sock)


def memdisk_factory(tmp_path, request, check_uri=check_unix_uri):
    """The body of the `memdisk` fixture (a generator to `yield from`);
    check_uri(uri, sock) checks the URI a Unix-socket server prints."""
    servers = []
    request.node._memdisk_servers = servers
    counter = [0]

    def start(*args, size="64M", unix=True, tcp=None, log=None):
        require_memdisk()
        counter[0] += 1
        n = counter[0]
        argv = [str(MEMDISK), "--size", str(size)]
        sock = tmpdir = None
        if unix:
            sock, tmpdir = _socket_path(tmp_path / f"srv{n}")
            sock.parent.mkdir(parents=True, exist_ok=True)
            argv += ["--unix", str(sock)]
        if tcp:
            argv += ["--tcp", tcp]
        argv += [str(a) for a in args]
        if LOOPS > 1 and "--loops" not in argv:
            argv += ["--loops", str(LOOPS)]
        stdout_path = tmp_path / f"memdisk{n}.stdout"
        stderr_path = tmp_path / f"memdisk{n}.stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err,
                                    env=_server_env(request, log))
        try:
            srv = Memdisk(argv[1:], [], sock, proc, stderr_path,
                          stdout_path, tmpdir)
        except BaseException:
            proc.kill()
            proc.wait(timeout=10)
            raise
        servers.append(srv)

        want = (1 if unix else 0) + (1 if tcp else 0)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = stdout_path.read_text(errors="replace")
            lines = text.split("\n")[:-1]    # complete lines only
            if len(lines) >= want:
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"memdisk exited with code {proc.returncode} before "
                    f"printing its URI (stdout {text!r})\n{srv.describe()}",
                    pytrace=False)
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=10)
                pytest.fail(
                    f"memdisk printed no URI within {START_TIMEOUT:.0f} s "
                    f"(stdout {text!r})\n{srv.describe()}", pytrace=False)
            time.sleep(0.005)
        srv.uris = [line.strip() for line in lines]
        srv.uri = srv.uris[0]
        if unix:
            check_uri(srv.uri, sock)
        return srv

    def watchdog():
        for srv in servers:
            if srv.alive():
                srv.watchdog_fired = True
                srv.proc.kill()

    timer = threading.Timer(TEST_TIMEOUT, watchdog)
    timer.daemon = True
    timer.start()
    try:
        yield start
    finally:
        timer.cancel()
        stop_all(servers, cleanup=Memdisk.cleanup_dir)


@pytest.fixture
def memdisk(tmp_path, request):
    """Factory: memdisk(*extra_args, size=..., unix=True, tcp=None, log=None).

    `size` is always passed (never rely on the default).  `tcp` is a
    HOST:PORT for --tcp; with unix=False only TCP is used.  Returns a
    Memdisk, which unpacks as (uri, socket path, process).
    """
    yield from memdisk_factory(tmp_path, request)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for i, srv in enumerate(getattr(item, "_memdisk_servers", []), 1):
            rep.sections.append(
                (f"memdisk #{i} stderr ({' '.join(srv.args)})",
                 srv.stderr_tail()))


# --------------------------------------------------------------------------
# Clients


def nbd_connect(uri, structured=True, strict=True, export=None,
                opt_mode=False):
    """Connect libnbd to `uri`.

    structured=False asks for simple replies only; strict=False turns off
    libnbd's client-side checks (set_strict_mode(0)) so that bad requests
    reach the server and the server answers them.
    """
    h = nbd.NBD()
    if not structured:
        h.set_request_structured_replies(False)
    if not strict:
        h.set_strict_mode(0)
    if opt_mode:
        h.set_opt_mode(True)
    if export is not None:
        h.set_export_name(export)
    h.connect_uri(uri)
    return h


def _call_repr(fn, args):
    def short(a):
        if isinstance(a, (bytes, bytearray)) and len(a) > 16:
            return f"<{len(a)} bytes>"
        return repr(a)
    return f"{getattr(fn, '__name__', fn)}({', '.join(map(short, args))})"


def expect_nbd_errno(errnum, fn, *args, **kwargs):
    """Call fn and assert it raises nbd.Error with .errnum == errnum (or
    one of them, if errnum is a tuple)."""
    want = errnum if isinstance(errnum, tuple) else (errnum,)
    names = "/".join(errno.errorcode.get(n, str(n)) for n in want)
    try:
        fn(*args, **kwargs)
    except nbd.Error as e:
        assert e.errnum in want, (
            f"{_call_repr(fn, args)}: expected {names}, got errnum "
            f"{errno.errorcode.get(e.errnum, e.errnum)} ({e})")
        return e
    raise AssertionError(f"{_call_repr(fn, args)} succeeded, expected {names}")


def run_tool(argv, srv=None, timeout=TOOL_TIMEOUT, check=True):
    """Run an external client; on failure show its output and the server's
    stderr."""
    try:
        p = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout,
                           env=tool_env())
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"{argv} did not finish within {timeout:.0f} s\n"
            f"stdout: {e.stdout}\nstderr: {e.stderr}\n"
            f"{srv.describe() if srv else ''}")
    if check:
        assert p.returncode == 0, (
            f"{' '.join(map(str, argv))} exited {p.returncode}\n"
            f"stdout: {p.stdout}\nstderr: {p.stderr}\n"
            f"{srv.describe() if srv else ''}")
    return p


# --------------------------------------------------------------------------
# Raw NBD (tests/nbdwire.py), for requests libnbd cannot send at all (flush
# with an offset, unknown commands and flags, DISC with requests in flight,
# unknown options, NBD_OPT_EXPORT_NAME).


@pytest.fixture
def raw_nbd():
    """Factory: raw_nbd(sock_path) -> an nbdwire.Client past the greeting
    and client flags (ready for options); closed at teardown."""
    conns = []

    def connect(sock_path, timeout=10.0):
        c = nbdwire.Client(path=sock_path, timeout=timeout)
        conns.append(c)
        return c.start()

    yield connect
    for c in conns:
        try:
            c.close()
        except OSError:
            pass
