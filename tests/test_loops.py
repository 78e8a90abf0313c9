"""Several event loops in one server (nbdkit_server_set_loops, memdisk
--loops N): connections spread over the loops' threads and are served
right, whatever loop they land on; shutdown drains every loop.

The other memdisk test modules also run with MEMDISK_LOOPS=2 in
`make check` (see the Makefile), so the whole real-client matrix covers a
server with several loops too."""

import os
import signal
import subprocess
import time

import nbd
import pytest

from support import noise, tool_env

MiB = 1 << 20
KiB = 1 << 10


def loop_threads(pid):
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return sorted(n for n in names if n.startswith("nbdkit-loop-"))


def wait_in_flight(srv, hs, n, timeout=10):
    """Until the server's counters (memdisk prints them on SIGUSR1) show
    n requests handed to the plugin."""
    deadline = time.monotonic() + timeout
    while True:
        srv.send_signal(signal.SIGUSR1)
        for h in hs:
            h.poll(0)                       # keep libnbd sending
        time.sleep(0.02)
        lines = [l for l in srv.stderr().splitlines() if l.startswith("memdisk: connections")]
        if lines and f"in flight {n}," in lines[-1]:
            return
        assert time.monotonic() < deadline, f"never {n} in flight: {lines[-1:]}"


@pytest.mark.parametrize("loops", [2, 4])
def test_connections_spread_over_loops(memdisk, loops):
    """Eight clients on a server with N loops: the loops run as threads of
    their own; every client sees every other client's writes (one disk,
    whatever loop serves it); flush and FUA work on each."""
    srv = memdisk("--loops", str(loops), size="32M")
    hs = [srv.connect() for _ in range(8)]
    # Served clients mean the main loop runs, so every other loop does.
    assert loop_threads(srv.pid) == [f"nbdkit-loop-{i}" for i in range(1, loops)]
    for i, h in enumerate(hs):
        h.pwrite(noise(i, 64 * KiB), i * MiB, nbd.CMD_FLAG_FUA)
    for i, h in enumerate(hs):
        h.flush()
        other = hs[(i + 3) % len(hs)]
        assert other.pread(64 * KiB, i * MiB) == noise(i, 64 * KiB)
    for h in hs:
        h.shutdown()


def test_deep_queues_on_several_loops(memdisk):
    """4 clients x 500 reads at 50 ms latency on 2 loops: all done in
    about one latency, not a queue's worth."""
    srv = memdisk("--loops", "2", "--latency-ms", "50", size="8M")
    hs = [srv.connect() for _ in range(4)]
    for h in hs:
        h.pwrite(noise(7, 2 * MiB), 0)
    bufs, cookies = [], []
    t0 = time.monotonic()
    for h in hs:
        mine = []
        for i in range(500):
            b = nbd.Buffer(4 * KiB)
            bufs.append((b, i))
            mine.append(h.aio_pread(b, (i * 4 * KiB) % (2 * MiB)))
        cookies.append(mine)
    for h, mine in zip(hs, cookies):
        while h.aio_in_flight() > 0:
            h.poll(1000)
            assert time.monotonic() - t0 < 20, "reads still in flight after 20 s"
        for c in mine:
            assert h.aio_command_completed(c)
    took = time.monotonic() - t0
    data = noise(7, 2 * MiB)
    for b, i in bufs:
        off = (i * 4 * KiB) % (2 * MiB)
        assert b.to_bytearray() == data[off:off + 4 * KiB]
    assert took < 5, f"2000 reads at 50 ms took {took:.1f} s"
    for h in hs:
        h.shutdown()


def test_qemu_img_and_nbdcopy_on_several_loops(memdisk, tmp_path):
    """nbdcopy with 4 connections (spread over 2 loops) in and out, and
    qemu-img compare of the result."""
    srv = memdisk("--loops", "2", size="32M")
    src = tmp_path / "src.raw"
    src.write_bytes(noise(3, 32 * MiB))
    env = tool_env()
    subprocess.run(["nbdcopy", "--connections=4", str(src), srv.uri], check=True, timeout=60, env=env)
    out = tmp_path / "out.raw"
    subprocess.run(["nbdcopy", "--connections=4", srv.uri, str(out)], check=True, timeout=60, env=env)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(out)], check=True,
                   timeout=60, env=env)


def test_shutdown_drains_every_loop(memdisk):
    """SIGTERM with reads in flight on every loop: each is answered (not
    dropped) and the server exits 0 (the fixture checks the status)."""
    srv = memdisk("--loops", "3", "--latency-ms", "1000", size="8M")
    hs = [srv.connect() for _ in range(6)]
    cookies = [[h.aio_pread(nbd.Buffer(4 * KiB), i * 8 * KiB) for i in range(50)] for h in hs]
    wait_in_flight(srv, hs, 300)
    srv.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for h, mine in zip(hs, cookies):
        while h.aio_in_flight() > 0:
            assert time.monotonic() < deadline, "ops in flight were not answered at shutdown"
            h.poll(1000)
        for c in mine:
            assert h.aio_command_completed(c), "an op in flight was dropped"
    srv.wait()
