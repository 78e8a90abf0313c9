"""Process helpers for the tests/test_cpp_*.py files (not a test module).

Every server a test starts goes through a Procs instance, whose close()
stops all of them whatever happened: SIGTERM, a bounded wait, kill -9 as
the fallback. Programs of ours must exit 0 after SIGTERM (a clean shutdown
is part of their contract); that is asserted by stop().

Sockets live in short private directories under /tmp (sun_path is 108
bytes; pytest's tmp_path can be longer).
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD = ROOT / "build"
INCLUDE = ROOT / "include"
STATICLIB = ROOT / "target" / "release" / "libnbdkit_async.a"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic",
            "-O1", "-g", "-I", str(INCLUDE), "-pthread"]
LIBS = [str(STATICLIB), "-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm",
        "-ldl"]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def tool_env():
    """Debian's tools want Debian's python3 (nbdsh runs `python3 -m nbd`)."""
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    return env


SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer"]


def build(src, out, extra=()):
    """Compile one C++ test program against the static library."""
    assert STATICLIB.exists(), f"{STATICLIB} missing: run make first"
    p = subprocess.run([CXX, *CXXFLAGS, *extra, "-o", str(out), str(src),
                        *LIBS],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"compiling {src} failed:\n{p.stderr}"
    return out


class Proc:
    """One started process; stdout and stderr go to files."""

    def __init__(self, argv, workdir, name, ours):
        self.argv = [str(a) for a in argv]
        self.name = name
        self.ours = ours
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, \
                open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err,
                                         env=tool_env())
        self.returncode = None

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def lines(self):
        """Complete stdout lines so far."""
        return self.stdout_path.read_text(errors="replace").split("\n")[:-1]

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def describe(self):
        err = self.stderr()
        if len(err) > 6000:
            err = "...\n" + err[-6000:]
        return (f"{self.name}: {' '.join(self.argv)} (pid {self.pid})\n"
                f"--- stderr ---\n{err}--- end ---")

    def wait_for_line(self, pred, timeout=START_TIMEOUT, what="output"):
        """The first stdout line satisfying pred; fails if the process dies
        or nothing matches within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if pred(line):
                    return line
            if not self.alive():
                raise AssertionError(f"exited ({self.proc.returncode}) "
                                     f"before {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s\n"
                                     f"{self.describe()}")
            time.sleep(0.01)

    def threads(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        raise AssertionError("no Threads: line")

    def kill(self):
        if self.alive():
            self.proc.kill()
        self.returncode = self.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Signal, wait (bounded, then kill -9); ours must exit 0."""
        if self.alive():
            self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not exit within {timeout} s of "
                                 f"{sig.name}; killed\n{self.describe()}")
        if self.ours:
            assert self.returncode == 0, (
                f"exit code {self.returncode} after {sig.name}, expected 0"
                f"\n{self.describe()}")
        return self.returncode


def wait_connectable(path, proc=None, timeout=START_TIMEOUT):
    """Until a Unix socket accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            pass
        finally:
            s.close()
        if proc is not None and not proc.alive():
            raise AssertionError(f"exited before listening\n"
                                 f"{proc.describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not accepting after {timeout} s"
                                 + (f"\n{proc.describe()}" if proc else ""))
        time.sleep(0.01)


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Starts processes and always stops them (use in a fixture)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="cpptest-"))
        self.procs = []
        self.count = 0

    def sock(self, name):
        return self.dir / f"{name}.sock"

    def start(self, argv, name, ours=True):
        self.count += 1
        p = Proc(argv, self.dir, f"{self.count}-{name}", ours)
        self.procs.append(p)
        return p

    def nbdkit(self, sock, *args, name="nbdkit"):
        """Upstream nbdkit on a Unix socket (stale socket file removed
        first: a killed nbdkit leaves it behind)."""
        if sock is not None:
            Path(sock).unlink(missing_ok=True)
            argv = ["nbdkit", "-U", sock, "-f", "--exit-with-parent", *args]
        else:
            argv = ["nbdkit", "-f", "--exit-with-parent", *args]
        p = self.start(argv, name, ours=False)
        if sock is not None:
            wait_connectable(sock, p)
        return p

    def server(self, argv, name, count=1):
        """One of our programs: wait for `count` URI lines on stdout."""
        p = self.start(argv, name)
        deadline = time.monotonic() + START_TIMEOUT
        while len(p.lines()) < count:
            if not p.alive():
                raise AssertionError(f"exited ({p.proc.returncode}) before "
                                     f"printing its URI\n{p.describe()}")
            if time.monotonic() > deadline:
                p.kill()
                raise AssertionError(f"no URI within {START_TIMEOUT} s\n"
                                     f"{p.describe()}")
            time.sleep(0.005)
        p.uris = [line.strip() for line in p.lines()[:count]]
        p.uri = p.uris[0]
        return p

    def close(self):
        """Stop everything: ours first (they may wait on upstreams)."""
        failures = []
        for p in sorted(self.procs, key=lambda p: not p.ours):
            try:
                if p.alive() or (p.ours and p.returncode is None):
                    p.stop()
            except AssertionError as e:
                failures.append(str(e))
            except Exception as e:          # never leak a process
                failures.append(repr(e))
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        return failures
