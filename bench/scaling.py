#!/usr/bin/python3
"""How memdisk's cost grows with the work, in one run:

  idle       1,000 and 10,000 connections that finished the handshake and
             send nothing: server memory per connection, and the server's
             CPU while they sit idle (it should be none);
  spread     the same total queue depth (256 4 KiB random reads, 0 ms)
             spread over 1 to 256 connections: server CPU per IO and IOPS,
             with one event loop and with two (--loops 2).

    /usr/bin/python3 bench/scaling.py [--runtime 3] [--out bench/results]

Output: scaling-<timestamp>.{md,json,svg} and scaling-latest.{md,json,svg}.
Standard library only; needs fio.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import BenchError, proc_cpu_seconds, proc_status, run_fio  # noqa: E402

MEMDISK = ROOT / "build" / "memdisk"
DEFAULT_OUT = ROOT / "bench" / "results"
NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_EXPORT_NAME, FLAG_NO_ZEROES = 1, 2
IDLE_COUNTS = [1000, 10000]
SPREAD = [1, 4, 16, 64, 256]
TOTAL_DEPTH = 256


class Memdisk:
    def __init__(self, tmp, *args):
        self.sock = tmp / "md.sock"
        self.err = open(tmp / "md.stderr", "wb")
        self.p = subprocess.Popen([str(MEMDISK), "--unix", str(self.sock), "--size", "256M", *args],
                                  stdout=subprocess.PIPE, stderr=self.err, stdin=subprocess.DEVNULL)
        line = self.p.stdout.readline().decode()
        if not line.startswith("nbd"):
            raise BenchError("memdisk did not start")
        self.uri = line.strip()

    def rss_kib(self):
        return proc_status(self.p.pid)["VmRSS"]

    def cpu(self):
        return proc_cpu_seconds(self.p.pid)

    def stop(self):
        self.p.terminate()
        self.p.wait(30)
        self.err.close()


def handshake(path):
    """A client past NBD_OPT_EXPORT_NAME, then silent."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    got = b""
    while len(got) < 18:
        got += s.recv(18 - len(got))
    s.sendall(struct.pack(">I", 1 | FLAG_NO_ZEROES) + struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 0))
    got = b""
    while len(got) < 10:
        chunk = s.recv(10 - len(got))
        if not chunk:
            raise BenchError("server closed during the handshake")
        got += chunk
    return s


