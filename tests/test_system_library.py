"""The library shipped and used like a system library (issue 9).

* install: `make install PREFIX=/usr DESTDIR=<tmp>` lays out the .so with
  its soname and symlinks, the .a, the header and nbdkit-async.pc; only
  nbdkit_* is exported; a C and a C++ program built with nothing but
  `pkg-config --cflags --libs nbdkit-async` (and `--static`) serve real
  clients; the README's link lines (static ones included) work; the .pc
  follows PREFIX; `make uninstall` removes it all again.
* socket activation: a small launcher passes listening sockets as fds 3..
  with LISTEN_FDS / LISTEN_PID (and `nbdinfo -- [ memdisk ]`).
* one client on a given fd: `nbdsh` connect_command over stdin/stdout, a
  socketpair, and the server ends when that client leaves.
* host-loop embedding: build/asio-embedded (boost::asio io_context on one
  thread) with 1000 requests in flight; tests/c/embed_harness.c drives the
  server from poll(2) and must honour nbdkit_server_timeout_ms.
* stats: nbdkit_server_stats matches exactly what a client did.
* logging: nbdkit_set_log_callback gets the right messages at the right
  levels; NBDKIT_ASYNC_LOG drives the default stderr logger.
* ABI: a plugin compiled against an older, smaller struct (the header copy
  in tests/abi/) works; a larger struct with unknown callbacks is refused.

Every process runs in its own session, is registered with the `procs`
fixture and is killed (whole process group) at teardown and by a per-test
watchdog; every wait is bounded. For library debug logs of the servers run
with NBDKIT_ASYNC_LOG=debug in the environment (they inherit it).
"""

import errno
import fcntl
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import nbd
import pytest

from support import proc_status, tool_env

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
MEMDISK = BUILD / "memdisk"
ASIO = BUILD / "asio-embedded"
INCLUDE = ROOT / "include"
HEADER = INCLUDE / "nbdkit-async.h"
STATICLIB = ROOT / "target" / "release" / "libnbdkit_async.a"
SHAREDLIB = ROOT / "target" / "release" / "libnbdkit_async.so"
TESTS = ROOT / "tests"
HARNESS_SRC = TESTS / "c" / "embed_harness.c"
CXX_PLUGIN_SRC = TESTS / "c" / "embed_plugin.cpp"
ABI_DIR = TESTS / "abi"
LOCK = "/tmp/nbdkit-async-build.lock"

CC = os.environ.get("CC", "cc")
CXX = os.environ.get("CXX", "g++")
CWARN = ["-Wall", "-Wextra", "-Werror", "-pedantic"]
PRIVATE_LIBS = ["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"]
PREFIX = "/usr"
SOMAJOR = "0"

KiB = 1 << 10
MiB = 1 << 20

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
WATCHDOG = 75.0          # per test: every registered process is killed
CLIENT_TIMEOUT = 60.0    # any external client or compiler

# Debian's nbdsh/nbdinfo want Debian's python3 (nbdsh runs python3 -m nbd).
TOOL_ENV = tool_env()


def cargo_version():
    m = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    assert m, "no version in Cargo.toml"
    return m.group(1)


def noise(seed, n):
    return random.Random(seed).randbytes(n)


def require(path):
    if not Path(path).exists():
        pytest.fail(f"{path} does not exist: build first with "
                    f"`flock {LOCK} make` in {ROOT}", pytrace=False)
    return path


def short_dir():
    """A private directory with a short path (sun_path is 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="nbdsys-"))


@pytest.fixture
def sockdir():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# Processes


class Spawned:
    """Popen-like handle for a process started with os.posix_spawn."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)


class Proc:
    """A server process of a test, output in files, always stopped."""

    def __init__(self, name, handle, out_path, err_path, argv):
        self.name = name
        self.p = handle
        self.out_path = out_path
        self.err_path = err_path
        self.argv = [str(a) for a in argv]
        self.exit_time = None

    @property
    def pid(self):
        return self.p.pid

    def stdout(self):
        return self.out_path.read_text(errors="replace")

    def stderr(self):
        try:
            text = self.err_path.read_text(errors="replace")
        except OSError as e:
            return f"<{e}>"
        return text if len(text) < 20000 else "<...>" + text[-20000:]

    def describe(self):
        return (f"{self.name}: {' '.join(self.argv)} (pid {self.pid}, "
                f"exit {self.p.returncode})\n--- stdout ---\n{self.stdout()}"
                f"--- stderr ---\n{self.stderr()}--- end ---")

    def alive(self):
        return self.p.poll() is None

    def send(self, sig):
        if self.alive():
            self.p.send_signal(sig)

    def wait_stdout(self, pred, timeout=START_TIMEOUT, after=0):
        """The first complete stdout line (from line index `after`) for which
        pred(line) is true."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.stdout().split("\n")[:-1]
            for line in lines[after:]:
                if pred(line):
                    return line
            if not self.alive():
                raise AssertionError(f"{self.name} exited early\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: expected stdout line not seen "
                                     f"within {timeout} s\n{self.describe()}")
            time.sleep(0.005)

    def wait_exit(self, timeout=STOP_TIMEOUT):
        """Exit code, or None if still running after `timeout` (not killed)."""
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return rc

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Signal, wait (bounded) and assert a clean exit 0."""
        self.send(sig)
        rc = self.wait_exit(timeout)
        if rc is None:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout} s "
                                 f"of {signal.Signals(sig).name}; killed\n"
                                 f"{self.describe()}")
        assert rc == 0, f"{self.name} exit code {rc}, expected 0\n{self.describe()}"
        return rc

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def threads(self):
        return proc_status(self.pid, "Threads")


@pytest.fixture
def procs(tmp_path):
    """Factory for server processes; all are killed at teardown, and by a
    watchdog if the test hangs (unblocking any libnbd call on them)."""
    started = []
    counter = [0]

    def start(argv, name=None, env=None, pass_fds=(), stdin=subprocess.DEVNULL):
        counter[0] += 1
        name = name or Path(str(argv[0])).name
        out = tmp_path / f"{counter[0]}-{name}.stdout"
        err = tmp_path / f"{counter[0]}-{name}.stderr"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = subprocess.Popen([str(a) for a in argv], stdin=stdin, stdout=fo,
                                 stderr=fe, env=env, pass_fds=pass_fds,
                                 start_new_session=True)
        proc = Proc(name, p, out, err, argv)
        started.append(proc)
        return proc

    def adopt(name, handle, out, err, argv):
        proc = Proc(name, handle, out, err, argv)
        started.append(proc)
        return proc

    start.adopt = adopt
    start.tmp = tmp_path
    start.started = started

    def watchdog():
        for p in started:
            if p.alive():
                p.kill()

    timer = threading.Timer(WATCHDOG, watchdog)
    timer.daemon = True
    timer.start()
    try:
        yield start
    finally:
        timer.cancel()
        for p in started:
            if p.alive():
                p.kill()


