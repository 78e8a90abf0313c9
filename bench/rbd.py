#!/usr/bin/python3
"""build/rbd-gateway against librbd itself, on a real (throw-away) Ceph
cluster, side by side in one run.

For each regime (the local in-memory OSD, and a remote-like cluster whose
librados clients get every OSD reply delayed by up to 20 ms) and each
point (4 KiB random reads and writes at queue depth 1, 64, 256; 1 MiB
sequential reads at depth 16), it runs:

  gateway    fio's nbd engine -> build/rbd-gateway -> librbd -> the OSD
  rbd bench  librbd's own benchmark at the same size and depth: the
             ceiling, with no NBD in between

and records IOPS, MiB/s, the gateway's CPU per IO, rbd bench's CPU per IO
(librbd's own cost), their difference (what NBD and the gateway add), and
the gateway's threads (its own, by name, and librbd's).

    /usr/bin/python3 bench/rbd.py                  # both regimes, 5 s a point
    /usr/bin/python3 bench/rbd.py --quick          # 2 s a point
    make bench-rbd

Output (bench/results/ unless --out): rbd-<timestamp>.{md,json,svg} and
rbd-latest.{md,json,svg}. Standard library only; needs the Ceph packages
(tests/install-deps.sh) and fio.
"""

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from ceph import CephCluster                                # noqa: E402
from run import (BenchError, Sampler, client_env, proc_cpu_seconds,  # noqa: E402
                 run_fio)

GATEWAY = ROOT / "build" / "rbd-gateway"
DEFAULT_OUT = ROOT / "bench" / "results"
POOL, IMAGE = "rbd", "bench"
IMAGE_SIZE = 256 << 20
REMOTE_DELAY = 0.02            # ms inject delay max, seconds

# (name, fio rw, rbd bench io-type, io-pattern, block size, depth)
POINTS = [
    ("randread", "randread", "read", "rand", "4K", 1),
    ("randread", "randread", "read", "rand", "4K", 64),
    ("randread", "randread", "read", "rand", "4K", 256),
    ("randwrite", "randwrite", "write", "rand", "4K", 1),
    ("randwrite", "randwrite", "write", "rand", "4K", 64),
    ("randwrite", "randwrite", "write", "rand", "4K", 256),
    ("seqread", "read", "read", "seq", "1M", 16),
]


def size_bytes(s):
    return int(s[:-1]) << {"K": 10, "M": 20}[s[-1]]


def thread_names(pid):
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def run_gateway(cluster, conf, point, runtime, tmp):
    """fio through the gateway: (IOPS, MiB/s, gateway CPU s, IOs, threads)."""
    name, rw, _, _, bs, depth = point
    sock = tmp / "gw.sock"
    err = open(tmp / "gw.stderr", "wb")
    gw = subprocess.Popen([str(GATEWAY), "--pool", POOL, "--image", IMAGE, "--conf", conf,
                           "--unix", str(sock)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=err)
    err.close()
    try:
        line = gw.stdout.readline().decode()
        if not line.startswith("nbd"):
            raise BenchError("rbd-gateway did not start: " + (tmp / "gw.stderr").read_text()[-800:])
        uri = line.strip()
        sampler = Sampler(gw.pid)
        sampler.start()
        cpu0 = proc_cpu_seconds(gw.pid)
        json_path = tmp / "fio.json"
        argv = ["fio", "--name=rbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                f"--bs={bs}", f"--iodepth={depth}", "--norandommap", "--randrepeat=0",
                f"--size={IMAGE_SIZE}", "--time_based", f"--runtime={runtime}",
                "--output-format=json", f"--output={json_path}"]
        data, _, _ = run_fio(argv, json_path, runtime * 4 + 60)
        cpu = proc_cpu_seconds(gw.pid) - cpu0
        names = thread_names(gw.pid)
        sampler.stop()
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(60)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait()
    job = data["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    ios = side["total_ios"]
    ours = sum(1 for n in names if n == "rbd-gateway")
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / (1 << 20), "cpu_s": cpu,
            "ios": ios, "threads": len(names), "own_threads": ours,
            "cpu_per_io_us": cpu / ios * 1e6 if ios else None}


def run_rbd_bench(cluster, conf, point, seconds_hint, iops_hint, tmp):
    """librbd alone: rbd bench for about as long as fio ran."""
    name, _, io_type, pattern, bs, depth = point
    total = max(int(iops_hint * seconds_hint), 200) * size_bytes(bs)
    if pattern == "seq":
        total = min(total, IMAGE_SIZE)
    argv = ["rbd", "--conf", conf, "bench", "--io-type", io_type, "--io-size", bs,
            "--io-threads", str(depth), "--io-total", str(total), "--io-pattern", pattern,
            f"{POOL}/{IMAGE}"]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=client_env())
    out = p.stdout.read().decode(errors="replace")
    _, status, rusage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    m = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)\s+bytes/sec:\s*([\d.]+)", out)
    if p.returncode != 0 or not m:
        raise BenchError("rbd bench failed: " + out[-800:])
    ops = int(m.group(2))
    cpu = rusage.ru_utime + rusage.ru_stime
    return {"iops": float(m.group(3)), "mibs": float(m.group(4)) / (1 << 20), "cpu_s": cpu,
            "ios": ops, "wall_s": wall, "cpu_per_io_us": cpu / ops * 1e6}


