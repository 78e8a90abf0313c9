"""Plain helpers shared by the test modules (pytest fixtures live in
conftest.py): building the C harnesses of tests/c/ against the static
library, running a harness process on a private Unix socket and checking
its clean exit, waiting for libnbd aio commands, and the environment for
Debian's NBD client tools.
"""

import fcntl
import os
import shutil
import signal
import struct
import termios
import subprocess
import tempfile
import time
from pathlib import Path

import nbd
import pytest

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "include"
STATICLIB = ROOT / "target" / "release" / "libnbdkit_async.a"
C_DIR = ROOT / "tests" / "c"
CC = os.environ.get("CC", "cc")

HARNESS_CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g",
                  "-I", str(INCLUDE), "-I", str(C_DIR), "-pthread"]
ASAN_FLAGS = ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer"]
PRIVATE_LIBS = ["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"]
BUILD_TIMEOUT = 180


# --------------------------------------------------------------------------
# Processes and client tools


def tool_env(base=None):
    """A copy of the environment (or of `base`) with /usr/bin first in
    PATH: Debian's nbdsh/nbdinfo want Debian's python3 (nbdsh runs
    `python3 -m nbd`), not whatever python3 comes first in the caller's
    PATH."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    return env


def proc_status(pid, key):
    """The number of the `key:` line (Threads, VmRSS in KiB, ...) of
    /proc/PID/status."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s: line in /proc/%d/status" % (key, pid))


def unread_by_peer(fd):
    """Bytes sent on socket fd that the peer has not read yet (SIOCOUTQ;
    for a Unix socket the kernel counts them until the receiver takes
    them): a counter of what a server without statistics of its own has
    taken in."""
    buf = fcntl.ioctl(fd, termios.TIOCOUTQ, struct.pack("i", 0))
    return struct.unpack("i", buf)[0]


def wait_until_consumed(h, timeout=10):
    """Runs libnbd handle h until it has sent everything it queued and the
    server has read all of it off the socket (see unread_by_peer)."""
    deadline = time.monotonic() + timeout
    while True:
        pending = h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE
        if not pending and unread_by_peer(h.aio_get_fd()) == 0:
            return
        assert time.monotonic() < deadline, (
            "the server did not take in the requests within %ss" % timeout)
        h.poll(10)


def poll_until_any_completed(h, timeout=10):
    """Runs h until at least one of its commands completed (successfully
    or not)."""
    deadline = time.monotonic() + timeout
    while not h.aio_peek_command_completed():
        assert time.monotonic() < deadline, "no command completed within %ss" % timeout
        h.poll(10)


# --------------------------------------------------------------------------
# Building the C harnesses


