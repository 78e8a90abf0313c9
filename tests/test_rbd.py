"""build/rbd-gateway in front of a real Ceph cluster (tests/ceph.py: one
mon and one in-memory OSD on 127.0.0.1, started once for this module and
always stopped), driven by real clients: qemu-img, fio's nbd engine,
nbdcopy, nbdinfo and libnbd. What the gateway writes is read back with
`rbd export`, straight from Ceph.
"""

import json
import os
import signal
import subprocess
import time

import nbd
import pytest

from ceph import CephCluster
from support import ROOT, HarnessProcess, noise, tool_env

GATEWAY = ROOT / "build" / "rbd-gateway"
POOL = "rbd"
KiB = 1 << 10
MiB = 1 << 20
TOOL_TIMEOUT = 120

@pytest.fixture(scope="module")
def cluster():
    assert GATEWAY.exists(), "build/rbd-gateway is missing: `make check` installs librbd-dev and builds it"
    with CephCluster() as c:
        c.create_pool(POOL)
        yield c


class Gateway(HarnessProcess):
    name = "rbd-gateway"

    def __init__(self, cluster, *args):
        super().__init__(GATEWAY, args, before=("--pool", POOL, "--conf", cluster.conf_path),
                         prefix="nbdka-rbd-", asan=False)
        self.wait_for(lambda: "nbd" in self.out(), 30, "the URI line")
        self.uri = self.out().splitlines()[0]

    def uri_for(self, export):
        return "nbd+unix:///%s?socket=%s" % (export, self.sock)

    def stop(self):
        self.send(signal.SIGTERM)
        rc = self.wait_exit(30)
        assert rc == 0, "exit status %s\n%s" % (rc, self.report())
        assert "panicked" not in self.err() and "internal error" not in self.err(), self.report()


@pytest.fixture
def gateway(cluster):
    running = []

    def start(*args):
        g = Gateway(cluster, *args)
        running.append(g)
        return g

    yield start
    for g in running:
        g.cleanup()


def image(cluster, name, size=64 * MiB):
    cluster.create_image(POOL, name, size)
    return name


def run(argv, timeout=TOOL_TIMEOUT, **kw):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                       timeout=timeout, env=tool_env(), **kw)
    assert p.returncode == 0, "%s failed (%d)\n%s%s" % (argv[0], p.returncode, p.stdout, p.stderr)
    return p.stdout


def connect(gw, export):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(gw.sock)
    return h


def test_data_lands_in_ceph_and_multi_conn(cluster, gateway):
    """Writes through the gateway are in the image (`rbd export` sees them)
    and data Ceph holds reads back through it. Connections to one image
    share it, so CAN_MULTI_CONN is advertised and a flush on one
    connection covers the writes of another."""
    name = image(cluster, "basic", 16 * MiB)
    cluster.write_image(POOL, name, 8 * MiB, b"from ceph" * 100)
    gw = gateway("--image", name)
    a, b = connect(gw, name), connect(gw, "")          # "" is --image
    assert a.can_multi_conn() and a.can_flush() and a.can_fua()
    assert a.get_size() == 16 * MiB
    assert a.pread(900, 8 * MiB) == b"from ceph" * 100
    a.flush()       # librbd's cache is write-through until the first flush
    data = noise(1, 1 * MiB)
    a.pwrite(data, 1 * MiB)
    b.pwrite(b"\x77" * 4096, 3 * MiB, nbd.CMD_FLAG_FUA)
    b.flush()       # covers a's write too: both share one open image
    exported = cluster.read_image(POOL, name)
    assert exported[1 * MiB:2 * MiB] == data
    assert exported[3 * MiB:3 * MiB + 4096] == b"\x77" * 4096
    a.shutdown()
    b.shutdown()
    gw.stop()


def test_export_list_is_the_pools_images(cluster, gateway):
    """NBD_OPT_LIST (nbdinfo --list) shows exactly the pool's images."""
    image(cluster, "listed-a", 4 * MiB)
    image(cluster, "listed-b", 4 * MiB)
    gw = gateway()
    out = json.loads(run(["nbdinfo", "--list", "--json", gw.uri_for("")]))
    names = sorted(e["export-name"] for e in out["exports"])
    pool = sorted(cluster.rbd("ls", POOL).split())
    assert names == pool and "listed-a" in names, (names, pool)
    gw.stop()


def test_snapshot_is_served_read_only(cluster, gateway):
    """IMAGE@SNAP serves the snapshot's data, read-only; the image itself
    moves on."""
    name = image(cluster, "snapped", 8 * MiB)
    gw = gateway()
    h = connect(gw, name)
    h.pwrite(b"before" * 100, 0)
    h.flush()
    cluster.snapshot(POOL, name, "s1")
    h.pwrite(b"after!" * 100, 0)
    h.shutdown()
    s = connect(gw, name + "@s1")
    assert s.is_read_only()
    assert s.pread(600, 0) == b"before" * 100
    with pytest.raises(nbd.Error):
        s.pwrite(b"x" * 512, 0)
    s.shutdown()
    assert cluster.read_image(POOL, name)[:600] == b"after!" * 100
    gw.stop()


