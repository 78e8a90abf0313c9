"""Smoke test of the benchmark script bench/run.py, so that it cannot rot.

One tiny point per server (0 ms, QD 32, 4 KiB random reads, 1 s of fio on
a 64 MiB disk): the numbers are meaningless, only their shape is checked.
The real numbers live in bench/results/ (`make bench`).
"""

import importlib.util
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import ROOT, require_memdisk
from support import tool_env

RUN_PY = ROOT / "bench" / "run.py"
SERVERS = ["memdisk", "nbdkit-t16", "nbdkit-tqd", "qemu-nbd"]
SVG_NS = "{http://www.w3.org/2000/svg}"


def load_run_module():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def processes_mentioning(text):
    """PIDs whose command line contains text."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append((int(pid), cmd))
    return found


def test_bench_tiny_run(tmp_path):
    require_memdisk()
    out = tmp_path / "results"
    p = subprocess.run(["/usr/bin/python3", str(RUN_PY), "--tiny",
                        "--out", str(out)],
                       cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=120, env=tool_env())
    assert p.returncode == 0, (
        f"bench/run.py --tiny exited {p.returncode}\n"
        f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")

    # Timestamped files and the latest.* copies.
    stamped = sorted(out.glob("bench-*.json"))
    assert len(stamped) == 1, list(out.iterdir())
    for suffix in (".md", ".svg"):
        assert stamped[0].with_suffix(suffix).exists()
    for name in ("latest.md", "latest.json", "latest.svg"):
        assert (out / name).stat().st_size > 0, name

    data = json.loads((out / "latest.json").read_text())
    env_info = data["environment"]
    assert env_info["cores"] >= 1 and env_info["cpu_model"]
    rows = data["results"]
    assert sorted(r["server"] for r in rows) == sorted(SERVERS), rows
    for r in rows:
        where = f"{r['label']}: {r}"
        assert "error" not in r, where
        assert r["iops"] > 0 and r["ios"] > 0, where
        assert r["threads_peak"] > 0, where
        assert r["rss_peak_mib"] > 0 and r["hwm_mib"] > 0, where
        assert 0 <= r["rss_overhead_mib"] <= r["rss_peak_mib"], where
        assert r["others_cpu_pct"] >= 0, where
        assert r["lat_mean_ms"] > 0 and r["lat_p99_ms"] >= r["lat_mean_ms"] * 0.1
        assert r["server_cpu_us_per_io"] >= 0, where
        assert r["client_cpu_s"] > 0, where
        assert r["samples"] >= 1, where
    by = {r["server"]: r for r in rows}
    # The event-loop server stays on a handful of threads; nbdkit runs -t.
    assert by["memdisk"]["threads_peak"] <= 8, by["memdisk"]
    assert by["nbdkit-t16"]["threads_peak"] >= 16, by["nbdkit-t16"]
    assert by["nbdkit-tqd"]["nbdkit_threads"] == 32

    md = (out / "latest.md").read_text()
    assert "only the\nratios between servers within one run count" in md
    assert env_info["cpu_model"] in md
    table_rows = [line for line in md.splitlines()
                  if line.startswith("| 0 | 32 |")]
    labels = [line.split("|")[3].strip() for line in table_rows]
    assert sorted(labels) == sorted(["memdisk", "nbdkit -t16", "nbdkit -t32",
                                     "qemu-nbd"]), table_rows
    for line in table_rows:
        iops = float(line.split("|")[4].strip().replace(",", ""))
        assert iops > 0, line
    assert "## Targets (issue 5)" in md and "not measured" in md

    root = ET.parse(out / "latest.svg").getroot()
    assert root.tag == f"{SVG_NS}svg"
    assert len(root.findall(f".//{SVG_NS}circle")) >= len(SERVERS)

    # Every server was stopped and its private directory removed.
    for r in rows:
        sock = r["argv"][r["argv"].index("--unix" if "--unix" in r["argv"]
                                         else "-U" if "-U" in r["argv"]
                                         else "-k") + 1]
        assert not Path(sock).parent.exists(), sock
        assert processes_mentioning(sock) == [], sock


def row(server, workload, lat, qd, iops, cpu_us, threads=3, rss=10.0,
        growth=1.0, mib_s=None, jobs=1):
    r = {"server": server, "workload": workload, "latency_ms": lat,
         "depth": qd, "jobs": jobs, "total_depth": qd * jobs,
         "label": server, "iops": iops, "mib_s": mib_s or iops / 256,
         "server_cpu_us_per_io": cpu_us, "threads_peak": threads,
         "rss_peak_mib": rss, "rss_growth_mib": growth, "hwm_mib": rss,
         "rss_overhead_mib": growth, "others_cpu_pct": 0,
         "lat_mean_ms": 1.0, "lat_p99_ms": 2.0, "in_flight": qd * jobs,
         "server_cpu_pct": 10, "client_cpu_us_per_io": 5,
         "client_cpu_pct": 50, "server_exit": 0}
    if lat > 0:
        r["little_bound_iops"] = qd * jobs / (lat / 1000)
        r["pct_of_bound"] = iops / r["little_bound_iops"] * 100
    return r


def test_bench_targets_and_plot_from_synthetic_rows():
    """The targets section and the SVG from made-up numbers: no servers."""
    run = load_run_module()
    rows = [
        row("memdisk", "randread", 50, 1024, 20000, 5),          # 97.7 %
        row("memdisk", "randread", 10, 4096, 90000, 5, growth=10),
        row("nbdkit-tqd", "randread", 10, 4096, 30000, 30, threads=4098,
            growth=40),
        row("memdisk", "randread", 10, 1024, 80000, 6),
        row("nbdkit-tqd", "randread", 10, 1024, 30000, 35, threads=1026),
        row("nbdkit-t16", "randread", 10, 1024, 1600, 40, threads=18),
        row("memdisk", "randread", 0, 64, 90000, 6),
        row("nbdkit-t16", "randread", 0, 64, 80000, 8, threads=18),
        row("memdisk", "seqread", 0, 64, 2000, 300, mib_s=2000),
        row("nbdkit-t16", "seqread", 0, 64, 2000, 300, mib_s=2000),
        row("memdisk", "multiconn", 10, 256, 70000, 5, jobs=4),
        row("memdisk-cap", "randread", 10, 4096, 60000, 5),
    ]
    text = "\n".join(run.targets(rows))
    assert "(a)" in text and "97.7 %" in text
    assert text.count("PASS") >= 5, text        # a, a-threads, b, b-rss, c1
    assert "(c2)" in text and "0.75" in text and "MISS" in text
    assert "(d)" in text and "1.00×" in text
    assert "(b′)" in text and "60,000 IOPS = 2.00×" in text
    assert "not measured" not in text

    empty = "\n".join(run.targets([]))
    assert empty.count("not measured") == 5

    svg = run.svg_plot(rows, "synthetic <&> run")
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    assert len(root.findall(f".//{SVG_NS}circle")) == 11
    assert len(root.findall(f".//{SVG_NS}rect")) >= 2


def test_bench_dry_run_plans_the_full_matrix():
    p = subprocess.run(["/usr/bin/python3", str(RUN_PY), "--dry-run"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    runs = [line for line in p.stdout.splitlines() if line.startswith("run ")]
    skips = [line for line in p.stdout.splitlines() if line.startswith("skip")]
    assert len(runs) > 100 and skips
    # qemu-nbd only without latency; nbdkit -tQD only above QD 16.
    assert not any("qemu-nbd" in r and r.split()[3] != "0" for r in runs)
    assert "run  memdisk randread 50 4096" in p.stdout
    assert "run  nbdkit-tqd randread 10 4096" in p.stdout
    # The capped memdisk only where its cap is below the queue depth.
    assert "run  memdisk-cap randread 10 4096" in p.stdout
    assert not any("memdisk-cap" in r and int(r.split()[4]) <= 1024 for r in runs)