def prefill(cluster, conf):
    """Every object written once, so reads hit data, not holes."""
    subprocess.run(["rbd", "--conf", conf, "bench", "--io-type", "write", "--io-size", "4M",
                    "--io-threads", "16", "--io-total", str(IMAGE_SIZE), "--io-pattern", "seq",
                    f"{POOL}/{IMAGE}"], check=True, capture_output=True, timeout=600)


def measure(args):
    rows = []
    with CephCluster() as cluster:
        cluster.create_pool(POOL)
        cluster.create_image(POOL, IMAGE, IMAGE_SIZE)
        with tempfile.TemporaryDirectory(prefix="rbd-bench-") as d:
            tmp = Path(d)
            local = cluster.write_client_conf(str(tmp / "local.conf"))
            remote = cluster.write_client_conf(str(tmp / "remote.conf"), delay_max=REMOTE_DELAY)
            for conf in (local, remote):
                # Both sides go to the OSD for every write: librbd's cache
                # is write-through until a client's first flush, which
                # rbd bench sends and fio does not.
                with open(conf, "a") as f:
                    f.write("\n[client]\nrbd cache = false\n")
            prefill(cluster, local)
            for regime, conf in (("local", local), ("remote-like", remote)):
                if regime not in args.regimes:
                    continue
                for point in POINTS:
                    label = f"{regime} {point[0]} {point[4]} QD{point[5]}"
                    print(f"  {label} ...", end="", flush=True)
                    gw = run_gateway(cluster, conf, point, args.runtime, tmp)
                    rb = run_rbd_bench(cluster, conf, point, args.runtime, gw["iops"], tmp)
                    rows.append({"regime": regime, "workload": point[0], "bs": point[4],
                                 "depth": point[5], "gateway": gw, "rbd_bench": rb,
                                 "ratio": gw["iops"] / rb["iops"] if rb["iops"] else None})
                    print(f" gateway {gw['iops']:.0f} IOPS, rbd bench {rb['iops']:.0f}"
                          f" ({rows[-1]['ratio']:.2f}x)", flush=True)
    return rows