def compile_c_harnesses(jobs, timeout=BUILD_TIMEOUT):
    """Compiles C harnesses against include/ and the static library, all at
    once.  jobs: {name: (source, exe, extra_flags)}.  Fails the test when
    the library or the compiler is missing or a build fails.  Returns
    {name: exe}."""
    if not STATICLIB.is_file():
        pytest.fail(f"{STATICLIB} is missing: build with "
                    f"`flock /tmp/nbdkit-async-build.lock make` first")
    if shutil.which(CC) is None:
        pytest.fail("no C compiler (%s)" % CC)
    procs = {}
    for name, (src, exe, flags) in jobs.items():
        argv = [CC, *HARNESS_CFLAGS, *flags, "-o", str(exe), str(src),
                str(STATICLIB), *PRIVATE_LIBS]
        procs[name] = (exe, argv, subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    bins = {}
    for name, (exe, argv, p) in procs.items():
        try:
            output, _ = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, "building the %s harness failed:\n%s\n%s" % (
            name, " ".join(argv), output)
        bins[name] = exe
    return bins


def compile_c_harness(src, exe, flags=ASAN_FLAGS, timeout=BUILD_TIMEOUT):
    """One harness (by default with AddressSanitizer); returns exe."""
    return compile_c_harnesses({Path(src).stem: (src, exe, flags)},
                               timeout)[Path(src).stem]


# --------------------------------------------------------------------------
# A harness process


def parse_stats(line):
    """A STATS line of tests/c/harness.h as a dict: numbers as ints,
    comma-separated lists (req, lat) as lists of ints, the rest as text;
    "requests" is "req" by another name."""
    out = {}
    for field in line.split()[1:]:
        key, _, value = field.partition("=")
        if "," in value:
            out[key] = [int(v) for v in value.split(",")]
        elif value.isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    out["requests"] = out.get("req")
    return out


class HarnessProcess:
    """One C harness (or server) process serving a Unix socket in a private
    short tmp dir (sockaddr_un paths are limited to 107 bytes), stdout and
    stderr in files there, AddressSanitizer leak checking on (asan=True).

    argv: [*wrapper, binary, *before, "--unix", SOCK, *args]; with
    unix=False no --unix and self.sock is None."""

    name = "server"

    def __init__(self, binary, args=(), before=(), prefix="nbdka-",
                 env=None, wrapper=(), unix=True, asan=True):
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.sock = os.path.join(self.dir, "nbd.sock") if unix else None
        self.out_path = os.path.join(self.dir, "stdout")
        self.err_path = os.path.join(self.dir, "stderr")
        full_env = dict(os.environ)
        if asan:
            full_env["ASAN_OPTIONS"] = "detect_leaks=1"
        full_env.update(env or {})
        self.argv = [*map(str, wrapper), str(binary), *map(str, before),
                     *(["--unix", self.sock] if unix else []), *map(str, args)]
        self.returncode = None
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=full_env)

    def out(self):
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def err(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def report(self):
        out = self.out().splitlines()
        if len(out) > 80:
            out = out[:20] + ["... (%d lines) ..." % (len(out) - 60)] + out[-40:]
        err = self.err()
        if len(err) > 20000:
            err = err[:5000] + "\n<... cut ...>\n" + err[-15000:]
        return "\n".join(["%s: %s (pid %d)" % (self.name, " ".join(self.argv),
                                               self.proc.pid),
                          "exit status: %s" % (self.proc.poll(),),
                          "--- %s stdout" % self.name, *out,
                          "--- %s stderr" % self.name, err, "--- end"])

    def alive(self):
        return self.proc.poll() is None

    def count(self, prefix):
        """How many stdout lines start with prefix."""
        return sum(1 for l in self.out().splitlines() if l.startswith(prefix))

    def wait_for(self, predicate, timeout, what):
        """Polls predicate(); fails when the process exits first or after
        timeout seconds (then the process is killed)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail("%s exited while waiting for %s\n%s"
                            % (self.name, what, self.report()))
            if time.monotonic() > deadline:
                msg = "timed out after %ss waiting for %s\n%s" % (
                    timeout, what, self.report())
                self.kill()
                pytest.fail(msg)
            time.sleep(0.01)

    stats_signal = signal.SIGUSR1

    def stats(self, timeout=5):
        """The server's nbdkit_server_stats counters now: the harness
        prints a STATS line (tests/c/harness.h) on self.stats_signal.
        Returns {"connections", "connections_total", "in_flight",
        "requests": [8 counters by NBD_CMD_*], "bytes_read",
        "bytes_written", "errors", "lat": [32], ...}."""
        before = self.count("STATS ")
        self.send(self.stats_signal)
        self.wait_for(lambda: self.count("STATS ") > before, timeout,
                      "a STATS line")
        line = [l for l in self.out().splitlines() if l.startswith("STATS ")][before]
        return parse_stats(line)

    def wait_stats(self, predicate, timeout, what):
        """Polls stats() until predicate(stats) holds; returns them."""
        box = []

        def check():
            box[:] = [self.stats()]
            return predicate(box[0])
        self.wait_for(check, timeout, what)
        return box[0]

    def wait_ready(self, timeout=10):
        """Until stdout has a "ready" line and the socket exists."""
        self.wait_for(lambda: "ready\n" in self.out() and os.path.exists(self.sock),
                      timeout, "ready")

    def send(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout):
        """The exit status; killed, and AssertionError, on timeout."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("%s did not exit within %ss; killed\n%s"
                                 % (self.name, timeout, self.report()))
        return self.returncode

    def assert_exit_ok(self, marks):
        """Exit status 0 and none of `marks` (sanitizer reports, harness
        self-check errors, panics) on stderr.  Returns stderr."""
        rc = self.proc.poll()
        assert rc == 0, "%s exit status %s\n%s" % (self.name, rc, self.report())
        err = self.err()
        for mark in marks:
            assert mark not in err, "%r in %s stderr\n%s" % (mark, self.name,
                                                             self.report())
        return err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------