def run(argv, timeout=CLIENT_TIMEOUT, env=None, cwd=None, check=True, what=None):
    """Run a client or compiler in its own session; on timeout the whole
    process group (servers it started included) is killed."""
    argv = [str(a) for a in argv]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env or TOOL_ENV,
                         cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{what or argv} did not finish within {timeout} s\n"
                             f"stdout: {out}\nstderr: {err}")
    finally:
        try:   # stragglers of the group (a server the client started)
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if check:
        assert p.returncode == 0, (f"{what or ' '.join(argv)} exited {p.returncode}\n"
                                   f"stdout: {out}\nstderr: {err}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def sh(cmd, **kw):
    return run(["/bin/sh", "-c", cmd], what=cmd, **kw)


def needed(binary):
    """DT_NEEDED entries of an ELF file ([] for a static executable)."""
    out = run(["readelf", "-d", binary]).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def nbd_unix(path):
    h = nbd.NBD()
    h.connect_unix(str(path))
    return h


def rw_check(h, size, seed=1):
    """Write, read back, flush, zero/trim where offered, across the disk."""
    a = noise(seed, 256 * KiB)
    b = noise(seed + 1, 4 * KiB)
    h.pwrite(a, 0)
    h.pwrite(b, size - 4 * KiB)
    assert h.pread(len(a), 0) == a
    assert h.pread(4 * KiB, size - 4 * KiB) == b
    assert h.pread(8 * KiB, 1 * MiB) == bytes(8 * KiB)
    if h.can_flush():
        h.flush()
    if h.can_zero():
        h.zero(64 * KiB, 64 * KiB)
        assert h.pread(256 * KiB, 0) == a[:64 * KiB] + bytes(64 * KiB) + a[128 * KiB:]


def errnum_of(fn, *args):
    """The errno of the nbd.Error fn raises (no traceback kept alive: it
    would keep the handle, and its connection, open)."""
    try:
        fn(*args)
    except nbd.Error as ex:
        return ex.errnum
    raise AssertionError(f"{fn.__name__}{args} succeeded, expected an error")


# --------------------------------------------------------------------------
# Building test programs


def compile_harness(out):
    """tests/c/embed_harness.c against the source tree's header and
    static library (as the Makefile builds the examples)."""
    run([CC, "-std=c11", "-O2", "-g", *CWARN, "-I", INCLUDE, "-pthread",
         "-o", out, HARNESS_SRC, STATICLIB, *PRIVATE_LIBS])
    return out


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    require(STATICLIB)
    d = tmp_path_factory.mktemp("harness")
    return compile_harness(d / "embed_harness")


def start_harness(procs, harness, sock, *args, env=None):
    p = procs([harness, "--unix", sock, *args], name="embed_harness", env=env)
    p.wait_stdout(lambda l: l == "ready")
    return p


# --------------------------------------------------------------------------
# Install into a DESTDIR


class Install:
    def __init__(self, destdir):
        self.destdir = destdir
        self.libdir = destdir / PREFIX.lstrip("/") / "lib"
        self.incdir = destdir / PREFIX.lstrip("/") / "include"
        self.pcdir = self.libdir / "pkgconfig"
        self.pc = self.pcdir / "nbdkit-async.pc"
        self.env = dict(TOOL_ENV)
        self.env.update(PKG_CONFIG_SYSROOT_DIR=str(destdir),
                        PKG_CONFIG_PATH=str(self.pcdir),
                        PKG_CONFIG_LIBDIR=str(self.pcdir))
        self.env.pop("CPATH", None)
        self.env.pop("LIBRARY_PATH", None)
        self.env.pop("LD_LIBRARY_PATH", None)

    def run_env(self):
        env = dict(TOOL_ENV)
        env["LD_LIBRARY_PATH"] = str(self.libdir)
        return env


def make_install(destdir, target="install", prefix=PREFIX):
    """`make install` from the source tree, under the build lock (it runs
    cargo through the `lib` target)."""
    return run(["flock", LOCK, "make", "-C", ROOT, target, f"PREFIX={prefix}",
                f"DESTDIR={destdir}"], timeout=600, what=f"make {target}")


def pc_vars(pc):
    text = Path(pc).read_text()
    fields = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))

    def expand(v):
        return re.sub(r"\$\{(\w+)\}", lambda m: expand(fields[m.group(1)]), v)

    return {k: expand(v) for k, v in fields.items()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    dest = tmp_path_factory.mktemp("destdir")
    make_install(dest)
    return Install(dest)


def header_functions(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return set(re.findall(r"\b(nbdkit_\w+)\s*\(", text))


def test_install_layout(installed):
    """Files, symlink chain, modes, and a .pc that describes this install."""
    ver = cargo_version()
    lib = installed.libdir
    real = lib / f"libnbdkit_async.so.{ver}"
    assert real.is_file() and not real.is_symlink(), f"{real} missing"
    assert os.access(real, os.X_OK)
    so0 = lib / f"libnbdkit_async.so.{SOMAJOR}"
    so = lib / "libnbdkit_async.so"
    assert so0.is_symlink() and os.readlink(so0) == real.name, (so0, os.readlink(so0))
    assert so.is_symlink() and so.resolve() == real.resolve(), so
    assert not os.readlink(so).startswith("/"), "symlinks must be relative"
    assert (lib / "libnbdkit_async.a").is_file()
    with open(lib / "libnbdkit_async.a", "rb") as f:
        assert f.read(8) == b"!<arch>\n"
    hdr = installed.incdir / "nbdkit-async.h"
    assert hdr.read_bytes() == HEADER.read_bytes()
    assert installed.pc.is_file()

    keys = dict(re.findall(r"^(\w[\w.]*):\s*(.*)$", installed.pc.read_text(), re.M))
    v = pc_vars(installed.pc)
    assert keys.get("Version") == ver, keys
    assert (v["prefix"], v["libdir"], v["includedir"]) == \
        (PREFIX, f"{PREFIX}/lib", f"{PREFIX}/include"), (
            f"`make install PREFIX={PREFIX}` installed a .pc for another "
            f"prefix:\n{installed.pc.read_text()}")
    r = run(["pkg-config", "--modversion", "nbdkit-async"], env=installed.env)
    assert r.stdout.strip() == ver


def test_soname(installed):
    """The .so carries the soname the .so.0 symlink provides."""
    real = installed.libdir / f"libnbdkit_async.so.{cargo_version()}"
    out = run(["readelf", "-d", real]).stdout
    m = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", out)
    assert m, f"no SONAME in {real}:\n{out}"
    assert m.group(1) == f"libnbdkit_async.so.{SOMAJOR}"
    assert (installed.libdir / m.group(1)).resolve() == real.resolve()


def test_only_api_symbols_exported(installed):
    """nm -D: every defined dynamic symbol is nbdkit_*, and they are exactly
    the functions the header declares."""
    real = installed.libdir / f"libnbdkit_async.so.{cargo_version()}"
    out = run(["nm", "-D", "--defined-only", real]).stdout
    syms = {line.split()[-1] for line in out.splitlines() if line.strip()}
    stray = sorted(s for s in syms if not s.startswith("nbdkit_"))
    assert not stray, f"{len(stray)} non-API symbols exported: {stray[:30]}"
    declared = header_functions((installed.incdir / "nbdkit-async.h").read_text())
    assert syms == declared, (f"exported but not declared: {sorted(syms - declared)}; "
                              f"declared but not exported: {sorted(declared - syms)}")


def test_installed_header_namespace(installed):
    """A system header only defines names in its own namespace: every macro
    NBDKIT_*, every type nbdkit_* (user code must not collide with it)."""
    text = (installed.incdir / "nbdkit-async.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    macros = re.findall(r"^\s*#\s*define\s+(\w+)", text, re.M)
    types = re.findall(r"\b(?:struct|typedef struct)\s+(\w+)", text)
    bad = sorted({m for m in macros if not m.startswith("NBDKIT_")} |
                 {t for t in types if not t.startswith("nbdkit_")})
    assert not bad, f"installed header defines names outside NBDKIT_/nbdkit_: {bad}"


def serve_and_check(procs, argv, sock, env, size):
    """Start a built test program serving `sock` (it prints "ready"), check
    it with nbdinfo and a libnbd read/write pass, stop it (exit 0)."""
    p = procs(argv, env=env)
    p.wait_stdout(lambda l: l == "ready")
    info = json.loads(run(["nbdinfo", "--json", f"nbd+unix:///?socket={sock}"]).stdout)
    assert info["exports"][0]["export-size"] == size, info
    h = nbd_unix(sock)
    try:
        assert h.get_size() == size
        rw_check(h, size)
        h.shutdown()
    finally:
        del h
    p.stop()


def test_pkgconfig_c_shared(installed, procs, sockdir):
    """A C program built with only `pkg-config --cflags --libs`: linked to
    libnbdkit_async.so.0 from the DESTDIR, serves nbdinfo and libnbd."""
    out = procs.tmp / "c_shared"
    deps = procs.tmp / "c_shared.d"
    sh(f'{CC} -std=c11 -O2 {" ".join(CWARN)} -pthread -MD -MF {deps} '
       f'-o {out} {HARNESS_SRC} $(pkg-config --cflags --libs nbdkit-async)',
       env=installed.env)
    assert str(installed.incdir / "nbdkit-async.h") in deps.read_text(), (
        f"not compiled against the installed header:\n{deps.read_text()}")
    assert f"libnbdkit_async.so.{SOMAJOR}" in needed(out), needed(out)
    ldd = run(["ldd", out], env=installed.run_env()).stdout
    m = re.search(r"libnbdkit_async\.so\.\d+ => (\S+)", ldd)
    assert m and Path(m.group(1)).resolve().is_relative_to(installed.destdir.resolve()), ldd
    sock = sockdir / "c.sock"
    serve_and_check(procs, [out, "--unix", sock], sock, installed.run_env(), 16 * MiB)


def test_pkgconfig_cxx_shared(installed, procs, sockdir):
    """A tiny C++ async plugin (std::thread replies) built with only
    `pkg-config --cflags --libs` serves real clients."""
    out = procs.tmp / "cxx_shared"
    sh(f'{CXX} -std=c++17 -O2 {" ".join(CWARN)} -pthread -o {out} '
       f'{CXX_PLUGIN_SRC} $(pkg-config --cflags --libs nbdkit-async)',
       env=installed.env)
    assert f"libnbdkit_async.so.{SOMAJOR}" in needed(out), needed(out)
    sock = sockdir / "cxx.sock"
    serve_and_check(procs, [out, sock], sock, installed.run_env(), 16 * MiB)


def test_pkgconfig_static(installed, procs, sockdir):
    """`cc -static ... $(pkg-config --static --cflags --libs nbdkit-async)`
    links (Libs.private must only name libraries a static link can find)
    and gives a binary with no libnbdkit_async.so dependency that serves
    clients without LD_LIBRARY_PATH."""
    out = procs.tmp / "c_static"
    r = sh(f'{CC} -std=c11 -O2 {" ".join(CWARN)} -pthread -static -o {out} '
           f'{HARNESS_SRC} $(pkg-config --static --cflags --libs nbdkit-async)',
           env=installed.env, check=False)
    flags = run(["pkg-config", "--static", "--libs", "nbdkit-async"],
                env=installed.env).stdout.strip()
    assert r.returncode == 0, (
        f"static link with the installed nbdkit-async.pc failed "
        f"(pkg-config --static --libs: {flags}):\n{r.stderr[-3000:]}")
    deps = needed(out)
    assert not any(d.startswith("libnbdkit_async") for d in deps), deps
    sock = sockdir / "s.sock"
    serve_and_check(procs, [out, "--unix", sock], sock, TOOL_ENV, 16 * MiB)


def readme_commands(readme):
    """Shell commands in README.md's code blocks (indented or fenced),
    backslash continuations joined, that compile with cc/gcc/clang."""
    lines, out, cont = readme.splitlines(), [], ""
    in_fence = False
    for line in lines:
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if not (in_fence or line.startswith("    ") or cont):
            continue
        text = cont + " " + line.strip() if cont else line.strip()
        if text.endswith("\\"):
            cont = text[:-1].strip()
            continue
        cont = ""
        text = text.lstrip("$ ").strip()
        if re.match(r"(cc|gcc|clang)\s", text):
            out.append(text)
    return out


def test_readme_link_lines(installed, tmp_path):
    """README.md gives a static-link line, and every cc line it gives works
    against the installed tree (and the source tree), built from the
    README's own example program: the static ones produce binaries with no
    libnbdkit_async.so dependency, the pkg-config one links the .so.0."""
    readme = (ROOT / "README.md").read_text()
    cmds = readme_commands(readme)
    static = [c for c in cmds if re.search(r"libnbdkit_async\.a|-l:libnbdkit_async|"
                                           r"--static|-Bstatic|\s-static\b", c)]
    assert static, ("README.md has no static-link line (a cc command linking "
                    f"libnbdkit_async.a or using pkg-config --static); found {cmds}")
    m = re.search(r"```c\n(.*?)```", readme, re.S)
    assert m, "README.md has no ```c example program"
    for i, cmd in enumerate(cmds):
        d = tmp_path / f"cmd{i}"
        d.mkdir()
        srcs = re.findall(r"(\S+\.c)\b", cmd) or ["prog.c"]
        for src in srcs:
            (d / src).write_text(m.group(1))
        for name in ("target", "include"):
            (d / name).symlink_to(ROOT / name)
        r = sh(cmd, cwd=d, env=installed.env, check=False)
        assert r.returncode == 0, f"README line failed: {cmd}\n{r.stderr[-3000:]}"
        o = re.search(r"-o\s+(\S+)", cmd)
        binary = d / (o.group(1) if o else "a.out")
        assert binary.exists(), f"{cmd} produced no {binary}"
        deps = needed(binary)
        if cmd in static:
            assert not any(x.startswith("libnbdkit_async") for x in deps), (cmd, deps)
        else:
            assert f"libnbdkit_async.so.{SOMAJOR}" in deps, (cmd, deps)


def test_install_pc_follows_prefix(tmp_path):
    """Two installs with different PREFIXes in a row: each nbdkit-async.pc
    describes its own PREFIX (not one left in build/ by an earlier install),
    so pkg-config points at the installed header and library."""
    for prefix in ("/usr/local", "/opt/nbdkit-async-test"):
        dest = tmp_path / prefix.strip("/").replace("/", "_")
        make_install(dest, prefix=prefix)
        pc = dest / prefix.lstrip("/") / "lib" / "pkgconfig" / "nbdkit-async.pc"
        v = pc_vars(pc)
        assert (v["prefix"], v["libdir"], v["includedir"]) == \
            (prefix, f"{prefix}/lib", f"{prefix}/include"), (
                f"make install PREFIX={prefix} installed a .pc for another "
                f"prefix:\n{pc.read_text()}")


def test_make_uninstall(tmp_path):
    """make uninstall removes every installed file and nothing else."""
    dest = tmp_path / "dest"
    make_install(dest)
    other = [dest / "usr/lib/libother.so.1", dest / "usr/include/other.h",
             dest / "usr/lib/pkgconfig/other.pc"]
    for f in other:
        f.write_text("not ours\n")
    installed_files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*")
                             if p.is_file() or p.is_symlink())
    assert len(installed_files) >= 7, installed_files
    make_install(dest, "uninstall")
    left = sorted(str(p.relative_to(dest)) for p in dest.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p not in other)
    assert not left, f"make uninstall left: {left}"
    for f in other:
        assert f.exists(), f"make uninstall removed {f}"


# --------------------------------------------------------------------------
# Socket activation


def socket_activate(procs, argv, socks, listen_pid="self", name="activated"):
    """A minimal systemd: `socks` become fds 3, 4, ... of the child, with
    LISTEN_FDS=len(socks) and LISTEN_PID=<the child's pid> (the shell that
    execs the server sets it to $$, which exec keeps). listen_pid="N" sets
    a foreign pid instead."""
    out = procs.tmp / f"{name}.stdout"
    err = procs.tmp / f"{name}.stderr"
    fo = open(out, "wb")
    fe = open(err, "wb")
    high = []
    try:
        # Move the sockets out of the way of 3.. first (non-inheritable dups).
        for s in socks:
            high.append(fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100))
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, fo.fileno(), 1),
                   (os.POSIX_SPAWN_DUP2, fe.fileno(), 2)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(high)]
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
        env["LISTEN_FDS"] = str(len(socks))
        if listen_pid == "self":
            script = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
        else:
            env["LISTEN_PID"] = str(listen_pid)
            script = 'exec "$@"'
        full = ["/bin/sh", "-c", script, "sh", *[str(a) for a in argv]]
        pid = os.posix_spawn("/bin/sh", full, env, file_actions=actions, setsid=True)
    finally:
        for fd in high:
            os.close(fd)
        fo.close()
        fe.close()
    return procs.adopt(name, Spawned(pid), out, err, full)


