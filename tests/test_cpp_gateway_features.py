"""build/asio-gateway: block status forwarding and TLS (both sides).

Block status: the gateway negotiates base:allocation upstream and
forwards NBD_CMD_BLOCK_STATUS; holes in upstream reads stay holes. TLS: the
gateway serves TLS downstream (the library) and speaks STARTTLS upstream
(boost::asio::ssl), with certificates the tests make with the openssl CLI.

Every process goes through tests/cpp/procs.py and is always stopped.
"""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nbd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cpp"))
import procs  # noqa: E402
from support import poll_until_any_completed  # noqa: E402
from support import make_ca, make_leaf, openssl  # noqa: E402

GATEWAY = Path(os.environ.get("ASIO_GATEWAY", procs.BUILD / "asio-gateway"))
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TOOL_TIMEOUT = 60

# (offset, length, byte) written into a sparse 1 GiB upstream.
WRITTEN = [(1 * MiB, 64 * KiB, b"a"), (500 * MiB, 32 * KiB, b"b"),
           (900 * MiB, 1 * MiB, b"c"), (GiB - 4 * KiB, 4 * KiB, b"d")]


MEMDISK = procs.BUILD / "memdisk"
HANDLES = []           # libnbd handles of the running test, closed first


@pytest.fixture
def ps():
    assert GATEWAY.exists(), f"{GATEWAY} missing: run make"
    p = procs.Procs()
    try:
        yield p
    finally:
        # A handle kept alive by a failure's traceback must not keep an
        # upstream from exiting.
        close_handles()
        failures = p.close()
        assert not failures, "\n\n".join(failures)


def run(argv, check=True, timeout=TOOL_TIMEOUT):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                       timeout=timeout, env=procs.tool_env(),
                       stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, (f"{' '.join(map(str, argv))} failed "
                                   f"({p.returncode})\n{p.stdout}{p.stderr}")
    return p


def nbd_handle():
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)     # tls-certificates=DIR in URIs
    return h


def close_handles():
    while HANDLES:
        try:
            HANDLES.pop().shutdown()
        except nbd.Error:
            pass


def connect(uri, meta=True):
    h = nbd_handle()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    HANDLES.append(h)
    h.connect_uri(uri)
    return h


def upstream(ps, *args, size="1G", name="upstream", opts=()):
    sock = ps.sock(name)
    up = ps.nbdkit(sock, *opts, "memory", size, *args, name=name)
    up.sock = sock
    up.uri = f"nbd+unix:///?socket={sock}"
    return up


def gateway(ps, up_uri, *args, name="gateway"):
    sock = ps.sock(name)
    gw = ps.server([GATEWAY, "--unix", sock, "--upstream", up_uri, *args],
                   "asio-gateway-" + name)
    gw.sock = sock
    return gw


def write_pattern(h):
    for off, n, byte in WRITTEN:
        h.pwrite(byte * n, off)


def read_chunks(h, count, offset):
    statuses = []
    buf = h.pread_structured(count, offset,
                             lambda b, o, s, e: statuses.append(s) or 0)
    return buf, statuses


def nbdinfo_map(uri):
    return run(["nbdinfo", "--map", uri]).stdout