# The api/sync harness disk

_PAT = bytes(range(251))


def pattern(offset, count):
    """The harness disk's initial contents at [offset, offset+count)."""
    start = offset % 251
    return (_PAT * ((start + count) // 251 + 1))[start:start + count]


def noise(seed, count):
    return bytes((seed * 131 + i * 7 + (i >> 9)) & 0xFF for i in range(count))


# --------------------------------------------------------------------------
# libnbd clients


def close_abruptly(h):
    """Closes a client handle now (nbd_close: abruptly, without
    NBD_CMD_DISC). The Python object stays around, emptied, so its own
    __del__ does not close the handle a second time."""
    if hasattr(h, "_o"):
        h.__del__()
        del h._o


def close_politely(h):
    """Polite disconnect (NBD_CMD_DISC), then nbd_close, at most once."""
    if hasattr(h, "_o"):
        try:
            if h.aio_is_ready():
                h.shutdown()
        except nbd.Error:
            pass
        h.__del__()
        del h._o


def wait_aio(h, cookies, timeout, t0=None, poll_ms=20):
    """Runs h until every cookie completed. Returns {cookie: (seconds,
    errnum)} where errnum is None on success; seconds are since t0
    (default: the call), and so is the timeout."""
    t0 = time.monotonic() if t0 is None else t0
    pending = list(cookies)
    done = {}
    while pending:
        for c in list(pending):
            try:
                finished, err = h.aio_command_completed(c), None
            except nbd.Error as e:
                finished, err = True, e.errnum
            if finished:
                done[c] = (time.monotonic() - t0, err)
                pending.remove(c)
        if not pending:
            break
        if time.monotonic() - t0 > timeout:
            raise AssertionError("%d of %d commands still in flight after %ss"
                                 % (len(pending), len(cookies), timeout))
        h.poll(poll_ms)
    return done


def stop_all(procs, cleanup=lambda p: p.cleanup()):
    """Teardown of a factory fixture: p.stop() (which asserts a clean
    exit) for every process, then cleanup(p) whatever happened; the
    failures of all of them reported together."""
    failures = []
    for p in procs:
        try:
            p.stop()
        except AssertionError as e:
            failures.append(str(e))
        finally:
            cleanup(p)
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


# ---------------------------------------------------------------- certificates

def openssl(*args, cwd):
    p = subprocess.run(["openssl", *map(str, args)], cwd=cwd,
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, (f"openssl {' '.join(map(str, args))} failed\n"
                               f"{p.stdout}{p.stderr}")
    return p.stdout


def make_ca(d, name, cn):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem",
             "-days", "3", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_leaf(d, name, ca, cn, ext):
    """A v3 leaf certificate signed by `ca` (X.509 v3 needs -extfile)."""
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n" + ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem",
             "-CAkey", f"{ca}-key.pem", "-CAcreateserial",
             "-out", f"{name}-cert.pem", "-days", "3",
             "-extfile", f"{name}.ext", cwd=d)
