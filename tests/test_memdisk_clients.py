"""Real NBD clients against build/memdisk: nbdinfo, nbdsh, qemu-img,
qemu-io, nbdcopy, over Unix sockets and TCP."""

import json
import os
import re
import shutil
import time

import pytest

from conftest import run_tool

MiB = 1 << 20


def nbdinfo_json(srv, uri=None):
    p = run_tool(["nbdinfo", "--json", uri or srv.uri], srv)
    info = json.loads(p.stdout)
    assert len(info["exports"]) == 1, info
    return info, info["exports"][0]


def write_random_image(path, size, holes=()):
    """A raw image of random data, with zeroed (sparse) ranges `holes`."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        for off, n in holes:
            f.seek(off)
            f.write(bytes(n))


# ---------------------------------------------------------------- nbdinfo


def test_nbdinfo_writable(memdisk):
    srv = memdisk(size="64M")
    info, e = nbdinfo_json(srv)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    assert e["export-name"] == ""
    assert e["export-size"] == 64 * MiB
    assert e["is_read_only"] is False
    assert e["can_flush"] is True
    assert e["can_fua"] is True
    assert e["can_trim"] is True
    assert e["can_zero"] is True
    assert e["can_multi_conn"] is True
    assert e["can_cache"] is False       # memdisk has no cache callback
    assert e["block_size_maximum"] >= 32 * MiB


@pytest.mark.parametrize("size,expect", [("1K", 1024), ("3M", 3 * MiB),
                                         ("2G", 2 << 30), ("123456", 123456)])
def test_nbdinfo_size_suffixes(memdisk, size, expect):
    srv = memdisk(size=size)
    p = run_tool(["nbdinfo", "--size", srv.uri], srv)
    assert int(p.stdout) == expect


def test_nbdinfo_readonly(memdisk):
    srv = memdisk("--readonly", size="8M")
    _, e = nbdinfo_json(srv)
    assert e["export-size"] == 8 * MiB
    assert e["is_read_only"] is True


def test_nbdinfo_export_name_and_list(memdisk):
    srv = memdisk("--export", "foo", size="4M")
    _, e = nbdinfo_json(srv)
    assert e["export-name"] == "foo"
    assert e["export-size"] == 4 * MiB
    assert e.get("description"), e      # memdisk sets one
    p = run_tool(["nbdinfo", "--list", "--json", srv.uri_for("")], srv)
    names = [x["export-name"] for x in json.loads(p.stdout)["exports"]]
    assert names == ["foo"]
    p = run_tool(["nbdinfo", srv.uri_for("bar")], srv, check=False)
    assert p.returncode != 0, p.stdout
    # The refusal did not hurt the server.
    nbdinfo_json(srv)


def test_tcp_ipv4(memdisk):
    srv = memdisk(size="4M", unix=False, tcp="127.0.0.1:0")
    m = re.fullmatch(r"nbd://127\.0\.0\.1:(\d+)/", srv.uri)
    assert m, f"unexpected URI {srv.uri!r}"
    assert int(m.group(1)) > 0
    _, e = nbdinfo_json(srv)
    assert e["export-size"] == 4 * MiB
    h = srv.connect()
    h.pwrite(b"tcp!" * 1024, 4096)
    assert h.pread(4096, 4096) == b"tcp!" * 1024
    # Small request/reply round trips must not stall on Nagle's algorithm
    # (TCP_NODELAY): 200 of them take far less than 200 * 40 ms.
    t0 = time.monotonic()
    for i in range(200):
        assert h.pread(512, 4096) == b"tcp!" * 128
        h.pwrite(b"x", 0)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"400 small round trips took {elapsed:.2f} s"
    h.shutdown()


def test_tcp_ipv6(memdisk):
    srv = memdisk(size="4M", unix=False, tcp="[::1]:0")
    m = re.fullmatch(r"nbd://\[::1\]:(\d+)/", srv.uri)
    assert m, f"unexpected URI {srv.uri!r}"
    _, e = nbdinfo_json(srv)
    assert e["export-size"] == 4 * MiB
    h = srv.connect()
    h.pwrite(b"six!" * 1024, 0)
    assert h.pread(4096, 0) == b"six!" * 1024
    h.shutdown()


def test_unix_and_tcp_together(memdisk):
    """Both listeners serve the same disk."""
    srv = memdisk(size="4M", tcp="127.0.0.1:0")
    assert len(srv.uris) == 2, srv.uris
    unix_uri, tcp_uri = srv.uris
    assert unix_uri.startswith("nbd+unix://")
    assert tcp_uri.startswith("nbd://127.0.0.1:")
    a = srv.connect(unix_uri)
    b = srv.connect(tcp_uri)
    a.pwrite(b"both" * 1024, 0)
    assert b.pread(4096, 0) == b"both" * 1024
    a.shutdown()
    b.shutdown()


# ---------------------------------------------------------------- nbdsh


def test_nbdsh(memdisk):
    srv = memdisk(size="16M")
    script = (
        "assert h.get_size() == 16 * 1024 * 1024\n"
        "h.pwrite(b'nbdsh' * 100, 12345)\n"
        "h.flush()\n"
        "assert h.pread(500, 12345) == b'nbdsh' * 100\n"
        "print('ok')\n"
    )
    p = run_tool(["nbdsh", "-u", srv.uri, "-c", script], srv)
    assert p.stdout.strip() == "ok"


# ---------------------------------------------------------------- qemu


def test_qemu_img_convert_roundtrip(memdisk, tmp_path):
    """64 MiB of random data into the server and back out, compared."""
    srv = memdisk("--latency-ms", "1", size="64M")
    src = tmp_path / "src.img"
    out = tmp_path / "out.img"
    write_random_image(src, 64 * MiB)
    run_tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
              src, srv.uri], srv)
    run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw",
              srv.uri, out], srv)
    p = run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                  src, out], srv)
    assert "Images are identical" in p.stdout
    # And directly against the server.
    p = run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                  src, srv.uri], srv)
    assert "Images are identical" in p.stdout
    assert out.read_bytes() == src.read_bytes()


def test_qemu_img_convert_with_zero_ranges(memdisk, tmp_path):
    """Zeroed ranges in the source reach the server as zeroes (qemu-img
    uses WRITE_ZEROES / TRIM for them) over previously written data."""
    srv = memdisk("--latency-ms", "1", size="64M")
    # Dirty the whole disk first so that zeroes must really be written.
    p = run_tool(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64M",
                  srv.uri], srv)
    assert "wrote 67108864/67108864 bytes" in p.stdout, p.stdout
    src = tmp_path / "holes.img"
    write_random_image(src, 64 * MiB,
                       holes=[(0, MiB), (10 * MiB, 8 * MiB),
                              (63 * MiB, MiB)])
    run_tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
              src, srv.uri], srv)
    p = run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                  src, srv.uri], srv)
    assert "Images are identical" in p.stdout


def test_qemu_io_pattern(memdisk):
    srv = memdisk("--latency-ms", "1", size="16M")
    p = run_tool(["qemu-io", "-f", "raw",
                  "-c", "write -P 0xab 0 1M",
                  "-c", "read -P 0xab 0 1M",
                  srv.uri], srv)
    assert "Pattern verification failed" not in p.stdout + p.stderr, p.stdout
    assert "wrote 1048576/1048576 bytes at offset 0" in p.stdout, p.stdout
    assert "read 1048576/1048576 bytes at offset 0" in p.stdout, p.stdout


def test_qemu_io_fua_zero_discard_flush(memdisk):
    srv = memdisk("--latency-ms", "1", size="16M")
    cmds = [
        "write -P 0x11 0 4M",
        "write -f -P 0x22 1M 512k",     # FUA
        "write -z 2M 256k",             # WRITE_ZEROES
        "write -z -u 3M 256k",          # WRITE_ZEROES, may unmap
        "discard 3584k 64k",            # TRIM (reads back undefined)
        "flush",
        "read -P 0x11 0 1M",
        "read -P 0x22 1M 512k",
        "read -P 0x11 1536k 512k",
        "read -P 0 2M 256k",
        "read -P 0x11 2304k 768k",
        "read -P 0 3M 256k",
        "read -P 0x11 3328k 256k",
        "read -P 0x11 3648k 448k",
        "aio_write -P 0x33 8M 1M",
        "aio_write -P 0x44 9M 1M",
        "aio_flush",
        "read -P 0x33 8M 1M",
        "read -P 0x44 9M 1M",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    p = run_tool(argv + [srv.uri], srv)
    out = p.stdout + p.stderr
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower(), out
    assert out.count("read ") == 10, out


def test_nbdcopy_roundtrip(memdisk, tmp_path):
    """nbdcopy: several connections (multi-conn) with many requests in
    flight each."""
    if shutil.which("nbdcopy") is None:
        pytest.fail("nbdcopy (libnbd-bin) is not installed")
    srv = memdisk("--latency-ms", "2", size="32M")
    src = tmp_path / "src.img"
    out = tmp_path / "out.img"
    write_random_image(src, 32 * MiB, holes=[(4 * MiB, 4 * MiB)])
    run_tool(["nbdcopy", "--connections=4", "--requests=64",
              src, srv.uri], srv)
    run_tool(["nbdcopy", "--connections=4", "--requests=64",
              srv.uri, out], srv)
    assert out.read_bytes() == src.read_bytes()
