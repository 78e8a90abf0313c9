"""The C++ wrapper (include/nbdkit-async.hpp), seen by a real NBD client.

tests/cpp/wrapper_plugin.cpp is compiled here against the static library;
what it does with a request depends on the MiB the request starts in (see
the comment at its top). Each test checks what libnbd sees, and what the
server logs, for one rule of the wrapper: a dropped op answers EIO, an
exception becomes EIO and never reaches the library, an op handed on
before an exception is answered once, errors map to errno, cancel works.
"""

import errno
import re
import sys
import time
from pathlib import Path

import nbd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cpp"))
import procs  # noqa: E402

MiB = 1 << 20
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module", params=["plain", "asan"])
def wrapper_bin(request, tmp_path_factory):
    """Built twice: plain, and with ASan+UBSan (leaks, use-after-free and
    undefined behaviour make the server's exit code non-zero)."""
    out = tmp_path_factory.mktemp("wrapper") / f"wrapper_plugin-{request.param}"
    extra = procs.SANITIZE if request.param == "asan" else []
    return procs.build(HERE / "cpp" / "wrapper_plugin.cpp", out, extra)


@pytest.fixture
def ps():
    p = procs.Procs()
    try:
        yield p
    finally:
        failures = p.close()
        assert not failures, "\n\n".join(failures)


def serve(ps, wrapper_bin, *args):
    sock = ps.sock("wrapper")
    p = ps.start([wrapper_bin, "--unix", sock, *args], "wrapper")
    p.wait_for_line(lambda l: l == "ready", what="ready")
    p.sock = sock
    return p


def connect(srv):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={srv.sock}")
    return h


def expect_errno(want, fn, *args):
    with pytest.raises(nbd.Error) as e:
        fn(*args)
    assert e.value.errnum == want, (
        f"expected {errno.errorcode[want]}, got {e.value}")


def wait_stderr(srv, text, timeout=5):
    deadline = time.monotonic() + timeout
    while text not in srv.stderr():
        assert time.monotonic() < deadline, (
            f"{text!r} not logged\n{srv.describe()}")
        time.sleep(0.01)