def listening_unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)
    return s


@pytest.mark.parametrize("with_tcp", [False, True], ids=["unix", "unix+tcp"])
def test_socket_activation(procs, sockdir, with_tcp):
    """memdisk started with a listening Unix socket as fd 3 (LISTEN_FDS=1,
    LISTEN_PID=its pid), or that plus a TCP one as fd 4 (LISTEN_FDS=2),
    serves them all, one disk behind them, several clients in turn, and
    leaves the socket file it did not create in place."""
    require(MEMDISK)
    path = sockdir / "act.sock"
    socks = [listening_unix(path)]
    if with_tcp:
        ts = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ts.bind(("127.0.0.1", 0))
        ts.listen(16)
        port = ts.getsockname()[1]
        socks.append(ts)
    try:
        p = socket_activate(procs, [MEMDISK, "--size", "64M"], socks)
    finally:
        for s in socks:
            s.close()
    h1 = nbd_unix(path)
    h2 = nbd.NBD()
    try:
        assert h1.get_size() == 64 * MiB
        rw_check(h1, 64 * MiB, seed=7)
        if with_tcp:
            h2.connect_tcp("127.0.0.1", str(port))
        else:
            h2.connect_unix(str(path))
        assert h2.pread(256 * KiB, 0) == h1.pread(256 * KiB, 0)
        h2.pwrite(b"T" * 4096, 8 * MiB)
        assert h1.pread(4096, 8 * MiB) == b"T" * 4096
        h1.shutdown()
        h2.shutdown()
    finally:
        del h1, h2
    h3 = nbd_unix(path)               # a later client is still served
    assert h3.pread(4096, 8 * MiB) == b"T" * 4096
    h3.shutdown()
    del h3
    assert p.stdout() == "", "an activated server has no address of its own to print"
    p.stop()
    assert path.exists(), "the server removed a socket file it was handed"


