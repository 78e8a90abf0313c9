"""TLS (issue 8): NBD_OPT_STARTTLS with X.509 certificates and mutual TLS.

Everything runs against real servers and real clients:

  * build/memdisk with --tls=off|on|require --tls-certificates DIR
    [--tls-verify-peer], through a `memdisk` fixture defined here with the
    contract of conftest's (which rejects the nbds+unix:// URI memdisk
    prints in require mode);
  * tests/c/tls_harness.c (built here with AddressSanitizer): a plugin
    whose `open` reads nbdkit_tls_peer_certificate, prints the SHA-256
    fingerprint it saw and refuses fingerprints not on an allow list;
  * clients: nbdinfo, nbdsh, nbdcopy, libnbd's Python binding, qemu-img,
    qemu-io, and a raw NBD client (nbdwire.Client) whose socket is
    wrapped by Python's ssl module after STARTTLS, for what the tools
    cannot show (exact option replies, simple versus structured replies,
    stalled or garbage handshakes).

Certificates are made once per session with the openssl CLI: a CA, a
server certificate (DNS:localhost, IP:127.0.0.1), two client certificates
from that CA, and a second CA with a client certificate of its own.
Directories are laid out as libnbd and qemu expect (ca-cert.pem,
client-cert.pem, client-key.pem; server-cert.pem, server-key.pem).

Measurements are printed with `pytest -s` ("[measure] ...").
"""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from types import SimpleNamespace

import nbd
import pytest

from conftest import memdisk_factory, run_tool
from nbdwire import (CMD_BLOCK_STATUS, CMD_READ, FLAG_HAS_FLAGS, FLAG_SEND_DF,
                     NBD_EINVAL, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
                     OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
                     OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID,
                     REP_ERR_POLICY, REP_ERR_TLS_REQD, REP_ERR_UNSUP,
                     REP_META_CONTEXT, REP_SERVER, REPLY_TYPE_ERROR,
                     REPLY_TYPE_OFFSET_DATA, Client, go_data, meta_data,
                     option_bytes, still_open, wait_closed)
from support import C_DIR, ROOT, HarnessProcess, compile_c_harness, make_ca, make_leaf, openssl, stop_all

MEMDISK_BIN = ROOT / "build" / "memdisk"
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "HARNESS-ERROR",
                   "panicked")

KiB = 1 << 10
MiB = 1 << 20

SOCK_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT_MS = 1000

MEASUREMENTS = []


def note(text):
    """Record a measurement; shown with `pytest -s`."""
    MEASUREMENTS.append(text)
    print(f"\n[measure] {text}")


# --------------------------------------------------------------------------
# Certificates