def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(blob):
    rows = blob["rows"]
    out = [f"# rbd-gateway vs librbd ({blob['when']})", "",
           f"{blob['machine']}; Ceph {blob['ceph']}; fio {blob['fio']}; {blob['runtime']} s a point.",
           "One mon and one OSD on the in-memory object store, on this machine. In the",
           "local regime OSD, librbd, fio and the gateway share its cores, so every",
           "number is CPU-bound. In the remote-like regime the librados clients get",
           f"each OSD reply delayed by a random 0-{REMOTE_DELAY * 1000:.0f} ms (`ms inject delay`),",
           "as across a network. qemu-nbd's rbd driver is not measured: Debian 12's",
           "qemu-block-extra (7.2) does not load into the qemu-nbd installed here (10.0).",
           "librbd's cache is off for both (`rbd cache = false`): it is write-through",
           "until a client's first flush, which rbd bench sends and fio does not.",
           "",
           "CPU per IO: the gateway process's CPU (fio excluded), rbd bench's",
           "(librbd's own cost, plus its small driver), and the difference: what",
           "NBD and the gateway add per IO. At a few hundred IOPS and below, CPU per",
           "IO is mostly librados's own timers and wake-ups, and the difference is",
           "noise (it can come out negative). Own threads: threads named rbd-gateway",
           "(the loop, block status, signals); the rest are librbd's.", ""]
    for regime in ("local", "remote-like"):
        sel = [r for r in rows if r["regime"] == regime]
        if not sel:
            continue
        out += [f"## {regime}", "",
                "| workload | QD | gateway IOPS | rbd bench IOPS | ratio | gateway MiB/s | "
                "gateway CPU/IO µs | rbd bench CPU/IO µs | added µs | threads (own) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sel:
            g, b = r["gateway"], r["rbd_bench"]
            added = (g["cpu_per_io_us"] - b["cpu_per_io_us"]
                     if g["cpu_per_io_us"] is not None else None)
            out.append(f"| {r['workload']} {r['bs']} | {r['depth']} | {fmt(g['iops'], 0)} | "
                       f"{fmt(b['iops'], 0)} | {fmt(r['ratio'], 2)} | {fmt(g['mibs'])} | "
                       f"{fmt(g['cpu_per_io_us'])} | {fmt(b['cpu_per_io_us'])} | {fmt(added)} | "
                       f"{g['threads']} ({g['own_threads']}) |")
        out.append("")
    goal = [r for r in rows if r["regime"] == "remote-like" and r["depth"] == 256]
    if goal:
        out += ["## Goal", "",
                "At QD 256 in the remote-like regime the gateway should give at least",
                "90 % of rbd bench's IOPS, with at most 4 threads of its own:", ""]
        for r in goal:
            ok = r["ratio"] >= 0.9 and r["gateway"]["own_threads"] <= 4
            out.append(f"- {r['workload']} 4K: {r['ratio'] * 100:.0f} % of rbd bench, "
                       f"{r['gateway']['own_threads']} own threads: {'PASS' if ok else 'MISS'}")
        out.append("")
    return "\n".join(out)


def svg(blob):
    """Grouped bars: gateway and rbd bench IOPS per point, one panel per
    regime, log scale."""
    import math
    rows = blob["rows"]
    regimes = [g for g in ("local", "remote-like") if any(r["regime"] == g for r in rows)]
    w, ph, left, top = 760, 260, 70, 40
    h = top + len(regimes) * (ph + 60)
    vmax = max(max(r["gateway"]["iops"], r["rbd_bench"]["iops"]) for r in rows)
    top_decade = 10 ** math.ceil(math.log10(max(vmax, 10)))
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
          f'font-family="sans-serif" font-size="11">',
          f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">'
          f'rbd-gateway (fio nbd) vs rbd bench: IOPS, log scale</text>']
    for pi, regime in enumerate(regimes):
        y0 = top + pi * (ph + 60)
        sel = [r for r in rows if r["regime"] == regime]
        el.append(f'<text x="{left}" y="{y0 + 12}" font-size="12">{regime}</text>')
        base = y0 + ph

        def ypos(v):
            v = max(v, 1)
            return base - (math.log10(v) / math.log10(top_decade)) * (ph - 20)
        d = 1
        while d <= top_decade:
            y = ypos(d)
            el.append(f'<line x1="{left}" x2="{w - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            el.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{d:,}</text>')
            d *= 10
        slot = (w - left - 20) / len(sel)
        for i, r in enumerate(sel):
            x = left + 10 + i * slot
            for j, (key, colour) in enumerate((("gateway", "#1f77b4"), ("rbd_bench", "#ff7f0e"))):
                v = r[key]["iops"]
                y = ypos(v)
                el.append(f'<rect x="{x + j * slot * 0.4:.1f}" y="{y:.1f}" width="{slot * 0.38:.1f}" '
                          f'height="{base - y:.1f}" fill="{colour}"/>')
            el.append(f'<text x="{x + slot * 0.4:.1f}" y="{base + 14}" text-anchor="middle">'
                      f'{r["workload"]} {r["bs"]}</text>')
            el.append(f'<text x="{x + slot * 0.4:.1f}" y="{base + 27}" text-anchor="middle">'
                      f'QD{r["depth"]} {r["ratio"]:.2f}x</text>')
    el.append(f'<rect x="{w - 200}" y="28" width="10" height="10" fill="#1f77b4"/>'
              f'<text x="{w - 185}" y="37">gateway</text>'
              f'<rect x="{w - 120}" y="28" width="10" height="10" fill="#ff7f0e"/>'
              f'<text x="{w - 105}" y="37">rbd bench</text>')
    el.append("</svg>")
    return "\n".join(el)


def version(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds of fio per point")
    ap.add_argument("--quick", action="store_true", help="2 s a point")
    ap.add_argument("--regimes", default="local,remote-like")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite the .md and .svg of an earlier run")
    args = ap.parse_args()
    if args.render:
        blob = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(blob) + "\n")
        args.render.with_suffix(".svg").write_text(svg(blob) + "\n")
        return
    if args.quick:
        args.runtime = 2
    args.regimes = args.regimes.split(",")
    if not GATEWAY.exists():
        sys.exit("build/rbd-gateway is missing: run make first")
    rows = measure(args)
    blob = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "ceph": version(["ceph", "--version"]).split(" (")[0].replace("ceph version ", ""),
            "fio": version(["fio", "--version"]), "runtime": args.runtime, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"rbd-{stamp}", "rbd-latest"):
        (args.out / f"{name}.json").write_text(json.dumps(blob, indent=1) + "\n")
        (args.out / f"{name}.md").write_text(markdown(blob) + "\n")
        (args.out / f"{name}.svg").write_text(svg(blob) + "\n")
    print(markdown(blob))


if __name__ == "__main__":
    main()