def test_socket_activation_checks_listen_pid(procs, sockdir):
    """LISTEN_PID naming another process: fd 3 is not ours, not served."""
    require(MEMDISK)
    path = sockdir / "foreign.sock"
    own = sockdir / "own.sock"
    us = listening_unix(path)
    try:
        p = socket_activate(procs, [MEMDISK, "--size", "1M", "--unix", own],
                            [us], listen_pid=1, name="foreign")
        p.wait_stdout(lambda l: l.startswith("nbd+unix://"))
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(0.5)
        try:
            c.connect(str(path))
            with pytest.raises(socket.timeout):
                c.recv(18)      # nobody accepts: no greeting
        finally:
            c.close()
        h = nbd_unix(own)
        assert h.get_size() == MiB
        h.shutdown()
        del h
    finally:
        us.close()
    p.stop()


def test_nbdinfo_brackets_socket_activation(procs):
    """`nbdinfo -- [ build/memdisk --size 1M ]` (libnbd socket-activates the
    server), and libnbd's connect_systemd_socket_activation read/write; the
    server does not outlive the client."""
    require(MEMDISK)
    tag = f"sa{os.getpid()}x{random.randrange(1 << 30)}"
    try:
        r = run(["nbdinfo", "--json", "--", "[", MEMDISK, "--size", "1M",
                 "--export", tag, "]"], timeout=30)
        info = json.loads(r.stdout)
        assert info["exports"][0]["export-size"] == MiB, info
        assert info["exports"][0]["export-name"] == tag
        r = run(["nbdinfo", "--", "[", MEMDISK, "--size", "1M", "]"], timeout=30)
        assert "export-size: 1048576" in r.stdout, r.stdout
        script = (
            "import nbd, random\n"
            "h = nbd.NBD()\n"
            f"h.connect_systemd_socket_activation([{str(MEMDISK)!r}, '--size', '64M', "
            f"'--export', {tag!r}])\n"
            "d = random.Random(3).randbytes(1 << 20)\n"
            "h.pwrite(d, 5 << 20); assert h.pread(1 << 20, 5 << 20) == d\n"
            "h.flush(); h.shutdown(); print('ok')\n")
        r = run(["/usr/bin/python3", "-c", script], timeout=30)
        assert r.stdout.strip() == "ok", r
        deadline = time.monotonic() + 5
        while run(["pgrep", "-f", tag], check=False).returncode == 0:
            assert time.monotonic() < deadline, "socket-activated memdisk outlived its client"
            time.sleep(0.05)
    finally:
        run(["pkill", "-KILL", "-f", tag], check=False)


