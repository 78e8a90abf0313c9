"""The API's promises under misuse, driven through tests/c/contract_harness.c
(built with AddressSanitizer): a second or re-entrant nbdkit_main_loop,
server calls made from inside callbacks on both loop styles and from the
log callback, the errno and return values of failed calls, socket
activation taken once, what callbacks' return values mean, why a client
was refused an export, and the maximum request size.

Most of these were hangs: the harness arms alarm(20), so a deadlock ends
it with SIGALRM rather than stalling the suite, and each case prints
"contract held" only when every check in it passed.
"""

import errno
import os
import re
import signal
import subprocess

import nbd
import pytest

from support import C_DIR, HarnessProcess, compile_c_harness, tool_env

MiB = 1 << 20
MARKS = ("ERROR: AddressSanitizer", "LeakSanitizer", "CONTRACT-ERROR", "panicked",
         "internal error")


@pytest.fixture(scope="module")
def harness_bin(tmp_path_factory):
    return compile_c_harness(C_DIR / "contract_harness.c",
                             tmp_path_factory.mktemp("contract") / "contract_harness")


class Harness(HarnessProcess):
    name = "contract_harness"

    def __init__(self, binary, case, unix=True):
        super().__init__(binary, before=("--case", case), prefix="nbdka-k-", unix=unix)

    def finish(self, timeout=25):
        rc = self.wait_exit(timeout)
        assert rc != -signal.SIGALRM, "a call hung (SIGALRM)\n" + self.report()
        self.assert_exit_ok(MARKS)
        assert "contract held" in self.out(), self.report()
        return self.err()


@pytest.fixture
def harness(harness_bin):
    running = []

    def _start(case, unix=True, serves=True):
        h = Harness(harness_bin, case, unix)
        running.append(h)
        if serves:
            h.wait_ready()
        return h

    yield _start
    for h in running:
        h.cleanup()


def connect(srv, export=""):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(srv.sock)
    return h


@pytest.mark.parametrize("case", ["errors", "log-reentry"])
def test_self_checking_cases(harness, case):
    """errors: nbdkit_server_new sets errno (EINVAL, ENOTSUP), the NULL
    cases return -EINVAL and not a value that means something else,
    nbdkit_server_stats zeroes fields it does not know, the runtime
    version matches the header, nbdkit_log checks its arguments.
    log-reentry: a log callback calling back into the library gets -EBUSY
    instead of a deadlock."""
    harness(case, unix=False, serves=False).finish()


def test_main_loop_twice_is_ebusy(harness):
    """nbdkit_main_loop from a second thread while it runs, from a
    callback, and after it returned: -EBUSY at once, logged."""
    srv = harness("main-loop-twice")
    h = nbd.NBD()
    try:
        h.connect_unix(srv.sock)    # its open callback ends with a shutdown
    except nbd.Error:
        pass
    err = srv.finish()
    del h
    assert err.count("refused with EBUSY") == 3, srv.report()


@pytest.mark.parametrize("loop", ["main", "embedded"])
def test_calls_from_a_callback_answer_at_once(harness, loop):
    """The `open` callback calls every server function back, under
    nbdkit_main_loop and under nbdkit_server_process: set-up and loop calls
    get -EBUSY, stats and shutdown work, nbdkit_server_free is refused;
    nothing blocks. The client is served, then the server stops."""
    srv = harness("reentry-" + loop)
    h = connect(srv)
    assert h.get_size() == 16 * MiB
    h.shutdown()
    srv.send(signal.SIGTERM)
    err = srv.finish()
    assert "open checked" in srv.out(), srv.report()
    assert "nbdkit_server_free: the server's loop is running; not freed" in err


def test_socket_activation_is_taken_once(harness):
    """The first nbdkit_server_listen_systemd takes the inherited socket,
    a second (another server) gets none, and LISTEN_* are cleared as
    sd_listen_fds(1) does: one descriptor never gets two owners."""
    # The harness binds the "inherited" socket at the --unix path itself.
    harness("systemd-once", serves=False).finish()


def test_callback_return_values(harness):
    """A callback returning -ENOSPC fails the op with ENOSPC (not EIO); one
    returning 1 (a bug) is logged as an error and its client answered EIO,
    while the op's buffer is kept until the plugin's late reply."""
    srv = harness("returns")
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_unix(srv.sock)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"w" * 4096, 0)
    assert e.value.errnum == errno.ENOSPC, e.value
    with pytest.raises(nbd.Error) as e:
        h.trim(4096, 0)
    assert e.value.errnum == errno.EIO, e.value
    srv.wait_for(lambda: "late trim reply rc 0" in srv.out(), 5, "the late reply")
    h.pwrite(b"v" * 4096, 2 * MiB)                 # the connection goes on
    assert h.pread(4096, 2 * MiB) == b"v" * 4096
    h.shutdown()
    srv.send(signal.SIGTERM)
    err = srv.finish()
    assert re.search(r"error: conn \d+: the callback returned 1, which is neither 0 nor negative", err), err


@pytest.mark.parametrize("export,errname,qemu_says", [
    ("eio", "EIO", "Server lacks support"),       # NBD_REP_ERR_PLATFORM
    ("enomem", "ENOMEM", "Server lacks support"),
    ("enospc", "ENOSPC", "Server lacks support"),
    ("errno0", "EIO", "Server lacks support"),
    ("eperm", "EPERM", "Denied by server"),       # NBD_REP_ERR_POLICY
    ("enoent", "ENOENT", "Requested export not available"),   # UNKNOWN
])
def test_open_failure_tells_the_client_why(harness, export, errname, qemu_says):
    """`open` failing with an errno: the client gets the fitting option
    error, so a backend outage no longer reads "no such export", with the
    reason in the message qemu prints; the refusal is logged at warning
    level by errno name."""
    srv = harness("returns")
    h = nbd.NBD()
    h.set_export_name(export)
    with pytest.raises(nbd.Error) as e:
        h.connect_unix(srv.sock)
    assert ("no export named" in e.value.string) == (errname == "ENOENT"), e.value
    if errname != "ENOENT":
        assert re.search(r"warn: conn \d+: refused export %r: open failed: %s \("
                         % (export, errname), srv.err().replace('"', "'")), srv.report()
    r = subprocess.run(["qemu-img", "info", "nbd+unix:///%s?socket=%s" % (export, srv.sock)],
                       capture_output=True, text=True, timeout=30, env=tool_env())
    assert r.returncode != 0
    assert qemu_says in r.stderr, r.stderr
    assert 'server reported: export "%s": open failed: %s' % (export, errname) in r.stderr, r.stderr
    srv.send(signal.SIGTERM)
    srv.finish()


def test_max_request_size_is_advertised_and_enforced(harness):
    """nbdkit_server_set_max_request_size (1 MiB): the block-size maximum
    clients see; a larger read is refused with EINVAL; the connection goes
    on."""
    srv = harness("max-request")
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_unix(srv.sock)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MiB
    assert h.pread(MiB, 0) == bytes(MiB)
    with pytest.raises(nbd.Error) as e:
        h.pread(2 * MiB, 0)
    assert e.value.errnum == errno.EINVAL
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    srv.send(signal.SIGTERM)
    srv.finish()