def idle(tmp, n):
    md = Memdisk(tmp, "--handshake-timeout-ms", "0")
    try:
        rss0 = md.rss_kib()
        # Each handshake returns once the server answered it: all n are
        # admitted and in transmission when the loop ends.
        conns = [handshake(md.sock) for _ in range(n)]
        rss1 = md.rss_kib()
        cpu0, t0 = md.cpu(), time.monotonic()
        time.sleep(5)                     # the measurement: 5 s of idling
        cpu1, t1 = md.cpu(), time.monotonic()
        for c in conns:
            c.close()
        return {"connections": n, "rss_kib_per_conn": (rss1 - rss0) / n,
                "idle_cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100}
    finally:
        md.stop()


def spread(tmp, jobs, loops, runtime):
    md = Memdisk(tmp, "--loops", str(loops))
    try:
        # Every page written once, so reads return data.
        run_fio(["fio", "--name=fill", "--ioengine=nbd", f"--uri={md.uri}", "--rw=write", "--bs=1M",
                 "--iodepth=16", "--size=256M", "--output-format=json", f"--output={tmp / 'fill.json'}"],
                tmp / "fill.json", 120)
        depth = TOTAL_DEPTH // jobs
        cpu0 = md.cpu()
        data, client_cpu, _ = run_fio(
            ["fio", "--name=spread", "--ioengine=nbd", f"--uri={md.uri}", "--rw=randread", "--bs=4k",
             f"--iodepth={depth}", f"--numjobs={jobs}", "--thread", "--group_reporting", "--size=256M",
             "--norandommap", "--randrepeat=0", "--time_based", f"--runtime={runtime}",
             "--output-format=json", f"--output={tmp / 'spread.json'}"], tmp / "spread.json", runtime * 4 + 60)
        cpu = md.cpu() - cpu0
        read = data["jobs"][0]["read"]
        ios = read["total_ios"]
        return {"connections": jobs, "depth_each": depth, "loops": loops, "iops": read["iops"],
                "server_cpu_per_io_us": cpu / ios * 1e6, "client_cpu_per_io_us": client_cpu / ios * 1e6}
    finally:
        md.stop()


def markdown(blob):
    out = [f"# How memdisk's cost grows ({blob['when']})", "",
           f"{blob['machine']}; fio {blob['fio']}; {blob['runtime']} s a point. fio shares the",
           "machine's two cores with the server: IOPS are what both together reach.", "",
           "## Idle connections", "",
           "Connections past the handshake that send nothing. Memory is the server's",
           "RSS growth divided by the connections; CPU is the server's over 5 s of",
           "idling, as a share of one core.", "",
           "| connections | RSS per connection | server CPU while idle |", "|---:|---:|---:|"]
    for r in blob["idle"]:
        out.append(f"| {r['connections']:,} | {r['rss_kib_per_conn']:.1f} KiB | {r['idle_cpu_pct']:.2f} % |")
    out += ["", f"## One queue depth ({TOTAL_DEPTH}) spread over more connections", "",
            "4 KiB random reads at 0 ms, the depth split evenly between the connections.", "",
            "| connections | QD each | loops | IOPS | server CPU/IO µs | fio CPU/IO µs |",
            "|---:|---:|---:|---:|---:|---:|"]
    for r in blob["spread"]:
        out.append(f"| {r['connections']} | {r['depth_each']} | {r['loops']} | {r['iops']:,.0f} | "
                   f"{r['server_cpu_per_io_us']:.1f} | {r['client_cpu_per_io_us']:.1f} |")
    return "\n".join(out) + "\n"


def svg(blob):
    """Server CPU per IO against connections (log scale), one line per loop count."""
    import math
    w, h, left, top, bottom = 640, 320, 60, 30, 40
    rows = blob["spread"]
    ymax = max(r["server_cpu_per_io_us"] for r in rows) * 1.15
    xs = sorted({r["connections"] for r in rows})

    def x(c):
        return left + (math.log(c) / math.log(xs[-1]) if xs[-1] > 1 else 0) * (w - left - 20)

    def y(v):
        return top + (1 - v / ymax) * (h - top - bottom)
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
          'font-size="11">',
          f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">memdisk server CPU per IO, '
          f'QD {TOTAL_DEPTH} over N connections</text>']
    for c in xs:
        el.append(f'<text x="{x(c):.1f}" y="{h - bottom + 16}" text-anchor="middle">{c}</text>')
    for i in range(5):
        v = ymax * i / 4
        el.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        el.append(f'<text x="{left - 5}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f} µs</text>')
    for loops, colour in ((1, "#d62728"), (2, "#1f77b4")):
        pts = [(x(r["connections"]), y(r["server_cpu_per_io_us"])) for r in rows if r["loops"] == loops]
        if pts:
            el.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                      % (colour, " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)))
            el.append(f'<text x="{pts[-1][0] - 5:.1f}" y="{pts[-1][1] - 6:.1f}" text-anchor="end" '
                      f'fill="{colour}">{loops} loop{"s" if loops > 1 else ""}</text>')
    el.append(f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle">connections</text>')
    el.append("</svg>")
    return "\n".join(el) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(IDLE_COUNTS) + 64               # each side holds one socket a connection
    if hard < want:
        sys.exit(f"need an open-file limit of {want}; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    with tempfile.TemporaryDirectory(prefix="scaling-") as d:
        tmp = Path(d)
        idle_rows = []
        for n in IDLE_COUNTS:
            print(f"  idle {n} ...", flush=True)
            idle_rows.append(idle(tmp, n))
        spread_rows = []
        for loops in (1, 2):
            for jobs in SPREAD:
                print(f"  spread {jobs} connections, {loops} loop(s) ...", flush=True)
                spread_rows.append(spread(tmp, jobs, loops, args.runtime))
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    blob = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "fio": fio,
            "runtime": args.runtime, "idle": idle_rows, "spread": spread_rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"scaling-{stamp}", "scaling-latest"):
        (args.out / f"{name}.json").write_text(json.dumps(blob, indent=1) + "\n")
        (args.out / f"{name}.md").write_text(markdown(blob))
        (args.out / f"{name}.svg").write_text(svg(blob))
    print(markdown(blob))


if __name__ == "__main__":
    main()