# --------------------------------------------------------------------------
# One client on a given descriptor


def test_nbdsh_connect_command_stdin(tmp_path):
    """nbdsh: h.connect_command([memdisk, --fd, 0, --size, 64M]) reads,
    writes and flushes; when the handle shuts down the server exits 0, at
    once (a server without listeners ends when its last client leaves)."""
    require(MEMDISK)
    status = tmp_path / "status"
    err = tmp_path / "memdisk.stderr"
    wrapper = (f'"$@" 2>{shlex.quote(str(err))}; '
               f'echo $? >{shlex.quote(str(status))}')
    argv = ["/bin/sh", "-c", wrapper, "sh", str(MEMDISK), "--fd", "0", "--size", "64M"]
    script = f"""
import random, time
h.connect_command({argv!r})
assert h.get_size() == 64 << 20
d = random.Random(5).randbytes(1 << 20)
h.pwrite(d, 0)
h.pwrite(b"z" * 4096, (64 << 20) - 4096)
assert h.pread(1 << 20, 0) == d
assert h.pread(4096, (64 << 20) - 4096) == b"z" * 4096
h.flush()
t = time.monotonic()
h.shutdown()
del h
print("closed_after", time.monotonic() - t)
"""
    r = run(["nbdsh", "-c", script], timeout=30, check=False)
    assert r.returncode == 0, f"nbdsh failed:\n{r.stdout}\n{r.stderr}\n{err.read_text() if err.exists() else ''}"
    assert status.read_text().strip() == "0", (
        f"memdisk exit status {status.read_text()!r}\n{err.read_text()}")
    took = float(re.search(r"closed_after (\S+)", r.stdout).group(1))
    assert took < 3.0, (
        f"memdisk took {took:.1f} s to exit after its only client disconnected "
        f"(shutdown+close of the handle waits for the server process)\n"
        f"memdisk stderr:\n{err.read_text()}")