def _fingerprint(d, name):
    """`openssl x509 -fingerprint -sha256` of a certificate, as AB:CD:..."""
    out = openssl("x509", "-in", f"{name}-cert.pem", "-noout",
                   "-fingerprint", "-sha256", cwd=d)
    m = re.search(r"Fingerprint=([0-9A-Fa-f:]+)", out)
    assert m, out
    return m.group(1).upper()


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """CA, server cert, client-a and client-b from the CA, and a second CA
    with its own client cert, laid out in per-role directories."""
    d = tmp_path_factory.mktemp("tls-certs")
    make_ca(d, "ca", "libnbdkit-async test CA")
    make_ca(d, "ca2", "some other CA")
    make_leaf(d, "server", "ca", "localhost",
               "extendedKeyUsage=serverAuth\n"
               "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    make_leaf(d, "client-a", "ca", "client-a", "extendedKeyUsage=clientAuth\n")
    make_leaf(d, "client-b", "ca", "client-b", "extendedKeyUsage=clientAuth\n")
    make_leaf(d, "intruder", "ca2", "intruder", "extendedKeyUsage=clientAuth\n")

    def layout(name, files):
        sub = d / name
        sub.mkdir()
        for src, dst in files.items():
            shutil.copy(d / src, sub / dst)
        return sub

    def client_dir(name, who):
        files = {"ca-cert.pem": "ca-cert.pem"}
        if who:
            files[f"{who}-cert.pem"] = "client-cert.pem"
            files[f"{who}-key.pem"] = "client-key.pem"
        return layout(name, files)

    c = SimpleNamespace(
        dir=d,
        ca=d / "ca-cert.pem",
        server=layout("server", {"ca-cert.pem": "ca-cert.pem",
                                 "server-cert.pem": "server-cert.pem",
                                 "server-key.pem": "server-key.pem"}),
        client=client_dir("client", "client-a"),        # CA 1, client-a
        client_b=client_dir("client-b", "client-b"),    # CA 1, client-b
        nocert=client_dir("nocert", None),              # CA only
        other=client_dir("other-ca", "intruder"),       # cert from CA 2
        fp={n: _fingerprint(d, n) for n in ("client-a", "client-b", "intruder")},
    )
    c.pair = {n: (d / f"{n}-cert.pem", d / f"{n}-key.pem")
              for n in ("client-a", "client-b", "intruder", "server", "ca")}
    # The certificates really are v3 (rustls/webpki rejects v1).
    text = openssl("x509", "-in", "client-a-cert.pem", "-noout", "-text", cwd=d)
    assert "Version: 3" in text, text
    return c


# --------------------------------------------------------------------------
# The server under test


def check_tls_unix_uri(uri, sock):
    assert re.fullmatch(r"nbds?\+unix:///[^?]*\?socket=" + re.escape(str(sock)),
                        uri), uri


@pytest.fixture
def memdisk(tmp_path, request):
    """conftest's `memdisk` factory, except that it accepts the
    nbds+unix:// URI memdisk prints with --tls=require (conftest's insists
    on nbd+unix://). Same contract: URI within 10 s, always stopped with
    SIGTERM, exit code 0 required, kill -9 on timeout, watchdog."""
    yield from memdisk_factory(tmp_path, request, check_uri=check_tls_unix_uri)


# --------------------------------------------------------------------------
# Helpers


def tls_uri(sock, cert_dir, export=""):
    return f"nbds+unix:///{export}?socket={sock}&tls-certificates={cert_dir}"


def plain_uri(sock, export=""):
    return f"nbd+unix:///{export}?socket={sock}"


def tls_server_args(certs, mode="require", *extra):
    return (f"--tls={mode}", "--tls-certificates", certs.server, *extra)


def nbd_handle():
    """A libnbd handle that may read tls-certificates=DIR from URIs."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    return h


def connect_tls(sock, cert_dir, export="", mode=nbd.TLS_REQUIRE):
    h = nbd_handle()
    if mode == nbd.TLS_REQUIRE:
        h.connect_uri(tls_uri(sock, cert_dir, export))
    else:
        h.set_tls(mode)
        h.connect_uri(f"{plain_uri(sock, export)}&tls-certificates={cert_dir}")
    return h


def qemu_tls_opts(cert_dir, sock):
    return (["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={cert_dir}"],
            f"driver=nbd,path={sock},tls-creds=tls0,tls-hostname=localhost")


def client_ctx(certs, pair=None, max_version=None):
    """Python ssl context verifying the server against the test CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    if pair is not None:
        ctx.load_cert_chain(str(pair[0]), str(pair[1]))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def starttls(c, ctx):
    """STARTTLS on a raw client: expect the ACK, then wrap its socket."""
    return c.starttls(ctx)


def send_read(c, offset, length):
    return c.send_request(CMD_READ, offset, length)


def expect_tls_refused(c):
    """After a TLS handshake the server must refuse (alert / hang-up),
    never answer an option."""
    try:
        c.option(OPT_GO, go_data())
        got = c.opt_reply()
    except (ssl.SSLError, EOFError, ConnectionResetError, BrokenPipeError) as e:
        return e
    raise AssertionError(f"server answered an option to a refused client: {got}")


def raw_connect(sock, timeout=SOCK_TIMEOUT):
    """A raw client past the greeting and client flags."""
    return Client(path=sock, timeout=timeout).start()


# --------------------------------------------------------------------------
# The TLS harness (plugin doing access control in open)


@pytest.fixture(scope="module")
def harness_bin(tmp_path_factory):
    return compile_c_harness(C_DIR / "tls_harness.c",
                             tmp_path_factory.mktemp("tls_harness") / "tls_harness")


class TlsHarness(HarnessProcess):
    name = "harness"

    def __init__(self, binary, args, log):
        super().__init__(binary, args, prefix="nbdtls-",
                         env={"NBDKIT_ASYNC_LOG": log} if log else None)
        self.wait_ready(10)

    def opens(self):
        """[(fingerprint or 'none', verdict)] for every open so far."""
        return re.findall(r"^open \S+ cert (\S+) len \d+ verdict (\w+)$",
                          self.out(), re.M)

    def stop(self):
        """SIGTERM; exit 0, no sanitizer report, every admitted handle closed."""
        self.send(signal.SIGTERM)
        self.wait_exit(15)
        self.assert_exit_ok(SANITIZER_MARKS)
        out = self.out()
        assert "main_loop returned 0" in out, self.report()
        admitted = sum(1 for _, v in self.opens() if v == "allow")
        closes = sum(1 for l in out.splitlines() if l == "close")
        assert admitted == closes, (f"{admitted} admitted opens, {closes} closes"
                                    f"\n{self.report()}")

@pytest.fixture
def tls_harness(harness_bin, request):
    """Factory: tls_harness(*args) -> running TlsHarness, always stopped."""
    started = []

    def start(*args):
        h = TlsHarness(harness_bin, args, request.config.getoption("--memdisk-log"))
        started.append(h)
        return h

    try:
        yield start
    finally:
        stop_all(started)


@pytest.fixture
def raw_conns():
    """Raw clients (possibly TLS-wrapped), closed at teardown."""
    conns = []

    def connect(sock, timeout=SOCK_TIMEOUT):
        c = raw_connect(sock, timeout)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        try:
            c.close()
        except OSError:
            pass


def harness_bytes(offset, count):
    return bytes((o % 251) + 1 for o in range(offset, offset + count))


# --------------------------------------------------------------------------
# Real clients through TLS


def test_nbdinfo_nbdsh_libnbd_through_tls(memdisk, certs):
    """nbdinfo and nbdsh with nbds+unix://...&tls-certificates=DIR: TLS is
    negotiated, data written through one TLS client is read by another."""
    srv = memdisk(*tls_server_args(certs), size="64M")
    assert srv.uri == f"nbds+unix:///?socket={srv.sock}", srv.uri
    uri = tls_uri(srv.sock, certs.client)

    p = run_tool(["nbdinfo", "--json", uri], srv)
    info = json.loads(p.stdout)
    assert info["TLS"] is True, p.stdout
    assert info["exports"][0]["export-size"] == 64 * MiB, p.stdout

    script = ("assert h.get_tls_negotiated()\n"
              "h.pwrite(b'\\xa7' * 65536, 3 << 20)\n"
              "assert h.pread(65536, 3 << 20) == b'\\xa7' * 65536\n"
              "h.flush()\n"
              "print('nbdsh-ok', h.get_size())\n")
    # nbdsh -u refuses tls-certificates=DIR (libnbd's default forbids
    # local files in URIs), so connect from a -c command.
    p = run_tool(["nbdsh", "-c", "h.set_uri_allow_local_file(True)",
                  "-c", f"h.connect_uri({uri!r})", "-c", script], srv)
    assert f"nbdsh-ok {64 * MiB}" in p.stdout, p.stdout

    h = connect_tls(srv.sock, certs.client)
    try:
        assert h.get_tls_negotiated()
        assert h.pread(65536, 3 * MiB) == b"\xa7" * 65536
        assert h.pread(4096, 0) == bytes(4096)
    finally:
        h.shutdown()


def test_qemu_img_convert_and_compare_through_tls(memdisk, certs, tmp_path):
    """qemu-img convert of a random 16-64 MiB image into the server and back
    out through TLS, byte-identical; qemu-img compare through TLS agrees,
    and notices a one-byte change."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    size = rng.randint(16, 64) * MiB
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        for i in range(size // MiB):
            # A few all-zero megabytes, so sparse handling is exercised too.
            f.write(bytes(MiB) if rng.random() < 0.15 else rng.randbytes(MiB))
    srv = memdisk(*tls_server_args(certs), size=size)
    obj, opts = qemu_tls_opts(certs.client, srv.sock)

    t0 = time.monotonic()
    run_tool(["qemu-img", "convert", "-n", "-f", "raw", src, *obj,
              "--target-image-opts", opts], srv)
    t_in = time.monotonic() - t0

    out = tmp_path / "out.img"
    t0 = time.monotonic()
    run_tool(["qemu-img", "convert", *obj, "--image-opts", opts,
              "-O", "raw", out], srv)
    t_out = time.monotonic() - t0
    assert out.stat().st_size == size
    a, b = hashlib.sha256(src.read_bytes()), hashlib.sha256(out.read_bytes())
    assert a.hexdigest() == b.hexdigest(), f"round trip differs (seed {seed})"

    p = run_tool(["qemu-img", "compare", *obj, "--image-opts", opts,
                  f"driver=file,filename={src}"], srv)
    assert "Images are identical" in p.stdout, p.stdout

    # The comparison is real: change one byte through TLS, compare again.
    off = rng.randrange(size)
    h = connect_tls(srv.sock, certs.client)
    try:
        old = h.pread(1, off)
        h.pwrite(bytes([old[0] ^ 0xFF]), off)
    finally:
        h.shutdown()
    p = run_tool(["qemu-img", "compare", *obj, "--image-opts", opts,
                  f"driver=file,filename={src}"], srv, check=False)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert f"mismatch at offset {off // 512 * 512}" in p.stdout, (off, p.stdout)
    note(f"qemu-img convert through TLS, {size // MiB} MiB (seed {seed}): "
         f"in {size / MiB / t_in:.0f} MiB/s, out {size / MiB / t_out:.0f} MiB/s")


def test_qemu_io_pattern_through_tls(memdisk, certs):
    """qemu-io write -P / read -P through TLS; a wrong pattern is caught,
    and libnbd over TLS sees the bytes qemu wrote."""
    srv = memdisk(*tls_server_args(certs), size="32M")
    obj, opts = qemu_tls_opts(certs.client, srv.sock)
    base = ["qemu-io", *obj, "--image-opts", opts]
    p = run_tool(base + ["-c", "write -P 0x5a 5M 192k",
                         "-c", "read -P 0x5a 5M 192k",
                         "-c", "read -P 0 0 64k"], srv)
    assert "wrote 196608/196608 bytes at offset 5242880" in p.stdout, p.stdout
    assert "Pattern verification failed" not in p.stdout, p.stdout

    p = run_tool(base + ["-c", "read -P 0xa5 5M 192k"], srv, check=False)
    assert "Pattern verification failed" in p.stdout + p.stderr, (p.stdout, p.stderr)

    h = connect_tls(srv.sock, certs.client)
    try:
        assert h.pread(192 * KiB, 5 * MiB) == b"\x5a" * (192 * KiB)
    finally:
        h.shutdown()


# --------------------------------------------------------------------------
# Modes: require, allow, off


def test_require_mode_refuses_plaintext(memdisk, certs, raw_conns):
    """--tls=require: every option but STARTTLS/ABORT gets
    NBD_REP_ERR_TLS_REQD (the export list included, so names are not
    revealed); NBD_OPT_EXPORT_NAME makes the server hang up; after STARTTLS
    the same connection lists and opens exports."""
    srv = memdisk(*tls_server_args(certs), "--export", "secret-export",
                  "--export", "other-export", size="8M")
    c = raw_conns(srv.sock)
    refused = [
        (OPT_LIST, b""),
        (OPT_GO, go_data(b"secret-export")),
        (OPT_INFO, go_data(b"secret-export")),
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_LIST_META_CONTEXT, meta_data(b"secret-export", ())),
        (OPT_SET_META_CONTEXT, meta_data(b"secret-export")),
        (0x1234, b"unknown option data"),
        (OPT_LIST, b""),             # still refused, nothing leaked
    ]
    for opt, data in refused:
        replies = c.option_replies(opt, data)
        assert len(replies) == 1 and replies[0][0] == REP_ERR_TLS_REQD, (
            f"option {opt}: {replies}\n{srv.describe()}")
        assert b"secret" not in replies[0][1] and b"other-export" not in replies[0][1]

    # The same connection, once TLS is on, sees the exports.
    starttls(c, client_ctx(certs))
    replies = c.option_replies(OPT_LIST)
    names = sorted(p[4:4 + struct.unpack(">I", p[:4])[0]]
                   for t, p in replies if t == REP_SERVER)
    assert names == [b"other-export", b"secret-export"], replies
    assert replies[-1] == (REP_ACK, b"")
    assert c.go(b"secret-export") == REP_ACK
    assert c.size == 8 * MiB
    err, data = c.call(CMD_READ, 0, 4096)
    assert (err, data) == (0, bytes(4096))

    # Old-style NBD_OPT_EXPORT_NAME works once TLS is on.
    c4 = raw_conns(srv.sock)
    starttls(c4, client_ctx(certs))
    c4.export_name(b"other-export")
    assert c4.size == 8 * MiB and c4.tflags & FLAG_HAS_FLAGS
    assert c4.call(CMD_READ, 4096, 4096) == (0, bytes(4096))

    # NBD_OPT_ABORT is allowed in plaintext.
    c2 = raw_conns(srv.sock)
    c2.option(OPT_ABORT)
    try:
        got = c2.opt_reply()
        assert got == (OPT_ABORT, REP_ACK, b""), got
    except (EOFError, ConnectionResetError):
        pass    # the spec lets the server just close
    assert wait_closed(c2.s, 5) is not None

    # NBD_OPT_EXPORT_NAME cannot be refused politely: the server hangs up,
    # without sending size or flags.
    c3 = raw_conns(srv.sock)
    c3.option(OPT_EXPORT_NAME, b"secret-export")
    c3.s.settimeout(5)
    received = b""
    try:
        while True:
            chunk = c3.s.recv(4096)
            if not chunk:
                break
            received += chunk
    except ConnectionResetError:
        pass
    assert received == b"", f"server sent {received!r} after plaintext EXPORT_NAME"

    # libnbd without TLS fails cleanly (no hang, a proper error).
    h = nbd_handle()
    t0 = time.monotonic()
    with pytest.raises(nbd.Error) as e:
        h.connect_uri(plain_uri(srv.sock, "secret-export"))
    assert time.monotonic() - t0 < 5
    assert e.value.errnum in (errno.ENOTSUP, errno.EPERM, errno.EACCES), e.value
    del h
    p = run_tool(["nbdinfo", plain_uri(srv.sock, "secret-export")], srv, check=False)
    assert p.returncode != 0 and "secret-export" not in p.stdout, (p.stdout, p.stderr)
    p = run_tool(["nbdinfo", "--list", plain_uri(srv.sock)], srv, check=False)
    assert "secret-export" not in p.stdout + p.stderr, (p.stdout, p.stderr)

    # libnbd in TLS "allow" mode upgrades, and the server still works.
    h = connect_tls(srv.sock, certs.client, "secret-export", mode=nbd.TLS_ALLOW)
    try:
        assert h.get_tls_negotiated()
        assert h.get_size() == 8 * MiB
    finally:
        h.shutdown()
    assert srv.alive()


def test_allow_mode_serves_plaintext_and_tls(memdisk, certs, raw_conns):
    """--tls=on: plaintext and TLS clients are both served, and see the
    same disk."""
    srv = memdisk(*tls_server_args(certs, "on"), size="16M")
    assert srv.uri == plain_uri(srv.sock), srv.uri

    plain = nbd_handle()
    plain.connect_uri(plain_uri(srv.sock))
    tls = connect_tls(srv.sock, certs.client)
    try:
        assert not plain.get_tls_negotiated()
        assert tls.get_tls_negotiated()
        plain.pwrite(b"P" * 8192, 1 * MiB)
        tls.pwrite(b"T" * 8192, 2 * MiB)
        assert tls.pread(8192, 1 * MiB) == b"P" * 8192
        assert plain.pread(8192, 2 * MiB) == b"T" * 8192
    finally:
        plain.shutdown()
        tls.shutdown()

    # Raw: the export list is shown in plaintext in this mode.
    c = raw_conns(srv.sock)
    replies = c.option_replies(OPT_LIST)
    assert [t for t, _ in replies] == [REP_SERVER, REP_ACK], replies

    for uri in (plain_uri(srv.sock), tls_uri(srv.sock, certs.client)):
        p = run_tool(["nbdinfo", "--json", uri], srv)
        assert json.loads(p.stdout)["TLS"] is uri.startswith("nbds"), p.stdout


@pytest.mark.parametrize("flags", [("--tls=off",), ()], ids=["tls-off", "default"])
def test_off_mode_refuses_starttls(memdisk, certs, raw_conns, flags):
    """--tls=off (and the default): STARTTLS gets NBD_REP_ERR_UNSUP and the
    connection goes on in plaintext; clients that require TLS fail
    cleanly, clients that merely allow it fall back to plaintext."""
    srv = memdisk(*flags, size="4M")
    assert srv.uri.startswith("nbd+unix://"), srv.uri
    c = raw_conns(srv.sock)
    replies = c.option_replies(OPT_STARTTLS)
    assert [t for t, _ in replies] == [REP_ERR_UNSUP], replies
    assert c.go() == REP_ACK
    assert c.call(CMD_READ, 0, 512) == (0, bytes(512))

    h = nbd_handle()
    t0 = time.monotonic()
    with pytest.raises(nbd.Error):
        h.connect_uri(tls_uri(srv.sock, certs.client))
    assert time.monotonic() - t0 < 5
    del h
    p = run_tool(["nbdinfo", tls_uri(srv.sock, certs.client)], srv, check=False)
    assert p.returncode != 0, (p.stdout, p.stderr)
    obj, opts = qemu_tls_opts(certs.client, srv.sock)
    p = run_tool(["qemu-io", *obj, "--image-opts", opts, "-c", "read 0 4k"],
                 srv, check=False)
    assert p.returncode != 0, (p.stdout, p.stderr)

    h = connect_tls(srv.sock, certs.client, mode=nbd.TLS_ALLOW)
    try:
        assert not h.get_tls_negotiated()
        assert h.pread(4096, 0) == bytes(4096)
    finally:
        h.shutdown()
    assert srv.alive()


# --------------------------------------------------------------------------
# STARTTLS state handling


def test_starttls_discards_plaintext_negotiation(memdisk, certs, raw_conns):
    """Per the spec, what was negotiated before STARTTLS is forgotten:
    STRUCTURED_REPLY and SET_META_CONTEXT sent in plaintext do not carry
    over into the TLS session (a man in the middle could have sent them)."""
    srv = memdisk(*tls_server_args(certs, "on"), size="8M")
    h = nbd_handle()
    h.connect_uri(plain_uri(srv.sock))
    h.pwrite(b"\x42" * 8192, 0)
    h.shutdown()

    # Control, all plaintext: structured replies and base:allocation are on.
    c = raw_conns(srv.sock)
    assert c.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
    meta = c.option_replies(OPT_SET_META_CONTEXT, meta_data())
    assert [t for t, _ in meta] == [REP_META_CONTEXT, REP_ACK], meta
    assert c.go() == REP_ACK
    assert c.tflags & FLAG_SEND_DF, hex(c.tflags)
    cookie = send_read(c, 0, 4096)
    r = c.recv_chunks()
    assert (r.kind, r.cookie) == ("structured", cookie), r
    assert r.chunks[0][1] == REPLY_TYPE_OFFSET_DATA, r
    assert r.chunks[0][2] == struct.pack(">Q", 0) + b"\x42" * 4096
    c.send_request(CMD_BLOCK_STATUS, 0, 4096, cookie=99)
    r = c.recv_chunks()
    assert (r.kind, r.cookie) == ("structured", 99), r
    assert REPLY_TYPE_ERROR not in r.types(), r

    # Same plaintext negotiation, then STARTTLS: simple replies, no DF.
    c = raw_conns(srv.sock)
    assert c.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
    assert [t for t, _ in c.option_replies(OPT_SET_META_CONTEXT, meta_data())] == \
        [REP_META_CONTEXT, REP_ACK]
    starttls(c, client_ctx(certs))
    assert c.go() == REP_ACK
    assert c.size == 8 * MiB
    assert c.tflags & FLAG_HAS_FLAGS, hex(c.tflags)
    assert not c.tflags & FLAG_SEND_DF, (
        f"export flags {c.tflags:#x} advertise DF: structured replies from "
        f"before STARTTLS carried over\n{srv.describe()}")
    cookie = send_read(c, 0, 4096)
    r = c.recv_chunks()
    assert r.kind == "simple", (
        f"READ after STARTTLS got a {r.kind} reply: plaintext "
        f"STRUCTURED_REPLY carried over\n{srv.describe()}")
    assert (r.cookie, r.error, r.data) == (cookie, 0, b"\x42" * 4096)

    # STRUCTURED_REPLY again inside TLS works, but the plaintext meta
    # context is still gone: BLOCK_STATUS is refused with EINVAL.
    c = raw_conns(srv.sock)
    assert c.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
    assert [t for t, _ in c.option_replies(OPT_SET_META_CONTEXT, meta_data())] == \
        [REP_META_CONTEXT, REP_ACK]
    starttls(c, client_ctx(certs))
    assert c.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
    assert c.go() == REP_ACK
    assert c.tflags & FLAG_SEND_DF, hex(c.tflags)
    c.send_request(CMD_BLOCK_STATUS, 0, 4096, cookie=7)
    r = c.recv_chunks()
    if r.kind == "simple":
        assert (r.cookie, r.error) == (7, NBD_EINVAL), r
    else:
        assert r.cookie == 7
        assert r.error_chunk() == NBD_EINVAL, (
            f"BLOCK_STATUS after STARTTLS answered {r}: the plaintext "
            f"meta context carried over\n{srv.describe()}")
    cookie = send_read(c, 4096, 4096)
    r = c.recv_chunks()
    assert (r.kind, r.cookie) == ("structured", cookie), r


def test_starttls_misuse(memdisk, certs, raw_conns):
    """STARTTLS with a payload is invalid (and leaves the connection in
    plaintext); STARTTLS inside TLS is invalid; both leave the session
    usable."""
    srv = memdisk(*tls_server_args(certs, "on"), size="4M")
    c = raw_conns(srv.sock)
    replies = c.option_replies(OPT_STARTTLS, b"junk")
    assert [t for t, _ in replies] == [REP_ERR_INVALID], replies
    starttls(c, client_ctx(certs))
    replies = c.option_replies(OPT_STARTTLS)
    assert [t for t, _ in replies] == [REP_ERR_INVALID], replies
    assert c.go() == REP_ACK
    assert c.call(CMD_READ, 0, 4096) == (0, bytes(4096))


class BioSocket:
    """A TLS client over a socket driven through ssl.MemoryBIO, so the
    test decides exactly which bytes go out when."""

    def __init__(self, sock, ctx):
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")

    def client_hello(self):
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.out.read()

    def _feed(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("server closed during TLS")
        self.inc.write(chunk)

    def finish_handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = self.out.read()
                if data:
                    self.sock.sendall(data)
                self._feed()
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def sendall(self, data):
        self.obj.write(data)
        self.sock.sendall(self.out.read())

    def recv(self, n):
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._feed()

    def settimeout(self, t):
        self.sock.settimeout(t)

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("how", ["pipelined", "drip"])
def test_starttls_client_hello_framing(memdisk, certs, raw_conns, how):
    """pipelined: the ClientHello right behind STARTTLS in one write,
    without waiting for the ACK (the server must not lose ciphertext it
    already read with the option). drip: the ClientHello one byte per
    write. Both get a working TLS session."""
    srv = memdisk(*tls_server_args(certs), size="4M")
    c = raw_conns(srv.sock)
    bio = BioSocket(c.s, client_ctx(certs))
    hello = bio.client_hello()
    starttls_opt = option_bytes(OPT_STARTTLS)
    if how == "pipelined":
        c.s.sendall(starttls_opt + hello)
        assert c.opt_reply() == (OPT_STARTTLS, REP_ACK, b"")
    else:
        c.s.sendall(starttls_opt)
        assert c.opt_reply() == (OPT_STARTTLS, REP_ACK, b"")
        for i in range(len(hello)):
            c.s.sendall(hello[i:i + 1])
            if i % 16 == 0:
                time.sleep(0.001)       # the case: the bytes arrive apart
    bio.finish_handshake()
    c.s = bio
    assert c.go() == REP_ACK
    assert c.size == 4 * MiB
    assert c.call(CMD_READ, 0, 4096) == (0, bytes(4096))


# --------------------------------------------------------------------------
# Mutual TLS


def test_mutual_tls(memdisk, certs, raw_conns):
    """--tls-verify-peer: a client certificate from the CA is accepted;
    no certificate, or one from another CA, is refused (libnbd, nbdinfo,
    qemu-io and a raw TLS 1.2 / 1.3 client), and so are certificates of
    the right CA that are not client certificates (the server's own, with
    only serverAuth; the CA certificate itself); the server keeps serving."""
    srv = memdisk(*tls_server_args(certs, "require", "--tls-verify-peer"), size="4M")
    h = connect_tls(srv.sock, certs.client)
    try:
        assert h.get_tls_negotiated()
        h.pwrite(b"m" * 4096, 0)
        assert h.pread(4096, 0) == b"m" * 4096
    finally:
        h.shutdown()
    obj, opts = qemu_tls_opts(certs.client, srv.sock)
    p = run_tool(["qemu-io", *obj, "--image-opts", opts, "-c", "read -P 0x6d 0 4k"], srv)
    assert "Pattern verification failed" not in p.stdout, p.stdout

    for name, d in (("no certificate", certs.nocert), ("other CA", certs.other)):
        h = nbd_handle()
        t0 = time.monotonic()
        with pytest.raises(nbd.Error) as e:
            h.connect_uri(tls_uri(srv.sock, d))
        assert time.monotonic() - t0 < 5, name
        del h
        p = run_tool(["nbdinfo", tls_uri(srv.sock, d)], srv, check=False)
        assert p.returncode != 0, (name, p.stdout, p.stderr)
        obj, opts = qemu_tls_opts(d, srv.sock)
        p = run_tool(["qemu-io", *obj, "--image-opts", opts, "-c", "read 0 4k"],
                     srv, check=False)
        assert p.returncode != 0 and "read 4096/4096" not in p.stdout, (name, p.stdout)

    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        for name, pair in (("no certificate", None),
                           ("other CA", certs.pair["intruder"]),
                           # Right CA, wrong purpose: serverAuth only.
                           ("server certificate", certs.pair["server"]),
                           # The CA's own certificate is no end entity.
                           ("CA certificate", certs.pair["ca"])):
            c = raw_conns(srv.sock)
            try:
                starttls(c, client_ctx(certs, pair, version))
            except (ssl.SSLError, ConnectionResetError, EOFError):
                continue        # refused during the handshake: fine
            assert version == ssl.TLSVersion.TLSv1_3, (
                f"TLS 1.2 handshake with {name} completed\n{srv.describe()}")
            # TLS 1.3: the client finishes first; the server must then
            # refuse before any NBD option is answered.
            expect_tls_refused(c)
        c = raw_conns(srv.sock)
        starttls(c, client_ctx(certs, certs.pair["client-b"], version))
        assert c.s.version() == {ssl.TLSVersion.TLSv1_3: "TLSv1.3",
                                 ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[version]
        assert c.go() == REP_ACK
        assert c.call(CMD_READ, 0, 4096) == (0, b"m" * 4096)

    h = connect_tls(srv.sock, certs.client_b)
    try:
        assert h.pread(4096, 0) == b"m" * 4096
    finally:
        h.shutdown()
    assert srv.alive()


def test_open_sees_verified_client_certificate(tls_harness, certs):
    """The plugin's open gets the verified client certificate: its SHA-256
    fingerprint is the one `openssl x509 -fingerprint -sha256` prints."""
    h = tls_harness("--tls-certificates", certs.server, "--verify-peer")
    for d in (certs.client, certs.client_b, certs.client):
        n = connect_tls(h.sock, d)
        try:
            assert n.pread(4096, 1000) == harness_bytes(1000, 4096)
        finally:
            n.shutdown()
    fa, fb = certs.fp["client-a"], certs.fp["client-b"]
    assert fa != fb
    assert h.opens() == [(fa, "allow"), (fb, "allow"), (fa, "allow")], h.report()

    # qemu presents the same certificate, and open sees it.
    obj, opts = qemu_tls_opts(certs.client_b, h.sock)
    run_tool(["qemu-io", "-r", *obj, "--image-opts", opts, "-c", "read 0 4k"])
    assert (fb, "allow") in h.opens()[3:], h.report()

    # nbdinfo opens for NBD_OPT_INFO as well as NBD_OPT_GO: same identity.
    seen = len(h.opens())
    run_tool(["nbdinfo", tls_uri(h.sock, certs.client)])
    new = h.opens()[seen:]
    assert new and all(o == (fa, "allow") for o in new), h.report()


def test_open_refuses_unlisted_fingerprint(tls_harness, certs, raw_conns):
    """Access control in open: a valid certificate from the right CA that
    is not on the allow list is refused at open (NBD_REP_ERR_POLICY for
    NBD_OPT_GO, an error in libnbd), as is a plaintext client; the allowed
    certificate gets in."""
    fa, fb = certs.fp["client-a"], certs.fp["client-b"]
    h = tls_harness("--tls-certificates", certs.server, "--tls", "on",
                    "--verify-peer", "--allow", fb.lower())
    n = nbd_handle()
    with pytest.raises(nbd.Error) as e:
        n.connect_uri(tls_uri(h.sock, certs.client))
    del n
    print(f"libnbd error for a refused certificate: {e.value}")

    c = raw_conns(h.sock)
    starttls(c, client_ctx(certs, certs.pair["client-a"]))
    replies = c.option_replies(OPT_GO, go_data())
    assert replies[-1][0] == REP_ERR_POLICY, (replies, h.report())

    n = nbd_handle()
    with pytest.raises(nbd.Error):
        n.connect_uri(plain_uri(h.sock))
    del n

    n = connect_tls(h.sock, certs.client_b)
    try:
        assert n.pread(512, 0) == harness_bytes(0, 512)
    finally:
        n.shutdown()
    assert h.opens() == [(fa, "refuse"), (fa, "refuse"), ("none", "refuse"),
                         (fb, "allow")], h.report()


def test_open_without_client_certificate(tls_harness, certs):
    """No certificate reaches open for a plaintext client, nor for a TLS
    client when the server does not verify peers (the certificate is then
    never asked for)."""
    h = tls_harness("--tls-certificates", certs.server, "--tls", "on", "--verify-peer")
    n = nbd_handle()
    n.connect_uri(plain_uri(h.sock))
    n.pread(512, 0)
    n.shutdown()
    n = connect_tls(h.sock, certs.client)
    n.pread(512, 0)
    n.shutdown()
    assert h.opens() == [("none", "allow"), (certs.fp["client-a"], "allow")], h.report()

    h2 = tls_harness("--tls-certificates", certs.server)
    n = connect_tls(h2.sock, certs.client)
    try:
        assert n.get_tls_negotiated()
        n.pread(512, 0)
    finally:
        n.shutdown()
    assert h2.opens() == [("none", "allow")], h2.report()


# --------------------------------------------------------------------------
# Robustness


def test_stalled_and_garbage_handshakes_do_not_block(memdisk, certs):
    """TLS handshakes that stall (after the STARTTLS ACK, after the
    ClientHello, inside a record) or send garbage do not hold up other
    clients; garbage is dropped at once, stalls by the handshake timeout;
    SIGTERM with a stalled handshake open still exits 0."""
    srv = memdisk(*tls_server_args(certs, "require", "--handshake-timeout-ms",
                                   str(HANDSHAKE_TIMEOUT_MS)), size="16M")
    socks = []
    try:
        # A client already in transmission before the trouble starts.
        early = connect_tls(srv.sock, certs.client)
        stalled = []        # (kind, socket, connect time)

        def stall_conn(kind):
            t = time.monotonic()
            c = raw_connect(srv.sock)
            socks.append(c)
            assert c.option_replies(OPT_STARTTLS) == [(REP_ACK, b"")]
            if kind == "mid-handshake":
                bio = BioSocket(c.s, client_ctx(certs))
                c.s.sendall(bio.client_hello())
            elif kind == "tls-established":
                # The TLS handshake completes; then no NBD option follows.
                c.s = client_ctx(certs).wrap_socket(c.s, server_hostname="localhost")
            elif kind == "partial-record":
                # A handshake record header promising 512 bytes, then 3.
                c.s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01")
            stalled.append((kind, c.s, t))

        for _ in range(6):
            stall_conn("after-ack")
        stall_conn("mid-handshake")
        stall_conn("partial-record")
        stall_conn("tls-established")

        g = raw_connect(srv.sock)
        socks.append(g)
        assert g.option_replies(OPT_STARTTLS) == [(REP_ACK, b"")]
        t_garbage = time.monotonic()
        g.s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" +
                    random.Random(1).randbytes(512))
        dt = wait_closed(g.s, 5)
        assert dt is not None, f"garbage handshake not dropped in 5 s\n{srv.describe()}"
        garbage_drop = time.monotonic() - t_garbage
        assert garbage_drop < 0.9 * HANDSHAKE_TIMEOUT_MS / 1000, (
            f"garbage after STARTTLS dropped only after {garbage_drop:.2f} s "
            f"(the handshake timeout, not the TLS error?)\n{srv.describe()}")

        # While all of them are open: the existing client and a new one work.
        t0 = time.monotonic()
        data = random.Random(2).randbytes(MiB)
        early.pwrite(data, 0)
        late = connect_tls(srv.sock, certs.client)
        try:
            assert late.pread(MiB, 0) == data
            assert early.pread(4096, 0) == data[:4096]
        finally:
            late.shutdown()
        good = time.monotonic() - t0
        oldest = time.monotonic() - stalled[0][2]
        assert oldest < HANDSHAKE_TIMEOUT_MS / 1000, (
            f"machine too slow to tell: {oldest:.2f} s passed since the first "
            f"stalled connection")
        for kind, s, _ in stalled:
            if isinstance(s, ssl.SSLSocket):
                s = socket.socket(fileno=os.dup(s.fileno()))
                socks.append(SimpleNamespace(close=s.close))
            assert still_open(s), f"{kind} stalled connection closed early\n{srv.describe()}"

        # Every stall is dropped by the handshake timeout.
        drops = []
        for kind, s, t in stalled:
            if isinstance(s, ssl.SSLSocket):
                s = socket.socket(fileno=os.dup(s.fileno()))
                socks.append(SimpleNamespace(close=s.close))
            dt = wait_closed(s, 5)
            assert dt is not None, (f"{kind} stalled TLS handshake still open after "
                                    f"{time.monotonic() - t:.1f} s\n{srv.describe()}")
            drops.append((kind, time.monotonic() - t))
        for kind, d in drops:
            assert 0.8 * HANDSHAKE_TIMEOUT_MS / 1000 <= d < 4, (kind, d)
        assert early.pread(4096, 0) == data[:4096]
        early.shutdown()

        note(f"garbage dropped after {garbage_drop * 1000:.1f} ms; good client "
             f"(connect + 1 MiB write/read) {good * 1000:.0f} ms with "
             f"{len(stalled)} stalled handshakes; stalls dropped after "
             f"{min(d for _, d in drops):.2f}-{max(d for _, d in drops):.2f} s")

        # SIGTERM while a handshake stalls: clean, prompt exit.
        stall_conn("after-ack")
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 3, f"exit took {time.monotonic() - t0:.1f} s"
        assert "panicked" not in srv.stderr(), srv.describe()
    finally:
        for c in socks:
            try:
                c.close()
            except OSError:
                pass


def test_tls_slow_reader_backpressure(memdisk, certs, raw_conns):
    """A TLS client that pipelines 64 MiB of reads and does not read the
    replies for a while: the server holds them (TLS write back-pressure),
    keeps serving others meanwhile, and every byte arrives intact once the
    client reads."""
    srv = memdisk(*tls_server_args(certs), size="64M")
    data = random.Random(5).randbytes(64 * MiB)
    h = connect_tls(srv.sock, certs.client)
    try:
        for off in range(0, len(data), 8 * MiB):
            h.pwrite(data[off:off + 8 * MiB], off)
    finally:
        h.shutdown()

    c = raw_conns(srv.sock, timeout=20)
    starttls(c, client_ctx(certs))
    assert c.go() == REP_ACK
    n = 64
    for i in range(n):
        c.send_request(CMD_READ, i * MiB, MiB)
    # The server answers reads until 4 MiB of replies back up unsent.
    srv.wait_stats(lambda st: st["bytes_read"] >= 4 * MiB,
                   "the server's replies to back up")

    other = connect_tls(srv.sock, certs.client)
    t0 = time.monotonic()
    try:
        assert other.pread(4096, 5 * MiB) == data[5 * MiB:5 * MiB + 4096]
    finally:
        other.shutdown()
    other_ms = (time.monotonic() - t0) * 1000
    assert other_ms < 2000, f"other client waited {other_ms:.0f} ms\n{srv.describe()}"

    seen = set()
    t0 = time.monotonic()
    for _ in range(n):
        cookie, err, got = c.reply()
        assert err == 0, (cookie, err)
        i = cookie - 1
        assert got == data[i * MiB:(i + 1) * MiB], f"read {i} corrupted"
        seen.add(i)
    drain = time.monotonic() - t0
    assert seen == set(range(n))
    note(f"slow TLS reader: 64 x 1 MiB held and delivered in {drain:.2f} s; "
         f"another client served in {other_ms:.0f} ms meanwhile")


# --------------------------------------------------------------------------
# Throughput


def test_tls_1000_aio_reads_with_latency(memdisk, certs):
    """1000 reads of 4 KiB in flight through TLS with 100 ms of backend
    latency complete in well under 1.5 s: TLS does not serialize them."""
    srv = memdisk(*tls_server_args(certs), "--latency-ms", "100", size="8M")
    h = connect_tls(srv.sock, certs.client)
    n, block = 1000, 4096
    try:
        data = random.Random(3).randbytes(n * block)
        h.pwrite(data, 0)
        bufs = [nbd.Buffer(block) for _ in range(n)]
        t0 = time.monotonic()
        cookies = [h.aio_pread(bufs[i], i * block) for i in range(n)]
        deadline = t0 + 10
        while h.aio_in_flight() > 0:
            assert time.monotonic() < deadline, (
                f"{h.aio_in_flight()} reads still in flight after 10 s\n{srv.describe()}")
            h.poll(1000)
        elapsed = time.monotonic() - t0
        for c in cookies:
            assert h.aio_command_completed(c)
        for i in (0, 1, 499, 998, 999):
            assert bytes(bufs[i].to_bytearray()) == data[i * block:(i + 1) * block], i
    finally:
        h.shutdown()
    note(f"1000 x 4 KiB reads, 100 ms latency, through TLS: {elapsed:.3f} s")
    assert elapsed < 1.5, (f"1000 reads through TLS took {elapsed:.2f} s\n"
                           f"{srv.describe()}")


def test_tls_bulk_throughput(memdisk, certs, tmp_path):
    """Bulk copies with nbdcopy, plaintext versus TLS, on one --tls=on
    server: recorded, and TLS must not be pathologically slow."""
    size = 128 * MiB
    srv = memdisk(*tls_server_args(certs, "on"), size=size)
    src = tmp_path / "bulk.img"
    with open(src, "wb") as f:
        rng = random.Random(4)
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))
    rates = {}
    for name, uri in (("plain", plain_uri(srv.sock)),
                      ("tls", tls_uri(srv.sock, certs.client))):
        t0 = time.monotonic()
        run_tool(["nbdcopy", src, uri], srv)
        t_in = time.monotonic() - t0
        t0 = time.monotonic()
        run_tool(["nbdcopy", "--no-extents", uri, "null:"], srv)
        t_out = time.monotonic() - t0
        rates[name] = (size / MiB / t_in, size / MiB / t_out)
    out = tmp_path / "bulk.out"
    run_tool(["nbdcopy", tls_uri(srv.sock, certs.client), out], srv)
    assert hashlib.sha256(out.read_bytes()).digest() == \
        hashlib.sha256(src.read_bytes()).digest()
    note("nbdcopy 128 MiB, MiB/s (write, read): "
         f"plaintext {rates['plain'][0]:.0f}/{rates['plain'][1]:.0f}, "
         f"TLS {rates['tls'][0]:.0f}/{rates['tls'][1]:.0f}")
    assert min(rates["tls"]) > 20, rates


# --------------------------------------------------------------------------
# Start-up


@pytest.mark.parametrize("case", ["missing-dir", "no-certs", "bad-key",
                                  "mismatched-key", "verify-without-ca"])
def test_bad_tls_setup_fails_at_startup(certs, tmp_path, case):
    """memdisk with TLS on and unusable certificates exits non-zero and
    serves nobody: no directory, no --tls-certificates, a key that is not
    PEM, a key that does not match the certificate, --tls-verify-peer
    without ca-cert.pem. Certificate problems are found by
    nbdkit_server_set_tls_certificates, before any URI is printed, and the
    error names the file and the reason. (--tls-verify-peer without a CA
    is found when the loop starts: the flags may come in any order.)"""
    sock = tmp_path / "s.sock"
    args = ["--tls=require"]
    d = tmp_path / "certs"
    d.mkdir()
    shutil.copy(certs.server / "server-cert.pem", d)
    if case == "missing-dir":
        args += ["--tls-certificates", tmp_path / "nope"]
    elif case == "bad-key":
        (d / "server-key.pem").write_text("-----BEGIN PRIVATE KEY-----\n"
                                          "bm90IGEga2V5\n"
                                          "-----END PRIVATE KEY-----\n")
        args += ["--tls-certificates", d]
    elif case == "mismatched-key":
        shutil.copy(certs.dir / "client-a-key.pem", d / "server-key.pem")
        args += ["--tls-certificates", d]
    elif case == "verify-without-ca":
        shutil.copy(certs.server / "server-key.pem", d)
        args += ["--tls-certificates", d, "--tls-verify-peer"]
    p = subprocess.run([str(MEMDISK_BIN), "--unix", str(sock),
                        "--size", "1M", *map(str, args)],
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=10)
    assert p.returncode != 0, (p.returncode, p.stdout, p.stderr)
    if case != "verify-without-ca":
        assert "nbd" not in p.stdout, p.stdout
    assert "error" in p.stderr or case == "no-certs", p.stderr
    if case == "missing-dir":
        assert "nope/server-cert.pem: ENOENT" in p.stderr, p.stderr
    if case == "bad-key":
        assert f"{d}/server-key.pem: unusable private key" in p.stderr, p.stderr
    if case == "mismatched-key":
        assert f"{d}/server-cert.pem with {d}/server-key.pem" in p.stderr, p.stderr
        assert "mismatch" in p.stderr.lower(), p.stderr
    if case == "verify-without-ca":
        assert "needs a CA certificate" in p.stderr, p.stderr


@pytest.mark.parametrize("bits", [2432, 3072])
def test_rsa_keys_of_sizes_users_meet(memdisk, certs, tmp_path, bits):
    """RSA server keys whose size is not a multiple of 512 bits (2432:
    GnuTLS certtool's old default, used by the NBD reference project's
    test certificates) load, and clients connect through them."""
    d = tmp_path / "rsa"
    d.mkdir()
    shutil.copy(certs.dir / "ca-cert.pem", d)
    shutil.copy(certs.dir / "ca-key.pem", d)
    openssl("req", "-new", "-newkey", f"rsa:{bits}", "-nodes",
            "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text("basicConstraints=CA:FALSE\n"
                                  "keyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=serverAuth\n"
                                  "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "server-cert.pem", "-days", "3",
            "-extfile", "server.ext", cwd=d)
    text = openssl("rsa", "-in", "server-key.pem", "-noout", "-text", cwd=d)
    assert f"Private-Key: ({bits} bit" in text, text
    srv = memdisk("--tls=require", "--tls-certificates", d, size="1M")
    h = connect_tls(srv.sock, certs.client)
    assert h.get_size() == 1 << 20
    h.pwrite(b"k" * 4096, 0)
    assert h.pread(4096, 0) == b"k" * 4096
    h.shutdown()
