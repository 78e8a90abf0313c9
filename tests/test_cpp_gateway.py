"""build/asio-gateway between libnbd/qemu-img clients and an upstream nbdkit.

Each test starts its own upstream nbdkit (memory plugin, plus filters for
latency, errors, logging) on a private socket and a gateway in front of it,
and stops both whatever happens.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cpp"))
import procs  # noqa: E402
from support import poll_until_any_completed, wait_until_consumed  # noqa: E402

# ASIO_GATEWAY=path runs these tests against another build (say, with a
# sanitizer).
GATEWAY = Path(os.environ.get("ASIO_GATEWAY", procs.BUILD / "asio-gateway"))
MiB = 1 << 20
BLOCK = 4096


@pytest.fixture
def ps():
    assert GATEWAY.exists(), f"{GATEWAY} missing: run make"
    p = procs.Procs()
    try:
        yield p
    finally:
        failures = p.close()
        assert not failures, "\n\n".join(failures)


def upstream(ps, *params, opts=(), size="64M", name="upstream"):
    """nbdkit [opts] memory size [params]"""
    sock = ps.sock(name)
    up = ps.nbdkit(sock, *opts, "memory", size, *params, name=name)
    up.sock = sock
    up.uri = f"nbd+unix:///?socket={sock}"
    return up


def gateway(ps, up_uri, *args):
    sock = ps.sock("gateway")
    gw = ps.server([GATEWAY, "--unix", sock, "--upstream", up_uri, *args],
                   "asio-gateway")
    assert gw.uri == f"nbd+unix:///?socket={sock}", gw.uri
    return gw


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def block_pattern(i):
    return i.to_bytes(8, "little") * (BLOCK // 8)


def drain(h, deadline_s, what=""):
    deadline = time.monotonic() + deadline_s
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, (
            f"{h.aio_in_flight()} requests still in flight after "
            f"{deadline_s} s {what}")
        h.poll(1000)


def capabilities(h):
    return dict(size=h.get_size(), ro=h.is_read_only(), flush=h.can_flush(),
                fua=h.can_fua(), trim=h.can_trim(), zero=h.can_zero(),
                cache=h.can_cache())


# ---------------------------------------------------------------------------


def test_advertises_what_the_upstream_offers(ps):
    up = upstream(ps)
    gw = gateway(ps, up.uri)
    assert capabilities(connect(gw.uri)) == capabilities(connect(up.uri))
    assert connect(gw.uri).can_multi_conn()

    ro = upstream(ps, opts=["-r"], size="8M", name="readonly")
    gw_ro = ps.server([GATEWAY, "--unix", ps.sock("gw-ro"), "--upstream",
                       ro.uri], "asio-gateway-ro")
    h = connect(gw_ro.uri)
    assert h.get_size() == 8 * MiB and h.is_read_only()
    assert capabilities(h) == capabilities(connect(ro.uri))


def test_1000_reads_in_flight_near_the_latency_bound(ps):
    """20 ms per upstream read; sequentially 1000 reads would take 20 s."""
    up = upstream(ps, "delay-read=20ms", "delay-write=20ms",
                  opts=["--filter=delay", "-t", "64"], size="1G")
    gw = gateway(ps, up.uri, "--threads", "2")
    h = connect(gw.uri)
    n = 1000
    h.pwrite(b"".join(block_pattern(i) for i in range(n)), 0)

    bufs = [nbd.Buffer(BLOCK) for _ in range(n)]
    threads = []
    t0 = time.monotonic()
    cookies = [h.aio_pread(bufs[i], i * BLOCK) for i in range(n)]
    deadline = t0 + 20
    while h.aio_in_flight() > 0:
        threads.append(gw.threads())
        assert time.monotonic() < deadline, gw.describe()
        h.poll(1000)
    elapsed = time.monotonic() - t0
    for i in range(n):
        assert h.aio_command_completed(cookies[i])
        assert bufs[i].to_bytearray() == block_pattern(i), f"block {i}"
    print(f"asio-gateway: 1000 reads (20 ms upstream latency) in "
          f"{elapsed:.3f} s, gateway threads {max(threads)}")
    assert elapsed < 1.5, f"1000 reads took {elapsed:.2f} s\n{gw.describe()}"
    assert max(threads) <= 4, threads


def test_data_reads_back_through_gateway_and_upstream(ps):
    up = upstream(ps, size="64M")
    gw = gateway(ps, up.uri)
    h = connect(gw.uri)
    direct = connect(up.uri)
    writes = [(0, os.urandom(512)), (12345, os.urandom(70000)),
              (8 * MiB - 3, os.urandom(4 * MiB + 5)),
              (63 * MiB, os.urandom(MiB))]
    for off, data in writes:
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if off == 0 else 0)
    h.flush()
    for off, data in writes:
        assert h.pread(len(data), off) == data, f"gateway, offset {off}"
        assert direct.pread(len(data), off) == data, f"upstream, offset {off}"
    # Zero (with and without NO_HOLE) and trim go through too.
    h.zero(70000, 12345)
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    assert direct.pread(70000, 12345) == bytes(70000)
    assert h.pread(4096, 0) == bytes(4096)
    h.trim(MiB, 63 * MiB)
    h.cache(MiB, 0)
    # Several clients at once, each in its own region.
    clients = [connect(gw.uri) for _ in range(4)]
    expect = {}
    for i, c in enumerate(clients):
        for j in range(50):
            off = 20 * MiB + (i * 50 + j) * BLOCK
            expect[off] = os.urandom(BLOCK)
            c.aio_pwrite(expect[off], off)
    for c in clients:
        drain(c, 10)
    for off, data in expect.items():
        assert direct.pread(BLOCK, off) == data


def test_upstream_errors_reach_the_client(ps):
    up = upstream(ps, "error-pwrite=ENOSPC", "error-pwrite-rate=100%",
                  "error-zero=EPERM", "error-zero-rate=100%",
                  "error-trim=EINVAL", "error-trim-rate=100%",
                  "error-pread=EIO", "error-pread-file=" + str(ps.dir / "E"),
                  "error-pread-rate=100%", opts=["--filter=error"], size="8M")
    gw = gateway(ps, up.uri)
    h = connect(gw.uri)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, 0)
    assert e.value.errnum == errno.ENOSPC
    with pytest.raises(nbd.Error) as e:
        h.zero(512, 0)
    assert e.value.errnum == errno.EPERM
    with pytest.raises(nbd.Error) as e:
        h.trim(512, 0)
    assert e.value.errnum == errno.EINVAL
    assert h.pread(512, 0) == bytes(512)
    (ps.dir / "E").touch()              # now reads fail too
    with pytest.raises(nbd.Error) as e:
        h.pread(512, 0)
    assert e.value.errnum == errno.EIO
    (ps.dir / "E").unlink()
    assert h.pread(512, 0) == bytes(512)


def test_qemu_img_convert_in_and_out(ps, tmp_path):
    up = upstream(ps, size="64M")
    gw = gateway(ps, up.uri)
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    with open(src, "wb") as f:
        f.write(os.urandom(64 * MiB))

    def run(*argv):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                           env=procs.tool_env())
        assert p.returncode == 0, f"{argv}: {p.stderr}\n{gw.describe()}"

    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
        str(src), gw.uri)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", gw.uri, str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), up.uri)


def test_upstream_killed_mid_load_then_back(ps):
    up = upstream(ps, "delay-read=20ms", opts=["--filter=delay", "-t", "64"])
    gw = gateway(ps, up.uri)
    h = connect(gw.uri)

    bufs = [nbd.Buffer(BLOCK) for _ in range(1000)]
    cookies = [h.aio_pread(b, i * BLOCK) for i, b in enumerate(bufs)]
    poll_until_any_completed(h)     # some answered, most in flight
    up.kill()
    drain(h, 10, "after the upstream died")
    failed = 0
    for c in cookies:
        try:
            h.aio_command_completed(c)
        except nbd.Error as e:
            assert e.errnum == errno.EIO, e
            failed += 1
    assert failed > 0, "no request failed although the upstream died"

    # While it is down: quick errors, never a hang.
    t0 = time.monotonic()
    with pytest.raises(nbd.Error):
        h.pread(BLOCK, 0)
    assert time.monotonic() - t0 < 2
    assert gw.alive()

    # A new upstream on the same socket: the same client is served again.
    up2 = upstream(ps, size="64M")
    assert up2.sock == up.sock
    deadline = time.monotonic() + 10
    while True:
        try:
            h.pwrite(b"b" * BLOCK, 0)
            break
        except nbd.Error:
            assert time.monotonic() < deadline, gw.describe()
            time.sleep(0.05)
    assert h.pread(BLOCK, 0) == b"b" * BLOCK
    assert connect(up2.uri).pread(BLOCK, 0) == b"b" * BLOCK
    assert "connected again" in gw.stderr()


def test_qemu_nbd_upstream_with_holes(ps, tmp_path):
    """qemu-nbd answers reads of sparse regions with hole chunks."""
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB + 100)
        f.write(b"data" * 1000)
    sock = ps.sock("qemu")
    Path(sock).unlink(missing_ok=True)
    q = ps.start(["qemu-nbd", "-k", sock, "-f", "raw", "-t", "-e", "8",
                  img], "qemu-nbd", ours=False)
    procs.wait_connectable(sock, q)
    gw = gateway(ps, f"nbd+unix:///?socket={sock}")
    h = connect(gw.uri)
    assert h.get_size() == 16 * MiB
    assert h.pread(4 * MiB, 0) == img.read_bytes()[:4 * MiB]
    h.pwrite(b"w" * 70000, 9 * MiB + 1)
    h.flush()
    assert img.read_bytes()[9 * MiB + 1:9 * MiB + 70001] == b"w" * 70000


def test_tcp_upstream_and_downstream_with_export_name(ps):
    port = procs.free_tcp_port()
    up = ps.nbdkit(None, "-i", "127.0.0.1", "-p", str(port), "memory", "8M")
    deadline = time.monotonic() + 10
    while True:                          # nbdkit is up once it accepts
        try:
            connect(f"nbd://127.0.0.1:{port}/").shutdown()
            break
        except nbd.Error:
            assert up.alive() and time.monotonic() < deadline, up.describe()
            time.sleep(0.02)
    gw = ps.server([GATEWAY, "--tcp", "127.0.0.1:0", "--upstream",
                    f"nbd://127.0.0.1:{port}/some%20export"], "asio-gateway")
    assert re.fullmatch(r"nbd://127\.0\.0\.1:\d+/", gw.uri), gw.uri
    h = connect(gw.uri)
    assert h.get_size() == 8 * MiB
    h.pwrite(b"tcp!" * 256, 4096)
    direct = connect(f"nbd://127.0.0.1:{port}/")
    assert direct.pread(1024, 4096) == b"tcp!" * 256


def test_upstream_connections_and_multi_conn(ps):
    """N upstream connections when the upstream allows multi-conn, one
    (with a warning) when it does not."""
    log = ps.dir / "up.log"
    up = upstream(ps, f"logfile={log}", opts=["--filter=log"])
    gw = gateway(ps, up.uri, "--upstream-connections", "3")
    h = connect(gw.uri)
    for i in range(30):
        h.pwrite(block_pattern(i), i * BLOCK)
    for i in range(30):
        assert h.pread(BLOCK, i * BLOCK) == block_pattern(i)
    assert log.read_text().count(" Connect export=") == 3
    gw.stop()

    log1 = ps.dir / "single.log"
    single = upstream(ps, f"logfile={log1}", "multi-conn-mode=disable",
                      opts=["--filter=log", "--filter=multi-conn"],
                      name="single")
    gw1 = ps.server([GATEWAY, "--unix", ps.sock("gw1"), "--upstream",
                     single.uri, "--upstream-connections", "3"], "gw1")
    h1 = connect(gw1.uri)
    assert h1.can_multi_conn()          # one shared upstream connection
    h1.pwrite(b"1" * 512, 0)
    assert log1.read_text().count(" Connect export=") == 1
    assert "does not allow multi-conn" in gw1.stderr()


def test_shutdown_answers_requests_in_flight_first(ps):
    up = upstream(ps, "delay-read=300ms", opts=["--filter=delay", "-t", "16"])
    gw = gateway(ps, up.uri)
    h = connect(gw.uri)
    h.pwrite(b"s" * BLOCK, 0)
    bufs = [nbd.Buffer(BLOCK) for _ in range(16)]
    cookies = [h.aio_pread(b, 0) for b in bufs]
    wait_until_consumed(h)          # the gateway has read them all
    gw.proc.send_signal(signal.SIGTERM)
    drain(h, 5)
    for c, b in zip(cookies, bufs):
        assert h.aio_command_completed(c)
        assert b.to_bytearray() == b"s" * BLOCK
    gw.stop()


def test_unreachable_upstream_or_bad_uri_fails_at_start(ps):
    for uri, message in [
            (f"nbd+unix:///?socket={ps.dir}/nothing.sock",
             "cannot use the upstream"),
            ("http://example.com/", "unsupported upstream URI"),
            ("nbd+unix:///export", "socket=PATH")]:
        p = ps.start([GATEWAY, "--unix", ps.sock("never"), "--upstream", uri],
                     "asio-gateway", ours=False)
        rc = p.proc.wait(timeout=15)
        assert rc == 1, p.describe()
        assert message in p.stderr(), p.describe()
        assert p.lines() == []