def test_serve_fd_socketpair_exits_when_client_leaves(procs):
    """--fd N on one end of a socketpair (no handshake timeout, so no timer
    can hide a missed wakeup): the client does I/O and disconnects; the
    server must exit 0 promptly."""
    require(MEMDISK)
    ours, theirs = socket.socketpair()
    try:
        p = procs([MEMDISK, "--fd", theirs.fileno(), "--size", "16M",
                   "--handshake-timeout-ms", "0"], pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    h = nbd.NBD()
    fd = os.dup(ours.fileno())
    ours.close()
    h.connect_socket(fd)           # libnbd owns fd now
    rw_check(h, 16 * MiB, seed=11)
    t = time.monotonic()
    h.shutdown()
    del h
    rc = p.wait_exit(timeout=5)
    took = time.monotonic() - t
    assert rc is not None, (
        f"memdisk --fd still running {took:.1f} s after its only client "
        f"disconnected (server without listeners must end)\n{p.describe()}")
    assert rc == 0, p.describe()
    assert took < 3.0, f"memdisk took {took:.1f} s to exit\n{p.describe()}"


def test_serve_fd_refuses_a_pipe(procs):
    """nbdkit_server_serve_fd on something that is not a socket fails cleanly."""
    require(MEMDISK)
    r, w = os.pipe()
    try:
        p = procs([MEMDISK, "--fd", "0", "--size", "1M"], stdin=r)
    finally:
        os.close(r)
    try:
        rc = p.wait_exit(timeout=5)
        assert rc is not None and rc != 0, f"expected a prompt failure\n{p.describe()}"
        assert "fd 0" in p.stderr(), p.describe()
    finally:
        os.close(w)


def test_serve_fd_refuses_a_seqpacket_socket(procs):
    """A connected AF_UNIX socket that is not a stream (SOCK_SEQPACKET) is
    refused too: the connection code counts on stream semantics."""
    require(MEMDISK)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        p = procs([MEMDISK, "--fd", "0", "--size", "1M"], stdin=theirs.fileno())
        rc = p.wait_exit(timeout=5)
        assert rc is not None and rc != 0, f"expected a prompt failure\n{p.describe()}"
        assert "not a stream socket" in p.stderr(), p.describe()
    finally:
        ours.close()
        theirs.close()


# --------------------------------------------------------------------------
# Host-loop embedding


def start_asio(procs, sock, *args):
    require(ASIO)
    p = procs([ASIO, "--unix", sock, *args], name="asio-embedded")
    line = p.wait_stdout(lambda l: bool(l.strip()))
    assert line == f"nbd+unix:///?socket={sock}", (line, p.describe())
    return p


def block(i):
    return struct.pack("<Q", i) * 512       # 4 KiB naming block i


def test_asio_embedded_1000_in_flight(procs, sockdir):
    """build/asio-embedded --latency-ms 100: 1000 reads in flight on one
    connection complete in < 1 s with the right data, on a 1-2 thread
    process; SIGTERM then exits 0."""
    sock = sockdir / "asio.sock"
    p = start_asio(procs, sock, "--size", "64M", "--latency-ms", "100")
    n = 1000
    h = nbd_unix(sock)
    try:
        h.pwrite(b"".join(block(i) for i in range(n)), 0)
        bufs = [nbd.Buffer(4096) for _ in range(n)]
        t0 = time.monotonic()
        cookies = [h.aio_pread(bufs[i], i * 4096) for i in range(n)]
        threads = []
        deadline = t0 + 10
        while h.aio_in_flight() > 0:
            threads.append(p.threads())
            assert time.monotonic() < deadline, f"{h.aio_in_flight()} still in flight"
            h.poll(50)
        elapsed = time.monotonic() - t0
        for c in cookies:
            assert h.aio_command_completed(c)
        bad = [i for i in range(n) if bytes(bufs[i].to_bytearray()) != block(i)]
        assert not bad, f"{len(bad)} reads returned wrong data, e.g. block {bad[0]}"
        h.shutdown()
    finally:
        del h
    print(f"1000 reads at 100 ms latency: {elapsed:.3f} s, threads {max(threads)}")
    assert 0.1 <= elapsed < 1.0, f"1000 reads took {elapsed:.3f} s\n{p.describe()}"
    assert max(threads) <= 2, f"threads {max(threads)}"
    p.stop()


def test_asio_embedded_shutdown_answers_in_flight(procs, sockdir):
    """SIGTERM with 200 reads in flight (seen in the SIGUSR1 stats): every
    read is still answered with the right data, then the process exits 0."""
    sock = sockdir / "asio2.sock"
    p = start_asio(procs, sock, "--size", "16M", "--latency-ms", "400")
    n = 200
    h = nbd_unix(sock)
    try:
        h.pwrite(b"".join(block(i) for i in range(n)), 0)
        bufs = [nbd.Buffer(4096) for _ in range(n)]
        cookies = [h.aio_pread(bufs[i], i * 4096) for i in range(n)]
        deadline = time.monotonic() + 5
        while f"in flight {n}," not in p.stderr():
            h.poll(0)   # let libnbd push the requests out
            assert time.monotonic() < deadline, f"stats never showed {n} in flight\n{p.describe()}"
            p.send(signal.SIGUSR1)
            time.sleep(0.02)
        t = time.monotonic()
        p.send(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while h.aio_in_flight() > 0:
            assert time.monotonic() < deadline, f"{h.aio_in_flight()} unanswered\n{p.describe()}"
            h.poll(100)
        for c in cookies:
            assert h.aio_command_completed(c)
        assert all(bytes(bufs[i].to_bytearray()) == block(i) for i in range(n))
    finally:
        del h
    rc = p.wait_exit(10)
    assert rc == 0, p.describe()
    assert time.monotonic() - t < 5


def test_poll_host_loop_honours_timeout_ms(procs, harness, sockdir):
    """tests/c/embed_harness.c runs the server from poll(2) with the timeout
    nbdkit_server_timeout_ms gives: a client that never finishes its
    handshake is dropped after the 300 ms handshake timeout although its
    socket stays quiet."""
    sock = sockdir / "poll.sock"
    p = start_harness(procs, harness, sock, "--handshake-timeout-ms", "300")
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    try:
        c.connect(str(sock))
        t = time.monotonic()
        greeting = b""
        while len(greeting) < 18:
            chunk = c.recv(18 - len(greeting))
            assert chunk, "closed before the greeting"
            greeting += chunk
        try:
            rest = c.recv(1)
        except socket.timeout:
            rest = None
        took = time.monotonic() - t
    finally:
        c.close()
    assert rest == b"", f"not disconnected within 5 s ({rest!r})\n{p.describe()}"
    assert 0.25 <= took < 2.0, f"dropped after {took:.3f} s"
    # The loop still serves normally afterwards.
    h = nbd_unix(sock)
    rw_check(h, 16 * MiB)
    h.shutdown()
    del h
    p.stop()


# --------------------------------------------------------------------------
# Stats


def read_stats(p):
    """SIGUSR1 -> one new STATS line from the harness, parsed."""
    before = len([l for l in p.stdout().split("\n")[:-1] if l.startswith("STATS")])
    p.send(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while True:
        lines = [l for l in p.stdout().split("\n")[:-1] if l.startswith("STATS")]
        if len(lines) > before:
            break
        assert time.monotonic() < deadline, f"no STATS line\n{p.describe()}"
        time.sleep(0.005)
    st = {}
    for kv in lines[before].split()[1:]:
        k, v = kv.split("=", 1)
        st[k] = v if k == "small" else [int(x) for x in v.split(",")] if "," in v else int(v)
    assert st["small"] == "ok", f"nbdkit_server_stats wrote past a smaller size: {lines[before]}"
    return st


def wait_stats(p, pred, timeout=5):
    deadline = time.monotonic() + timeout
    while True:
        st = read_stats(p)
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"stats never satisfied: {st}"
        time.sleep(0.02)


def test_stats_match_client_activity(procs, harness, sockdir):
    """N reads and M writes of known sizes, a flush and one failing read:
    every counter is exact, and the latency histogram counts every reply."""
    sock = sockdir / "stats.sock"
    fail_at = 8 * MiB
    p = start_harness(procs, harness, sock, "--fail-offset", str(fail_at))
    st = read_stats(p)
    assert st["connections"] == st["connections_total"] == 0
    assert sum(st["req"]) == st["bytes_read"] == st["bytes_written"] == 0
    assert sum(st["lat"]) == 0 and st["errors"] == 0

    reads = [512, 4096, 65536, 1, 1 << 20, 12345, 4096]
    writes = [4096, 512, 131072, 7, 2 << 20]
    h = nbd_unix(sock)
    try:
        off = 0
        for n in writes:
            h.pwrite(noise(n, n), off)
            off += n
        for i, n in enumerate(reads):
            h.pread(n, i * MiB)
        h.flush()
        assert errnum_of(h.pread, 4096, fail_at) == errno.EIO
        st = read_stats(p)
    finally:
        del h                 # closed without NBD_CMD_DISC
    replies = len(reads) + len(writes) + 1 + 1
    assert st["connections"] == 1 and st["connections_total"] == 1, st
    assert st["in_flight"] == 0, st
    assert st["req"] == [len(reads) + 1, len(writes), 0, 1, 0, 0, 0, 0], st
    assert st["bytes_read"] == sum(reads), st
    assert st["bytes_written"] == sum(writes), st
    assert st["errors"] == 1, st
    assert sum(st["lat"]) == replies, st
    st = wait_stats(p, lambda s: s["connections"] == 0)
    assert st["connections_total"] == 1
    assert sum(st["lat"]) == replies and st["errors"] == 1
    p.stop()


def test_stats_count_refused_request_reply(procs, harness, sockdir):
    """A request the library refuses (read past the end) is counted: in
    requests[READ], in errors, and its reply in the latency histogram
    (which counts replies)."""
    sock = sockdir / "refused.sock"
    p = start_harness(procs, harness, sock, "--size", str(1 * MiB))
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_unix(str(sock))
    try:
        h.pread(512, 0)
        # past the end: EINVAL from the library
        assert errnum_of(h.pread, 4096, 1 * MiB) == errno.EINVAL
        st = read_stats(p)
    finally:
        del h
    assert st["req"][0] == 2, st
    assert st["errors"] == 1, st
    assert st["bytes_read"] == 512, st
    assert sum(st["lat"]) == 2, (
        f"latency histogram holds {sum(st['lat'])} replies, 2 were sent "
        f"(the refused request's reply is missing): {st}")
    p.stop()


def test_stats_count_disconnect_request(procs, harness, sockdir):
    """NBD_CMD_DISC is a request received: requests[2] counts it (the
    struct documents the array as indexed by NBD_CMD_*, DISC = 2)."""
    sock = sockdir / "disc.sock"
    p = start_harness(procs, harness, sock)
    h = nbd_unix(sock)
    h.pread(512, 0)
    h.shutdown()                           # sends NBD_CMD_DISC
    del h
    st = wait_stats(p, lambda s: s["connections"] == 0)
    assert st["req"][0] == 1, st
    assert st["req"][2] == 1, f"NBD_CMD_DISC not counted in requests[2]: {st}"
    assert st["errors"] == 0, st
    p.stop()


def test_memdisk_sigusr1_prints_stats(procs, sockdir):
    """memdisk's SIGUSR1 line reports what a client did."""
    require(MEMDISK)
    sock = sockdir / "m.sock"
    p = procs([MEMDISK, "--size", "16M", "--unix", sock])
    p.wait_stdout(lambda l: l.startswith("nbd+unix://"))
    h = nbd_unix(sock)
    try:
        for i in range(3):
            h.pread(4096, i * 4096)
        h.pwrite(b"a" * 8192, 0)
        h.pwrite(b"b" * 512, MiB)
        p.send(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while "memdisk: connections" not in p.stderr():
            assert time.monotonic() < deadline, p.describe()
            time.sleep(0.01)
    finally:
        del h
    line = [l for l in p.stderr().splitlines() if "memdisk: connections" in l][0]
    assert line == ("memdisk: connections 1 (total 1), in flight 0, reads 3, "
                    "writes 2, bytes read 12288, bytes written 8704, errors 0"), line
    p.stop()


# --------------------------------------------------------------------------
# Logging


def read_log(path):
    out = []
    for line in Path(path).read_text().splitlines():
        level, _, msg = line.partition("\t")
        out.append((int(level), msg))
    return out


def no_env_log():
    env = dict(os.environ)
    env.pop("NBDKIT_ASYNC_LOG", None)
    return env


def test_log_callback_debug(procs, harness, sockdir):
    """Max level NBDKIT_LOG_DEBUG: the callback gets level-4 messages naming
    the options (NBD_OPT_GO) and the commands (NBD_CMD_READ, NBD_CMD_WRITE)
    a client used, nothing above level 4, and nothing goes to stderr."""
    sock = sockdir / "logd.sock"
    log = procs.tmp / "debug.log"
    p = start_harness(procs, harness, sock, "--log-file", log, "--log-level", "4",
                      env=no_env_log())
    h = nbd_unix(sock)
    h.pread(4096, 0)
    h.pwrite(b"w" * 4096, 0)
    h.shutdown()
    del h
    p.stop()
    msgs = read_log(log)
    assert msgs, "the log callback got nothing"
    levels = {lv for lv, _ in msgs}
    assert levels <= {1, 2, 3, 4}, f"levels outside 1..4: {levels}"
    debug = [m for lv, m in msgs if lv == 4]
    for name in ("NBD_OPT_GO", "NBD_CMD_READ", "NBD_CMD_WRITE"):
        assert any(name in m for m in debug), (
            f"no level-4 (debug) message names {name}; got:\n" +
            "\n".join(f"{lv} {m}" for lv, m in msgs))
    assert "nbdkit-async:" not in p.stderr(), (
        f"library still logs to stderr with a callback set:\n{p.stderr()}")


def test_log_callback_warn_filters(procs, harness, sockdir):
    """Max level NBDKIT_LOG_WARN: an error (listening on a regular file)
    reaches the callback at level 1; no message above level 2 does."""
    sock = sockdir / "logw.sock"
    log = procs.tmp / "warn.log"
    notsock = procs.tmp / "regular-file"
    notsock.write_text("not a socket\n")
    p = start_harness(procs, harness, sock, "--log-file", log, "--log-level", "2",
                      "--provoke-error", notsock, env=no_env_log())
    h = nbd_unix(sock)
    h.pread(4096, 0)
    h.shutdown()
    del h
    p.stop()
    msgs = read_log(log)
    assert any(lv == 1 for lv, _ in msgs), f"no error-level message: {msgs}"
    assert all(lv <= 2 for lv, _ in msgs), f"messages above WARN: {msgs}"
    assert not any("NBD_OPT_GO" in m for _, m in msgs), msgs


def test_log_env_variable_default_stderr(procs, sockdir):
    """No callback: NBDKIT_ASYNC_LOG=debug puts debug lines on stderr;
    unset, the default (warn) shows none."""
    require(MEMDISK)
    for level in ("debug", None):
        env = no_env_log()
        if level:
            env["NBDKIT_ASYNC_LOG"] = level
        sock = sockdir / f"env-{level}.sock"
        p = procs([MEMDISK, "--size", "1M", "--unix", sock], env=env)
        p.wait_stdout(lambda l: l.startswith("nbd+unix://"))
        h = nbd_unix(sock)
        h.pread(512, 0)
        h.shutdown()
        del h
        p.stop()
        err = p.stderr()
        if level:
            assert re.search(r"nbdkit-async: debug: .*NBD_OPT_GO", err), err
        else:
            assert "debug:" not in err and "info:" not in err, err


# --------------------------------------------------------------------------
# ABI discipline


def so_dir(tmp):
    """A directory where the loader finds the current library under its
    soname (what an installed system provides)."""
    d = tmp / "lib"
    d.mkdir(exist_ok=True)
    link = d / f"libnbdkit_async.so.{SOMAJOR}"
    if not link.exists():
        link.symlink_to(require(SHAREDLIB))
    (d / "libnbdkit_async.so").unlink(missing_ok=True)
    (d / "libnbdkit_async.so").symlink_to(SHAREDLIB)
    return d


def test_abi_v1_header_is_a_prefix_of_the_current_one(tmp_path):
    """tests/abi/nbdkit-async-v1.h really is the older shape: every field at
    the same offset as today, ending where `cancel` begins."""
    fields = ["name", "open", "close", "get_size", "can_write", "can_flush",
              "can_trim", "can_zero", "can_fua", "can_multi_conn", "can_cache",
              "pread", "pwrite", "flush", "trim", "zero", "cache"]
    src = tmp_path / "prefix.c"
    src.write_text(
        "#define nbdkit_plugin_lowlevel nbdkit_plugin_lowlevel_v1\n"
        "#define nbdkit_server_new nbdkit_server_new_v1\n"
        '#include "nbdkit-async-v1.h"\n'
        "#undef nbdkit_plugin_lowlevel\n#undef nbdkit_server_new\n"
        "#undef NBDKIT_FLAG_FUA\n#undef NBDKIT_FLAG_MAY_TRIM\n"
        "#include <nbdkit-async.h>\n#include <stddef.h>\n"
        "#define V1 struct nbdkit_plugin_lowlevel_v1\n"
        "#define CUR struct nbdkit_plugin_lowlevel\n" +
        "".join(f"_Static_assert(offsetof(V1, {f}) == offsetof(CUR, {f}), \"{f}\");\n"
                for f in fields) +
        "_Static_assert(sizeof (V1) == offsetof(CUR, cancel), \"v1 ends at cancel\");\n"
        "_Static_assert(sizeof (V1) < sizeof (CUR), \"smaller\");\n"
        "int main (void) { return 0; }\n")
    run([CC, "-std=c11", *CWARN, "-I", ABI_DIR, "-I", INCLUDE, "-c", "-o",
         tmp_path / "prefix.o", src])


def test_abi_old_plugin_works(procs, sockdir):
    """A plugin compiled only against tests/abi/nbdkit-async-v1.h, passing
    its smaller sizeof (its struct ends right before a PROT_NONE page),
    loads the current libnbdkit_async.so.0 and serves real clients; the
    callbacks it cannot have are absent (no base:allocation, fast zero,
    cache)."""
    out = procs.tmp / "old_plugin"
    deps = procs.tmp / "old_plugin.d"
    lib = so_dir(procs.tmp)
    run([CC, "-std=c11", "-O2", *CWARN, "-I", ABI_DIR, "-MD", "-MF", deps,
         "-o", out, ABI_DIR / "old_plugin.c", "-L", lib, "-lnbdkit_async"])
    assert "include/nbdkit-async.h" not in deps.read_text(), deps.read_text()
    env = dict(TOOL_ENV, LD_LIBRARY_PATH=str(lib))
    sock = sockdir / "old.sock"
    p = procs([out, sock], env=env)
    p.wait_stdout(lambda l: l == "ready")
    assert p.stdout().splitlines()[0] == "sizeof=136", p.stdout()
    info = json.loads(run(["nbdinfo", "--json", f"nbd+unix:///?socket={sock}"]).stdout)
    e = info["exports"][0]
    assert e["export-size"] == 16 * MiB
    assert not e["is_read_only"] and e["can_flush"] and e["can_trim"] and e["can_zero"]
    assert not e["can_fast_zero"] and not e["can_cache"], e
    assert "base:allocation" not in e.get("contexts", []), e
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_unix(str(sock))
    try:
        assert not h.can_meta_context("base:allocation")
        rw_check(h, 16 * MiB, seed=21)
        h.trim(64 * KiB, 0)
        h.shutdown()
    finally:
        del h
    p.stop()


def test_abi_larger_struct_refused(tmp_path):
    """A plugin struct larger than the library's, with a non-zero callback
    in the part the library does not know, is refused (NULL); with those
    bytes all zero it is accepted."""
    out = tmp_path / "larger_plugin"
    run([CC, "-std=c11", "-O2", *CWARN, "-I", INCLUDE, "-pthread", "-o", out,
         ABI_DIR / "larger_plugin.c", STATICLIB, *PRIVATE_LIBS])
    env = no_env_log()
    r = run([out, "nonzero"], env=env)
    assert "new=NULL" in r.stdout, (r.stdout, r.stderr)
    assert "nbdkit_server_new" in r.stderr, f"refusal not logged: {r.stderr!r}"
    r = run([out, "zero"], env=env)
    assert "new=ok" in r.stdout, (r.stdout, r.stderr)