def test_unknown_image_is_refused(cluster, gateway):
    gw = gateway()
    h = nbd.NBD()
    h.set_export_name("no-such-image")
    with pytest.raises(nbd.Error) as e:
        h.connect_unix(gw.sock)
    assert "no export named" in str(e.value), e.value
    gw.stop()


def test_qemu_img_convert_in_and_out(cluster, gateway, tmp_path):
    """qemu-img convert a sparse image in through the gateway and back
    out; qemu-img compare says they are identical, and block status
    (nbdinfo --map) shows the hole Ceph has."""
    name = image(cluster, "qemu", 32 * MiB)
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(noise(2, 8 * MiB))
        f.seek(24 * MiB)
        f.write(noise(3, 8 * MiB))
    gw = gateway()
    uri = gw.uri_for(name)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri])
    back = tmp_path / "back.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, back])
    extents = json.loads(run(["nbdinfo", "--map", "--json", uri]))
    holes = [e for e in extents if e["type"] & 1]
    assert any(e["offset"] <= 12 * MiB and e["offset"] + e["length"] >= 20 * MiB
               for e in holes), extents
    gw.stop()


def test_fio_verify_qd256(cluster, gateway, tmp_path):
    """fio's nbd engine, 4 KiB random writes then reads with crc32c
    verification, at queue depth 256: no errors, no verify failures."""
    name = image(cluster, "fio", 32 * MiB)
    gw = gateway()
    out = tmp_path / "fio.json"
    run(["fio", "--name=rbd-verify", "--ioengine=nbd", "--uri=" + gw.uri_for(name),
         "--rw=randwrite", "--bs=4k", "--iodepth=256", "--size=16M",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
         "--output-format=json", "--output=%s" % out], cwd=tmp_path)
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == 16 * MiB and job["read"]["io_bytes"] == 16 * MiB, job
    gw.stop()


def test_nbdcopy_several_connections(cluster, gateway, tmp_path):
    """nbdcopy with 4 connections into the image and back out."""
    name = image(cluster, "copy", 32 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(noise(4, 32 * MiB))
    gw = gateway()
    uri = gw.uri_for(name)
    run(["nbdcopy", "--connections=4", "--requests=32", src, uri])
    back = tmp_path / "back.raw"
    run(["nbdcopy", "--connections=4", uri, back])
    assert back.read_bytes() == src.read_bytes()
    assert cluster.read_image(POOL, name) == src.read_bytes()
    gw.stop()


def test_osd_down_and_back(cluster, gateway):
    """With the OSD stopped, requests in flight end with an error by the
    request timeout, never a hang; a client that leaves meanwhile harms
    nothing although librbd still holds its requests (and their buffers).
    Once the OSD is back, I/O resumes on the same gateway."""
    name = image(cluster, "outage", 8 * MiB)
    gw = gateway("--request-timeout-ms", "1500")
    h = connect(gw, name)
    h.pwrite(b"\x42" * 4096, 0)
    h.flush()
    leaver = connect(gw, name)
    cluster.stop_osd()
    try:
        bufs = [nbd.Buffer(4096) for _ in range(8)]
        cookies = [h.aio_pread(b, i * 64 * KiB) for i, b in enumerate(bufs)]
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(b"\x43" * 4096), MiB))
        gone = [leaver.aio_pread(nbd.Buffer(4096), 2 * MiB) for _ in range(4)]
        del leaver                             # leaves with requests inside librbd
        t0 = time.monotonic()
        while h.aio_in_flight() > 0 and time.monotonic() - t0 < 10:
            h.poll(100)
        assert h.aio_in_flight() == 0, "requests hang while the OSD is down"
        failed = []
        for c in cookies:
            try:
                h.aio_command_completed(c)
                failed.append(False)
            except nbd.Error:
                failed.append(True)
        # Every read fails; the write may complete from librbd's writeback
        # cache (it reaches the OSD on the next flush).
        assert all(failed[:8]), failed
        assert gw.alive(), gw.report()
        assert gone
    finally:
        cluster.start_osd()
    # I/O resumes, on a new connection and on the old one.
    deadline = time.monotonic() + 30
    while True:
        try:
            h2 = connect(gw, name)
            assert h2.pread(4096, 0) == b"\x42" * 4096
            break
        except (nbd.Error, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    h2.pwrite(b"\x44" * 4096, 2 * MiB)
    assert h2.pread(4096, 2 * MiB) == b"\x44" * 4096
    h2.shutdown()
    h.shutdown()
    gw.stop()