def test_header_compiles_alone_with_strict_warnings(tmp_path):
    """As the first include of a C++17 file, with -Wall -Wextra -Werror
    -pedantic."""
    src = tmp_path / "alone.cpp"
    src.write_text("#include <nbdkit-async.hpp>\n")
    p = procs.subprocess.run(
        [procs.CXX, *procs.CXXFLAGS, "-fsyntax-only", str(src)],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_data_round_trip_with_replies_from_a_worker_thread(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    data = bytes(range(256)) * 4096               # 1 MiB
    h.pwrite(data, 3 * MiB + 17)
    assert h.pread(len(data), 3 * MiB + 17) == data
    # Many at once: every one answered from the worker, none lost.
    bufs = [nbd.Buffer(4096) for _ in range(500)]
    cookies = [h.aio_pread(b, 3 * MiB + 17 + i * 512)
               for i, b in enumerate(bufs)]
    while h.aio_in_flight() > 0:
        h.poll(1000)
    for i, (c, b) in enumerate(zip(cookies, bufs)):
        assert h.aio_command_completed(c)
        assert b.to_bytearray() == data[i * 512:i * 512 + 4096]
    h.flush()
    h.shutdown()
    srv.stop()
    assert "nbdkit-async++" not in srv.stderr(), srv.describe()


def test_op_dropped_without_reply_answers_eio(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    expect_errno(errno.EIO, h.pread, 4096, 8 * MiB)
    wait_stderr(srv, "op destroyed without a reply; answered EIO")
    assert h.pread(512, 0) == bytes(512)          # the connection lives on


def test_exception_in_handler_answers_eio(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    expect_errno(errno.EIO, h.pread, 4096, 9 * MiB)
    cause = "exception in pread: pread failed before hand-off"
    effect = "op abandoned by an exception; answered EIO"
    wait_stderr(srv, effect)
    err = srv.stderr()
    assert cause in err and err.index(cause) < err.index(effect), (
        "the cause must be logged before its effect\n" + srv.describe())
    # Through the library's log, with its prefix, like the library's lines.
    assert re.search(r"nbdkit-async: error: (conn \d+: )?nbdkit-async\+\+: "
                     + re.escape(cause), err), srv.describe()
    assert h.pread(512, 0) == bytes(512)


def test_exception_after_hand_off_leaves_one_reply(ps, wrapper_bin):
    """The op moved to the worker before the throw: the worker's answer
    is the only one (no EIO from the trampoline, no double reply)."""
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    data = b"\x5a" * 8192
    h.pwrite(data, 10 * MiB)
    assert h.pread(8192, 10 * MiB) == data
    wait_stderr(srv, "exception in pread: pread failed after hand-off")
    h.shutdown()
    srv.stop()
    err = srv.stderr()
    assert "answering EIO" not in err, srv.describe()
    assert "nbdkit-async: warn" not in err, srv.describe()


def test_error_codes_map_to_errno(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    expect_errno(errno.EPERM, h.pread, 512, 11 * MiB)           # std::errc
    expect_errno(errno.ENOSPC, h.pwrite, b"x" * 512, 11 * MiB)  # error_code
    expect_errno(errno.EIO, h.pread, 512, 13 * MiB)   # not an errno category


def test_second_reply_is_refused_by_the_wrapper(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    h.pwrite(b"\x11" * 4096, 14 * MiB)
    assert h.pread(4096, 14 * MiB) == b"\x11" * 4096
    wait_stderr(srv, "reply: the op was already answered or moved from")
    assert "TEST-ERROR" not in srv.stderr()


def test_lent_read_owned_by_a_shared_ptr(ps, wrapper_bin):
    """reply_read_nocopy with a shared_ptr owner: the data arrives, and
    the library lets go of each owner once its reply is out."""
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    data = bytes(range(251)) * 500
    h.pwrite(data, 15 * MiB)
    for _ in range(3):
        assert h.pread(len(data), 15 * MiB) == data
    deadline = time.monotonic() + 5
    while srv.lines().count("lent released") < 3:
        assert time.monotonic() < deadline, srv.describe()
        time.sleep(0.01)
    h.shutdown()
    srv.stop()
    assert "nbdkit-async" not in srv.stderr(), srv.describe()


def test_cancel_when_the_client_disconnects(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    h.aio_pread(nbd.Buffer(4096), 12 * MiB)
    srv.wait_for_line(lambda l: l == "held", what="held op")
    del h                              # nbd_close: hard disconnect
    srv.wait_for_line(lambda l: l == "cancel", what="cancel")
    srv.wait_for_line(lambda l: l == "close", what="close")
    srv.stop()                         # exit 0: nothing left unanswered


def test_cancel_on_shutdown_answers_held_ops(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    cookie = h.aio_pread(nbd.Buffer(4096), 12 * MiB)
    srv.wait_for_line(lambda l: l == "held", what="held op")
    srv.stop()                         # drains only because cancel replies
    assert "cancel" in srv.lines()
    deadline = time.monotonic() + 5
    while h.aio_in_flight() > 0 and time.monotonic() < deadline:
        try:
            h.poll(100)
        except nbd.Error:
            break
    with pytest.raises(nbd.Error):
        h.aio_command_completed(cookie)


def test_members_left_out_are_not_offered(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin, "--minimal")
    h = connect(srv)
    assert h.get_size() == 16 * MiB
    assert h.is_read_only()
    assert not h.can_flush() and not h.can_trim() and not h.can_zero()
    assert not h.can_cache() and not h.can_multi_conn() and not h.can_fua()
    assert h.pread(100, 5) == b"\xab" * 100


def test_members_defined_are_offered(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin)
    h = connect(srv)
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_multi_conn()
    assert not h.can_trim() and not h.can_zero() and not h.can_cache()


def test_exception_in_open_refuses_the_client(ps, wrapper_bin):
    srv = serve(ps, wrapper_bin, "--refuse")
    with pytest.raises(nbd.Error):
        connect(srv)
    wait_stderr(srv, "exception in open: refused")