def block_status(h, count, offset, flags=0):
    """[(length, flags), ...] of base:allocation."""
    got = []

    def cb(metacontext, off, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        assert off == offset
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(count, offset, cb, flags)
    return got


# ---------------------------------------------------------------------------
# Block status


def test_block_status_map_equals_upstream(ps):
    up = upstream(ps)
    write_pattern(connect(up.uri))
    gw = gateway(ps, up.uri)

    direct = nbdinfo_map(up.uri)
    through = nbdinfo_map(gw.uri)
    assert through == direct
    assert "hole,zero" in through and "data" in through

    h = connect(gw.uri)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    # REQ_ONE: exactly one extent, starting at the offset.
    one = block_status(h, 64 * MiB, 1 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1 and one[0][1] == 0 and one[0][0] <= 64 * KiB
    # Without it: the data then the hole after it.
    many = block_status(h, 2 * MiB, 1 * MiB)
    assert many[0] == (64 * KiB, 0)
    assert many[1][1] == nbd.STATE_HOLE | nbd.STATE_ZERO
    # The last extent of the disk.
    tail = block_status(h, 4 * KiB, GiB - 4 * KiB)
    assert tail == [(4 * KiB, 0)]

    # qemu-img sees the holes and the data written (in the upstream's
    # allocation granularity), exactly as it sees the upstream itself.
    def qemu_map(sock):
        out = run(["qemu-img", "map", "--output=json",
                   "--image-opts", f"driver=nbd,path={sock}"]).stdout
        return json.loads(out)
    extents = qemu_map(gw.sock)
    assert extents == qemu_map(up.sock)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    holes = [e for e in extents if not e["data"]]
    assert holes and all(e["zero"] for e in holes)
    for off, n, _ in WRITTEN:
        assert any(s <= off and off + n <= s + ln for s, ln in data), data
    assert sum(ln for _, ln in data) < 2 * MiB, data


def test_holes_in_reads_stay_holes(ps):
    """build/memdisk answers sparse reads with NBD_REPLY_TYPE_OFFSET_HOLE
    (nbdkit does not); the gateway passes them on as holes."""
    sock = ps.sock("memdisk")
    up = ps.server([MEMDISK, "--unix", sock, "--size", "64M"], "memdisk")
    h_up = connect(up.uri)
    assert any(s == nbd.READ_HOLE for s in read_chunks(h_up, 2 * MiB, 0)[1])
    h_up.pwrite(b"x" * (64 * KiB), 1 * MiB)
    gw = gateway(ps, up.uri)
    h = connect(gw.uri)
    assert h.get_structured_replies_negotiated()
    chunks = []

    def chunk(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status))
        return 0
    buf = h.pread_structured(2 * MiB, 0, chunk)
    assert h.pread(2 * MiB, 0) == buf
    assert buf == bytes(1 * MiB) + b"x" * (64 * KiB) + bytes(MiB - 64 * KiB)
    holes = [c for c in chunks if c[2] == nbd.READ_HOLE]
    data = [c for c in chunks if c[2] == nbd.READ_DATA]
    assert holes, chunks
    assert sum(c[1] for c in chunks) == 2 * MiB
    assert (1 * MiB, 64 * KiB) in [(o, n) for o, n, _ in data], chunks
    # DF: one data chunk, the holes as zeroes in it.
    df = []
    buf = h.pread_structured(
        2 * MiB, 0, lambda b, o, s, e: df.append((o, len(b), s)) or 0,
        nbd.CMD_FLAG_DF)
    assert df == [(0, 2 * MiB, nbd.READ_DATA)]
    assert buf[1 * MiB:1 * MiB + 64 * KiB] == b"x" * (64 * KiB)


def test_sparse_copy_transfers_only_the_data(ps, tmp_path):
    stats = tmp_path / "stats"
    up = upstream(ps, f"statsfile={stats}", opts=["--filter=stats"])
    write_pattern(connect(up.uri))
    gw = gateway(ps, up.uri)

    out = tmp_path / "copy.img"
    t0 = time.monotonic()
    run(["nbdcopy", gw.uri, out])
    elapsed = time.monotonic() - t0
    assert out.stat().st_size == GiB
    # Only the written ranges travelled; the rest is sparse in the file.
    assert out.stat().st_blocks * 512 < 64 * MiB
    with open(out, "rb") as f:
        for off, n, byte in WRITTEN:
            f.seek(off)
            assert f.read(n) == byte * n
    cmp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", out,
               f"nbd+unix:///?socket={up.sock}"], check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert elapsed < 10, f"nbdcopy of a sparse 1 GiB disk took {elapsed:.1f} s"

    # The upstream's own count (written when it exits): the copy read only
    # the data, not 1 GiB.
    close_handles()
    ps.procs[-1].stop()                        # the gateway first
    up.stop()
    text = stats.read_text()
    m = re.search(r"read: \d+ ops, [\d.]+ s, ([\d.]+) (\w+)", text)
    assert m, text
    n, unit = float(m.group(1)), m.group(2)
    scale = {"bytes": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}[unit]
    # nbdcopy + qemu-img compare each read the data once
    assert n * scale < 64 * MiB, text


