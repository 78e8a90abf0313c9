"""A new user's first hour: `make demo` as the first command on a fresh
machine, and what `make install` leaves behind (stripped objects, debug
info split out, a relocatable pkg-config file)."""

import os
import re
import signal
import subprocess
import time

from support import ROOT, tool_env

PREFIX = "/usr/local"


def make(*args, **kw):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def test_demo_needs_only_a_c_compiler():
    """What `make demo` would run: a visible cargo build and memdisk alone;
    no C++ example, no boost or OpenSSL, no package installs, so it works
    on a machine that has none of the optional packages."""
    r = make("-n", "demo")
    assert r.returncode == 0, r.stderr
    plan = r.stdout
    assert re.search(r"^cargo build --release$", plan, re.M), plan     # progress shown
    for absent in ("g++", "asio", "boost", "-lssl", "rbd", "apt-get", "install-deps"):
        assert absent not in plan, f"make demo would use {absent}:\n{plan}"
    assert "build/memdisk" in plan, plan


def test_demo_serves_at_one_absolute_uri(tmp_path):
    """`make demo` prints one URI, with an absolute socket path, and serves
    it until Ctrl-C."""
    p = subprocess.Popen(["make", "--no-print-directory", "-s", "demo"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("nbd"):
                break
        uris = [line.strip() for line in lines if "://" in line]
        assert len(uris) == 1, "".join(lines)
        m = re.fullmatch(r"nbd\+unix:///\?socket=(/\S+)", uris[0])
        assert m and os.path.isabs(m.group(1)), uris
        r = subprocess.run(["nbdinfo", "--size", uris[0]], capture_output=True, text=True,
                           timeout=30, env=tool_env())
        assert r.stdout.strip() == str(1 << 30), r.stderr
    finally:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def sections(path):
    return subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_install_is_stripped_with_debug_info_apart(tmp_path):
    """`make install` installs a stripped .so (with a debuglink) and a .a
    without debug info; `make install-debug` puts the debug info where gdb
    looks for it; the .pc follows --define-variable=prefix=."""
    dest = tmp_path / "dest"
    r = make("install", "install-debug", f"PREFIX={PREFIX}", f"DESTDIR={dest}")
    assert r.returncode == 0, r.stdout + r.stderr
    lib = dest / PREFIX.lstrip("/") / "lib"
    so = next(lib.glob("libnbdkit_async.so.*.*.*"))
    assert ".debug_info" not in sections(so), "the installed .so keeps its debug info"
    assert so.stat().st_size < 8 << 20, f"{so} is {so.stat().st_size} bytes"
    links = subprocess.run(["readelf", "--debug-dump=links", str(so)], capture_output=True,
                           text=True).stdout
    debug = dest / f"{PREFIX.lstrip('/')}/lib/debug{PREFIX}/lib/{so.name}.debug"
    assert f"Separate debug info file: {debug.name}" in links, links
    assert ".debug_info" in sections(debug), "the debug file has no debug info"
    archive = subprocess.run(["objdump", "-h", str(lib / "libnbdkit_async.a")], capture_output=True,
                             text=True, check=True).stdout
    assert ".debug_info" not in archive, "the installed .a keeps its debug info"

    env = dict(tool_env(), PKG_CONFIG_PATH=str(lib / "pkgconfig"))

    def var(name):
        return subprocess.run(["pkg-config", "--define-variable=prefix=/opt/moved", f"--variable={name}",
                               "nbdkit-async"], capture_output=True, text=True, env=env,
                              check=True).stdout.strip()

    assert (var("libdir"), var("includedir")) == ("/opt/moved/lib", "/opt/moved/include")
