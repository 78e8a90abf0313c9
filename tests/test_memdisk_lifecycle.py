"""Start-up and shutdown of build/memdisk: the URI line, signals, the Unix
socket file, bad command lines."""

import os
import re
import select
import signal
import socket
import subprocess
import time

import pytest

from conftest import require_memdisk


def start_raw(argv, tmp_path, name):
    """Popen memdisk with stdout on a pipe, to see the URI line at once."""
    err = open(tmp_path / f"{name}.stderr", "wb")
    p = subprocess.Popen([str(require_memdisk())] + [str(a) for a in argv],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=err)
    err.close()
    return p


def read_first_line(p, timeout=10.0):
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
            p.kill()
            p.wait(10)
            raise AssertionError(f"no URI line within {timeout} s: {buf!r}")
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"stdout closed before the URI: {buf!r}")
        buf += chunk
    return buf.split(b"\n")[0].decode()


def finish(p, timeout=10.0):
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
        raise AssertionError(f"memdisk did not exit within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_right_after_uri_line(tmp_path, sig):
    """Once the URI is printed the server is ready, and that includes
    shutting down cleanly on SIGTERM/SIGINT: no window where the signal
    still kills it."""
    for i in range(20):
        sock = tmp_path / f"s{i}.sock"
        p = start_raw(["--unix", sock, "--size", "1M"], tmp_path, f"s{i}")
        uri = read_first_line(p)
        assert uri == f"nbd+unix:///?socket={sock}"
        p.send_signal(sig)
        rc = finish(p)
        err = (tmp_path / f"s{i}.stderr").read_text(errors="replace")
        assert rc == 0, (
            f"round {i}: {signal.Signals(sig).name} sent right after the "
            f"URI line: exit code {rc}, expected 0 (stderr: {err!r})")
        assert not sock.exists(), "socket file left behind"


def test_sigint_clean_exit(memdisk):
    srv = memdisk(size="1M")
    h = srv.connect()
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()
    srv.stop(signal.SIGINT)
    assert not srv.sock.exists(), "socket file left behind after shutdown"


def test_stale_socket_file_replaced(memdisk, tmp_path):
    """A Unix socket file nobody listens on any more is replaced."""
    path = tmp_path / "srv1" / "nbd.sock"
    path.parent.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    assert path.exists()
    srv = memdisk(size="1M")
    assert srv.sock == path, "fixture socket path changed; fix this test"
    h = srv.connect()
    assert h.get_size() == 1 << 20
    h.shutdown()


def test_live_servers_socket_is_not_taken(memdisk, tmp_path):
    """A second server given the socket path of a live one refuses to
    start (EADDRINUSE, said in its log) instead of unlinking the socket
    under it; the first keeps serving at that path."""
    srv = memdisk(size="1M")
    p = start_raw(["--unix", srv.sock, "--size", "2M"], tmp_path, "second")
    rc = finish(p)
    assert rc != 0, "a second server took a live server's socket"
    err = (tmp_path / "second.stderr").read_text()
    assert "a server is listening there" in err, err
    h = srv.connect()
    assert h.get_size() == 1 << 20, "the socket now leads to another server"
    h.shutdown()


def test_regular_file_at_socket_path_is_an_error(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_bytes(b"precious")
    p = start_raw(["--unix", path, "--size", "1M"], tmp_path, "reg")
    rc = finish(p)
    assert rc != 0, "memdisk started over a regular file"
    assert path.read_bytes() == b"precious", "regular file was clobbered"


@pytest.mark.parametrize("argv", [
    ["--size", "12X"],
    ["--workers", "0"],
    ["--latency-ms", "-1"],
    ["--no-such-option"],
    ["extra-argument"],
], ids=["bad-size", "zero-workers", "negative-latency", "unknown-option",
        "extra-argument"])
def test_bad_command_line(tmp_path, argv):
    p = start_raw(["--unix", tmp_path / "x.sock", "--size", "1M"] + argv,
                  tmp_path, "bad")
    rc = finish(p)
    assert rc != 0
    assert p.stdout.read() == b"", "printed a URI despite a bad command line"
    err = (tmp_path / "bad.stderr").read_text(errors="replace")
    assert err.strip(), "no error message on stderr"


def test_logs_name_connections_errnos_and_numeric_levels(memdisk):
    """NBDKIT_ASYNC_LOG=4 means debug (NBDKIT_LOG_DEBUG's number); every
    line about a client carries its connection id; a request timeout is
    logged with the command, offset and errno by name, never Rust's
    "os error" text. The timed-out read does not hold up the client's
    NBD_CMD_DISC: nbd_shutdown returns before memdisk's latency passes."""
    srv = memdisk("--latency-ms", "3000", "--request-timeout-ms", "200", size="1M", log="4")
    h = srv.connect(strict=False)
    with pytest.raises(Exception) as e:
        h.pread(4096, 8192)
    assert "Input/output error" in str(e.value), e.value
    t0 = time.monotonic()
    h.shutdown()
    assert time.monotonic() - t0 < 2, "nbd_shutdown waited for the timed-out read"
    srv.stop()
    err = srv.stderr()
    assert re.search(r"debug: conn 1: new connection from", err), err
    assert re.search(r"debug: conn 1: .*NBD_OPT_GO", err), err
    assert re.search(r"warn: conn 1: NBD_CMD_READ at offset 8192: no reply from the plugin in time "
                     r"\(200 ms request timeout\); answering ETIMEDOUT \(Connection timed out\)", err), err
    assert "os error" not in err, err