def test_no_block_status_without_structured_replies_upstream(ps):
    up = upstream(ps, size="16M", opts=["--no-sr"])
    gw = gateway(ps, up.uri)
    h = connect(gw.uri)
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.pwrite(b"q" * 4096, 8192)
    assert h.pread(4096, 8192) == b"q" * 4096
    # Like the upstream itself, the gateway has no map to show.
    for uri in (gw.uri, up.uri):
        p = run(["nbdinfo", "--map", uri], check=False)
        assert p.returncode != 0 and "base:allocation" in p.stderr, p.stderr


@pytest.fixture(scope="module")
def extents_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("extents") / "extents_plugin"
    return procs.build(Path(__file__).resolve().parent / "cpp" /
                       "extents_plugin.cpp", out, procs.SANITIZE)


def test_wrapper_extents_members(ps, extents_bin):
    """nbdkit-async.hpp: extents() + reply_extents(), pread() +
    reply_read_extents(), and can_extents() deciding the offer."""
    sock = ps.sock("extents")
    p = ps.start([extents_bin, "--unix", sock], "extents")
    p.wait_for_line(lambda l: l == "ready", what="ready")
    h = connect(f"nbd+unix:///?socket={sock}")
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    hz = nbd.STATE_HOLE | nbd.STATE_ZERO
    assert block_status(h, 8 * MiB, 0) == [(MiB, 0), (3 * MiB, hz),
                                           (MiB, 0), (3 * MiB, hz)]
    assert block_status(h, 8 * MiB, MiB // 2, nbd.CMD_FLAG_REQ_ONE) == [
        (MiB // 2, 0)]
    buf, statuses = read_chunks(h, 2 * MiB, MiB // 2)
    assert buf == b"\x5a" * (MiB // 2) + bytes(3 * MiB // 2)
    assert nbd.READ_HOLE in statuses and nbd.READ_DATA in statuses

    sock2 = ps.sock("no-extents")
    p2 = ps.start([extents_bin, "--unix", sock2, "--no-extents"],
                  "no-extents")
    p2.wait_for_line(lambda l: l == "ready", what="ready")
    h2 = connect(f"nbd+unix:///?socket={sock2}")
    assert not h2.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h2.pread(MiB, 0) == b"\x5a" * MiB
    close_handles()


# ---------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """server/: the server's files; client/: CA + client cert; nocert/: CA
    only; other/: a CA that signed nothing here."""
    d = tmp_path_factory.mktemp("gw-certs")
    make_ca(d, "ca", "gateway test CA")
    make_ca(d, "ca2", "some other CA")
    make_leaf(d, "server", "ca", "localhost",
               "extendedKeyUsage=serverAuth\n"
               "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    make_leaf(d, "client", "ca", "gateway", "extendedKeyUsage=clientAuth\n")

    def layout(name, files):
        sub = d / name
        sub.mkdir()
        for src, dst in files.items():
            shutil.copy(d / src, sub / dst)
        return sub
    return SimpleNamespace(
        server=layout("server", {"ca-cert.pem": "ca-cert.pem",
                                 "server-cert.pem": "server-cert.pem",
                                 "server-key.pem": "server-key.pem"}),
        client=layout("client", {"ca-cert.pem": "ca-cert.pem",
                                 "client-cert.pem": "client-cert.pem",
                                 "client-key.pem": "client-key.pem"}),
        nocert=layout("nocert", {"ca-cert.pem": "ca-cert.pem"}),
        other=layout("other", {"ca2-cert.pem": "ca-cert.pem"}),
    )


def tls_upstream(ps, certs, *opts, size="64M", name="tls-upstream",
                 params=()):
    up = upstream(ps, *params, size=size, name=name,
                  opts=["--tls=require", f"--tls-certificates={certs.server}",
                        *opts])
    up.tls_uri = (f"nbds+unix:///?socket={up.sock}"
                  f"&tls-certificates={certs.client}")
    return up


def tls_gateway(ps, certs, up, client_dir, *args):
    gw = gateway(ps, f"nbds+unix:///?socket={up.sock}",
                 "--upstream-tls-certificates", client_dir,
                 "--tls=require", "--tls-certificates", certs.server, *args,
                 name="tls-gateway")
    assert gw.uri == f"nbds+unix:///?socket={gw.sock}", gw.uri
    gw.tls_uri = f"{gw.uri}&tls-certificates={certs.client}"
    return gw


def test_tls_both_sides(ps, certs):
    up = tls_upstream(ps, certs)
    gw = tls_gateway(ps, certs, up, certs.client)

    info = run(["nbdinfo", "--json", gw.tls_uri]).stdout
    assert '"export-size": 67108864' in info, info

    h = connect(gw.tls_uri)
    assert h.get_tls_negotiated()
    payload = os.urandom(256 * KiB)
    h.pwrite(payload, 3 * MiB)
    h.flush()
    assert h.pread(len(payload), 3 * MiB) == payload
    # Read back straight from the upstream, over TLS too.
    assert connect(up.tls_uri).pread(len(payload), 3 * MiB) == payload
    # Block status crosses both TLS hops.
    assert nbdinfo_map(gw.tls_uri) == nbdinfo_map(up.tls_uri)

    # Plaintext clients are refused downstream.
    with pytest.raises(nbd.Error):
        connect(f"nbd+unix:///?socket={gw.sock}")

    # qemu-img convert in, then compare, through the gateway.
    img = ps.dir / "src.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(5 * MiB)
        f.write(os.urandom(2 * MiB))
    obj = ["--object",
           f"tls-creds-x509,id=tls0,endpoint=client,dir={certs.client}"]
    target = (f"driver=nbd,path={gw.sock},tls-creds=tls0,"
              f"tls-hostname=localhost")
    run(["qemu-img", "convert", "-n", *obj, "-f", "raw", "--target-image-opts",
         img, target])
    run(["qemu-img", "compare", *obj, "--image-opts",
         f"driver=file,filename={img}", target])
    # ... and the upstream holds it.
    h_up = connect(up.tls_uri)
    with open(img, "rb") as f:
        f.seek(5 * MiB)
        assert h_up.pread(2 * MiB, 5 * MiB) == f.read(2 * MiB)


def test_tls_upstream_killed_mid_load_then_back(ps, certs):
    """Requests in flight over TLS fail with EIO when the upstream dies; a
    new TLS session is set up when it is back (old session's handlers are
    stale, not run on the new one)."""
    up = tls_upstream(ps, certs, "--filter=delay", "-t", "32", size="16M",
                      params=["delay-read=20ms"])
    gw = gateway(ps, f"nbds+unix:///?socket={up.sock}",
                 "--upstream-tls-certificates", certs.client, name="tls-re")
    h = connect(gw.uri)
    bufs = [nbd.Buffer(4096) for _ in range(300)]
    cookies = [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs)]
    poll_until_any_completed(h)     # some answered, most in flight
    up.kill()
    deadline = time.monotonic() + 10
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, gw.describe()
        h.poll(1000)
    failed = 0
    for c in cookies:
        try:
            h.aio_command_completed(c)
        except nbd.Error as e:
            assert e.errnum == errno.EIO, e
            failed += 1
    assert failed > 0

    up2 = tls_upstream(ps, certs, size="16M")
    assert up2.sock == up.sock
    deadline = time.monotonic() + 10
    while True:
        try:
            h.pwrite(b"r" * 4096, 0)
            break
        except nbd.Error:
            assert time.monotonic() < deadline, gw.describe()
            time.sleep(0.05)
    assert h.pread(4096, 0) == b"r" * 4096
    assert connect(up2.tls_uri).pread(4096, 0) == b"r" * 4096
    assert "connected again" in gw.stderr()


def test_tls_upstream_with_client_certificate(ps, certs):
    """mTLS upstream: the gateway presents client-cert.pem when it has one;
    downstream plaintext is fine at the same time."""
    up = tls_upstream(ps, certs, "--tls-verify-peer", name="mtls-upstream")
    gw = gateway(ps, f"nbds+unix:///?socket={up.sock}",
                 "--upstream-tls-certificates", certs.client, name="mtls-gw")
    h = connect(gw.uri)
    assert not h.get_tls_negotiated()
    h.pwrite(b"m" * 4096, 0)
    assert connect(up.tls_uri).pread(4096, 0) == b"m" * 4096


def wait_tcp(port, proc, timeout=procs.START_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        assert proc.alive(), f"exited before listening\n{proc.describe()}"
        assert time.monotonic() < deadline, f"port {port} not listening"
        time.sleep(0.01)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_upstream_over_tcp(ps, certs, host):
    """nbds://HOST:PORT/: the certificate is checked against HOST (a DNS
    name, or an IP address in the SAN)."""
    port = procs.free_tcp_port()
    up = ps.nbdkit(None, "-p", port, "-i", "127.0.0.1", "--tls=require",
                   f"--tls-certificates={certs.server}", "memory", "16M",
                   name="tcp-upstream")
    wait_tcp(port, up)
    gw = gateway(ps, f"nbds://{host}:{port}/", "--upstream-tls-certificates",
                 certs.nocert, "--tls=on", "--tls-certificates", certs.server,
                 name="tcp-gw")
    assert gw.uri.startswith("nbd+unix://"), gw.uri   # TLS optional
    plain = connect(gw.uri)
    assert not plain.get_tls_negotiated()
    plain.pwrite(b"t" * 8192, 4096)
    h = nbd_handle()
    HANDLES.append(h)
    h.set_tls(nbd.TLS_REQUIRE)
    h.connect_uri(f"{gw.uri}&tls-certificates={certs.client}")
    assert h.get_tls_negotiated()
    assert h.pread(8192, 4096) == b"t" * 8192


def test_tls_upstream_name_must_match(ps, certs):
    """A name that reaches the upstream but is not in its certificate."""
    name = socket.gethostname()
    try:
        if socket.gethostbyname(name) != "127.0.0.1" or name == "localhost":
            pytest.skip(f"{name} does not resolve to 127.0.0.1 only")
    except OSError:
        pytest.skip(f"{name} does not resolve")
    port = procs.free_tcp_port()
    up = ps.nbdkit(None, "-p", port, "-i", "127.0.0.1", "--tls=require",
                   f"--tls-certificates={certs.server}", "memory", "1M",
                   name="tcp-upstream")
    wait_tcp(port, up)
    gw = ps.start([GATEWAY, "--unix", ps.sock("gw-name"), "--upstream",
                   f"nbds://{name}:{port}/", "--upstream-tls-certificates",
                   certs.nocert], "gw-name")
    try:
        gw.returncode = gw.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway still running\n{gw.describe()}")
    assert gw.returncode != 0
    assert "certificate verify failed" in gw.stderr(), gw.stderr()


@pytest.mark.parametrize("case", ["wrong-ca", "no-client-cert", "plaintext"])
def test_tls_upstream_refusals(ps, certs, case):
    """The gateway does not start when it cannot set up a verified TLS
    session upstream (and says why)."""
    opts = ["--tls-verify-peer"] if case == "no-client-cert" else []
    up = tls_upstream(ps, certs, *opts, size="8M", name="up-" + case)
    if case == "plaintext":
        args = ["--upstream", f"nbd+unix:///?socket={up.sock}"]
    else:
        d = certs.other if case == "wrong-ca" else certs.nocert
        args = ["--upstream", f"nbds+unix:///?socket={up.sock}",
                "--upstream-tls-certificates", d]
    gw = ps.start([GATEWAY, "--unix", ps.sock("gw-" + case), *args],
                  "gw-" + case)
    try:
        rc = gw.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway still running\n{gw.describe()}")
    gw.returncode = rc
    assert rc != 0, gw.describe()
    err = gw.stderr()
    assert "cannot use the upstream" in err, err
    if case == "wrong-ca":
        assert "certificate verify failed" in err, err
