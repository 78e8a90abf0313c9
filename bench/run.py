#!/usr/bin/python3
"""Side-by-side NBD server benchmark: build/memdisk against nbdkit and qemu-nbd.

Every point starts a fresh server on a private Unix socket, drives it with
fio's nbd engine (one connection, or N for the multi-connection run),
measures the server from /proc while fio runs, and always stops it.  Two
proxies, build/asio-gateway and nbdkit's nbd plugin, are measured in front
of a memdisk upstream started for the point.

    /usr/bin/python3 bench/run.py                       # the full matrix
    /usr/bin/python3 bench/run.py --quick               # a few minutes
    /usr/bin/python3 bench/run.py --latencies 0,10 --depths 1,64 \\
        --servers memdisk,nbdkit-t16 --workloads randread --runtime 3

Output (bench/results/ unless --out): bench-<timestamp>.{md,json,svg} and
latest.{md,json,svg}.  See bench/README.md for how to read them.

Standard library only.
"""

import argparse
import atexit
import ctypes
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMDISK = ROOT / "build" / "memdisk"
GATEWAY = ROOT / "build" / "asio-gateway"
DEFAULT_OUT = ROOT / "bench" / "results"

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# memdisk-cap is memdisk with its per-connection in-flight cap at
# MEMDISK_CAP: run only at deeper queues, it shows what libnbd's in-flight
# list walk costs fio there (see bench/README.md).
#
# gateway and nbdkit-nbd are proxies: each fronts a memdisk upstream that
# the bench starts for the point (build/memdisk --latency-ms L), so that the
# asio gateway's CPU can be compared with nbdkit's nbd plugin.  They run
# only for random reads at PROXY_LATENCY and PROXY_DEPTHS.
PROXY_SERVERS = ["gateway", "nbdkit-nbd"]
PROXY_LATENCY = 10
PROXY_DEPTHS = (64, 256, 1024)
ALL_SERVERS = ["memdisk", "memdisk-cap", "nbdkit-t16", "nbdkit-tqd", "qemu-nbd",
               *PROXY_SERVERS]
MEMDISK_CAP = 1024
# Opt-in: the same servers behind TLS (--servers memdisk-tls,nbdkit-tls).
TLS_SERVERS = ["memdisk-tls", "nbdkit-tls"]
# Opt-in: memdisk serving from two event loops (--loops 2); only the
# multi-connection workload spreads over them.
LOOP_SERVERS = ["memdisk-2loops"]
KNOWN_SERVERS = ALL_SERVERS + TLS_SERVERS + LOOP_SERVERS


_tls_dir = None


def tls_certificates():
    """A CA and a server certificate for localhost, made once per run with
    the openssl CLI, in the directory layout nbdkit and libnbd expect."""
    global _tls_dir
    if _tls_dir is None:
        d = Path(tempfile.mkdtemp(prefix="nbdbench-pki-"))
        atexit.register(shutil.rmtree, d, True)

        def ssl(*a):
            subprocess.run(["openssl", *a], cwd=d, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
            "-subj", "/CN=bench CA")
        ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
        (d / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                               "extendedKeyUsage=serverAuth\n")
        ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey",
            "ca-key.pem", "-CAcreateserial", "-out", "server-cert.pem", "-days", "2",
            "-extfile", "ext")
        # fio's nbd engine may not read files named in the URI, so libnbd
        # finds the CA where it looks by default: $HOME/.pki/libnbd.
        home = d / "home" / ".pki" / "libnbd"
        home.mkdir(parents=True)
        shutil.copy(d / "ca-cert.pem", home / "ca-cert.pem")
        _tls_dir = d
    return _tls_dir


def client_env():
    """fio's environment: HOME points at the bench CA when TLS is in play."""
    env = dict(os.environ)
    if _tls_dir is not None:
        env["HOME"] = str(_tls_dir / "home")
    return env
ALL_WORKLOADS = ["randread", "randwrite", "seqread", "seqwrite", "multiconn"]
DEFAULT_LATENCIES = [0, 10, 50]
DEFAULT_DEPTHS = [1, 64, 256, 1024, 4096]

# workload -> (fio rw, block size, label)
WORKLOADS = {
    "randread": ("randread", "4k", "4 KiB random reads"),
    "randwrite": ("randwrite", "4k", "4 KiB random writes"),
    "seqread": ("read", "1M", "1 MiB sequential reads"),
    "seqwrite": ("write", "1M", "1 MiB sequential writes"),
    "multiconn": ("randread", "4k", "4 KiB random reads, multi-connection"),
}

# 1 MiB sequential workloads: measured in MiB/s, QD <= --seq-max-depth.
SEQ_WORKLOADS = ("seqread", "seqwrite")

START_TIMEOUT = 20.0    # until the server accepts connections
STOP_TIMEOUT = 20.0     # SIGTERM -> exit (nbdkit with 4096 threads is slow)
SAMPLE_INTERVAL = 0.1   # /proc sampling period
MIN_TICKS = 20          # server CPU below this many clock ticks is coarse


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# /proc helpers


def proc_cpu_seconds(pid):
    """utime + stime of the whole process (exited threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_thread_cpu(pid):
    """{tid: (comm, utime + stime in s)} of every thread of the process now,
    from /proc/PID/task/TID/{stat,comm}.  Threads that exit while we read
    are left out."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                data = f.read()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            fields = data[data.rindex(")") + 2:].split()
            out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
        except (OSError, ValueError, IndexError):
            continue
    return out


def has_loop_threads(kind):
    """Servers built on the library: the event loop runs on the main thread
    (plus nbdkit-loop-N threads with --loops N)."""
    return kind.startswith("memdisk") or kind == "gateway"


def is_loop_thread(pid, tid, comm):
    return tid == pid or comm.startswith("nbdkit-loop")


def thread_cpu_delta(pid, before, after):
    """Per-thread CPU between two proc_thread_cpu() samples: (loop s,
    other s, {thread name: s}).  A thread gone by the end counts as it was
    at the start (0); a thread new at the end counts from 0 (so does a
    reused TID whose name changed or whose CPU went down)."""
    loop = other = 0.0
    by_name = {}
    for tid in set(before) | set(after):
        comm0, c0 = before.get(tid, (None, 0.0))
        comm1, c1 = after.get(tid, (comm0, c0))
        if tid in before and tid in after and (comm1 != comm0 or c1 < c0):
            c0 = 0.0
        d = c1 - c0
        comm = comm1 if comm1 is not None else "?"
        if is_loop_thread(pid, tid, comm):
            loop += d
        else:
            other += d
        name = f"{comm} (main)" if tid == pid else comm
        by_name[name] = by_name.get(name, 0.0) + d
    return loop, other, {k: round(v, 4) for k, v in sorted(by_name.items())}


def proc_status(pid):
    """Threads, VmRSS and VmHWM (KiB) from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("Threads", "VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
    return out


def machine_cpu():
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat,
    steal included: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK


class Sampler(threading.Thread):
    """Samples Threads: and VmRSS: of one process every SAMPLE_INTERVAL."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.stop_event = threading.Event()
        self.max_threads = 0
        self.max_rss_kib = 0
        self.samples = 0

    def sample(self):
        try:
            st = proc_status(self.pid)
        except (OSError, ValueError):
            return
        self.samples += 1
        self.max_threads = max(self.max_threads, st.get("Threads", 0))
        self.max_rss_kib = max(self.max_rss_kib, st.get("VmRSS", 0))

    def run(self):
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(SAMPLE_INTERVAL)

    def stop(self):
        self.stop_event.set()
        self.join(timeout=5)
        self.sample()


def _die_with_parent():
    """preexec_fn: SIGTERM the child if this script dies (even by SIGKILL),
    so no server outlives the benchmark.  Only used while no other thread
    of ours is running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG
    except Exception:
        pass


# ---------------------------------------------------------------------------
# Servers


class Server:
    """One server process on a private Unix socket.  A proxy (gateway,
    nbdkit-nbd) starts its own memdisk upstream first, as self.upstream, on
    a second socket in the same private directory, and stops it last."""

    def __init__(self, kind, latency_ms, depth, args, tmpdir=None,
                 role="server"):
        self.kind = kind
        self.latency_ms = latency_ms
        self.depth = depth          # per-connection queue depth of the point
        self.args = args
        self.role = role            # "server", or "upstream" of a proxy
        self.own_tmpdir = tmpdir is None
        self.tmpdir = (Path(tempfile.mkdtemp(prefix="nbdbench-"))
                       if tmpdir is None else tmpdir)
        self.sock = self.tmpdir / ("nbd.sock" if role == "server"
                                   else f"{role}.sock")
        self.title = kind if role == "server" else f"{role} {kind}"
        self.upstream = None        # the memdisk behind a proxy
        self.proc = None
        self.argv = None
        self.returncode = None
        self.threads_opt = None     # nbdkit -t value
        self.image = None           # qemu-nbd backing file
        self.image_dir = None

    @property
    def uri(self):
        if self.kind in TLS_SERVERS:
            tls_certificates()
            return f"nbds+unix:///?socket={self.sock}"
        return f"nbd+unix:///?socket={self.sock}"

    def build_argv(self):
        size = self.args.size
        L = self.latency_ms
        if self.kind.startswith("memdisk"):
            argv = [str(MEMDISK), "--unix", str(self.sock), "--size", size,
                    "--latency-ms", str(L),
                    "--workers", str(self.args.memdisk_workers)]
            if self.kind == "memdisk-cap":
                argv += ["--max-inflight", str(MEMDISK_CAP)]
            if self.kind == "memdisk-tls":
                argv += ["--tls=require", "--tls-certificates", str(tls_certificates())]
            if self.kind == "memdisk-2loops":
                argv += ["--loops", "2"]
            return argv
        if self.kind == "gateway":
            # Its defaults: --threads 2 --upstream-connections 2.
            return [str(GATEWAY), "--unix", str(self.sock), "--upstream",
                    f"nbd+unix:///?socket={self.upstream.sock}"]
        if self.kind == "nbdkit-nbd":
            t = nbdkit_threads(self.depth, self.args)
            self.threads_opt = t
            return ["nbdkit", "-U", str(self.sock), "-f", "--exit-with-parent",
                    "-t", str(t), "nbd", f"socket={self.upstream.sock}"]
        if self.kind in ("nbdkit-t16", "nbdkit-tqd", "nbdkit-tls"):
            t = 16 if self.kind != "nbdkit-tqd" else nbdkit_threads(
                self.depth, self.args)
            self.threads_opt = t
            argv = ["nbdkit", "-U", str(self.sock), "-f", "--exit-with-parent",
                    "-t", str(t)]
            if self.kind == "nbdkit-tls":
                argv += ["--tls=require", f"--tls-certificates={tls_certificates()}"]
            if L > 0:
                argv += ["--filter=delay"]
            argv += ["memory", f"size={size}"]
            if L > 0:
                argv += [f"delay-read={L}ms", f"delay-write={L}ms"]
            return argv
        if self.kind == "qemu-nbd":
            # A sparse raw file on tmpfs when there is one: the closest thing
            # to the in-memory disks the other servers serve.
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.image_dir = Path(tempfile.mkdtemp(prefix="nbdbench-img-",
                                                   dir=base))
            self.image = self.image_dir / "disk.raw"
            with open(self.image, "wb") as f:
                f.truncate(parse_size(size))
            return ["qemu-nbd", "-k", str(self.sock), "-f", "raw", "-x", "",
                    "--persistent", "--shared", str(self.args.jobs + 4),
                    "--cache=writeback", "--aio=threads", str(self.image)]
        raise BenchError(f"unknown server {self.kind}")

    def start(self):
        if self.kind in PROXY_SERVERS:
            # The same upstream for both proxies: memdisk with the point's
            # latency, started (and ready) before the proxy.
            self.upstream = Server("memdisk", self.latency_ms, self.depth,
                                   self.args, tmpdir=self.tmpdir,
                                   role="upstream")
            self.upstream.start()
        self.argv = self.build_argv()
        self.stdout_path = self.tmpdir / f"{self.role}.stdout"
        self.stderr_path = self.tmpdir / f"{self.role}.stderr"
        with open(self.stdout_path, "wb") as out, \
                open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                preexec_fn=_die_with_parent, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.title} exited with code {self.proc.returncode} "
                    f"at start-up: {self.stderr_tail()}")
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.title} not ready after "
                                 f"{START_TIMEOUT:.0f} s: {self.stderr_tail()}")
            time.sleep(0.01)

    def ready(self):
        if self.kind.startswith("memdisk") or self.kind == "gateway":
            # memdisk and the gateway print their URI once they listen.
            return self.stdout_path.read_bytes().endswith(b"\n")
        if not self.sock.exists():
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(1.0)
            s.connect(str(self.sock))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def stderr_tail(self, n=1500):
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-n:].strip()

    def stop(self):
        """Always called.  SIGTERM, then SIGKILL after STOP_TIMEOUT; a
        proxy first, then its upstream."""
        try:
            self.stop_process()
        finally:
            try:
                if self.upstream is not None:
                    self.upstream.stop()
            finally:
                if self.own_tmpdir:
                    shutil.rmtree(self.tmpdir, ignore_errors=True)
                if self.image_dir is not None:
                    shutil.rmtree(self.image_dir, ignore_errors=True)

    def stop_process(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.returncode = "killed"
        else:
            self.returncode = self.proc.returncode


def nbdkit_threads(depth, args):
    return max(1, min(depth, args.nbdkit_max_threads))


def server_label(kind, depth, args):
    if kind == "nbdkit-t16":
        return "nbdkit -t16"
    if kind == "nbdkit-tls":
        return "nbdkit -t16 TLS"
    if kind == "nbdkit-tqd":
        return f"nbdkit -t{nbdkit_threads(depth, args)}"
    if kind == "memdisk-cap":
        return f"memdisk --max-inflight {MEMDISK_CAP}"
    if kind == "gateway":
        return "asio-gateway"
    if kind == "nbdkit-nbd":
        return f"nbdkit nbd -t{nbdkit_threads(depth, args)}"
    return kind


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip()
    if s and s[-1].upper() in mult:
        return int(s[:-1]) * mult[s[-1].upper()]
    return int(s)


# ---------------------------------------------------------------------------
# One point


def fio_argv(server, rw, bs, depth, jobs, size, runtime, json_path):
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={server.uri}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
            f"--numjobs={jobs}", "--group_reporting", f"--size={size}",
            "--norandommap", "--randrepeat=0", "--lat_percentiles=1",
            "--output-format=json", f"--output={json_path}"]
    if runtime is not None:
        argv += ["--time_based", f"--runtime={runtime}"]
    return argv


def run_fio(argv, json_path, timeout):
    """Runs fio to completion; returns (fio json, client CPU s, wall s).
    Client CPU is fio's wait4() rusage: fio plus its job processes."""
    log_path = json_path.with_suffix(".log")
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             env=client_env())
    status = None
    rusage = None
    try:
        while True:
            pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            rusage = None
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"fio did not finish within {timeout:.0f} s")
            time.sleep(0.02)
    finally:
        if rusage is None:      # timed out or interrupted: stop fio's group
            try:
                os.killpg(p.pid, signal.SIGTERM)
                time.sleep(1)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(p.pid, 0)
            except ChildProcessError:
                pass
        p.returncode = -1       # reaped by hand; keep Popen from waiting
    wall = time.monotonic() - t0
    rc = os.waitstatus_to_exitcode(status)
    log_text = log_path.read_text(errors="replace")
    if rc != 0:
        raise BenchError(f"fio exited {rc}: {log_text[-1500:].strip()}")
    try:
        # With --thread, fio's nbd engine may print its "connected" lines
        # into the output file ahead of the JSON.
        text = json_path.read_text()
        data = json.loads(text[text.find("{"):])
    except (OSError, ValueError) as e:
        raise BenchError(f"fio wrote no JSON ({e}): {log_text[-1500:]}")
    return data, rusage.ru_utime + rusage.ru_stime, wall


def prefill(server, args):
    """Writes the whole disk once (1 MiB sequential writes) so that every
    server holds real data: qemu-nbd would otherwise answer reads of holes
    with NBD_REPLY_TYPE_OFFSET_HOLE and send no payload at all."""
    argv = fio_argv(server, "write", "1M", 32, 1, args.size, None,
                    server.tmpdir / "prefill.json")
    mib = parse_size(args.size) / (1 << 20)
    timeout = 60 + mib / 32 * max(server.latency_ms, 1) / 1000 * 4
    _, _, wall = run_fio(argv, server.tmpdir / "prefill.json", timeout)
    return wall


def run_point(kind, workload, latency_ms, depth, args):
    jobs = args.jobs if workload == "multiconn" else 1
    row = {
        "workload": workload, "latency_ms": latency_ms, "depth": depth,
        "jobs": jobs, "total_depth": depth * jobs, "server": kind,
        "label": server_label(kind, depth, args), "bs": WORKLOADS[workload][1],
    }
    server = Server(kind, latency_ms, depth, args)
    sampler = None
    try:
        server.start()
        row["argv"] = server.argv
        if server.threads_opt is not None:
            row["nbdkit_threads"] = server.threads_opt
        pid = server.proc.pid
        up = server.upstream
        if up is not None:
            row["upstream_argv"] = up.argv
        idle_threads = proc_status(pid).get("Threads", 1)
        if args.prefill:
            row["prefill_s"] = prefill(server, args)
            # nbdkit tears the prefill connection's -t threads down after
            # fio has gone: wait for that, or their stacks would count as
            # the baseline of the RSS growth.
            deadline = time.monotonic() + 15
            while (proc_status(pid).get("Threads", 0) > idle_threads
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        rss_base_kib = proc_status(pid).get("VmRSS", 0)
        row["threads_idle"] = proc_status(pid).get("Threads", 0)
        rw, bs, _ = WORKLOADS[workload]
        json_path = server.tmpdir / "fio.json"
        argv = fio_argv(server, rw, bs, depth, jobs, args.size, args.runtime,
                        json_path)
        row["fio_argv"] = argv
        timeout = (args.runtime + 60 +
                   depth * jobs * max(latency_ms, 1) / 1000)
        sampler = Sampler(pid)
        sampler.start()
        # Per-thread samples outside the process / machine CPU window, so
        # that reading many threads' files does not count as "others".
        thr0 = proc_thread_cpu(pid)
        if up is not None:
            up_thr0 = proc_thread_cpu(up.proc.pid)
            up_cpu0 = proc_cpu_seconds(up.proc.pid)
        cpu0 = proc_cpu_seconds(pid)
        sys0 = machine_cpu()
        fio_json, client_cpu, wall = run_fio(argv, json_path, timeout)
        cpu1 = proc_cpu_seconds(pid)
        if up is not None:
            up_cpu1 = proc_cpu_seconds(up.proc.pid)
        sys1 = machine_cpu()
        thr1 = proc_thread_cpu(pid)
        if up is not None:
            up_thr1 = proc_thread_cpu(up.proc.pid)
        hwm_kib = proc_status(pid).get("VmHWM", 0)
        sampler.stop()
        if server.proc.poll() is not None:
            raise BenchError(f"{kind} died during the run (code "
                             f"{server.proc.returncode}): "
                             f"{server.stderr_tail()}")
        if up is not None and up.proc.poll() is not None:
            raise BenchError(f"upstream memdisk died during the run (code "
                             f"{up.proc.returncode}): {up.stderr_tail()}")
        job = fio_json["jobs"][0]
        if job.get("error"):
            raise BenchError(f"fio job error {job['error']}")
        ddir = "write" if WORKLOADS[workload][0].endswith("write") else "read"
        d = job[ddir]
        ios = job["read"]["total_ios"] + job["write"]["total_ios"]
        if ios <= 0:
            raise BenchError("fio completed no I/O")
        runtime_s = d["runtime"] / 1000 / jobs if d["runtime"] else wall
        lat = d["lat_ns"]
        pct = lat.get("percentile") or d.get("clat_ns", {}).get("percentile", {})
        p99 = pct.get("99.000000")
        row.update({
            "iops": d["iops"],
            "mib_s": d["bw_bytes"] / (1 << 20),
            "ios": ios,
            "fio_runtime_s": runtime_s,
            "lat_mean_ms": lat["mean"] / 1e6,
            "lat_p99_ms": p99 / 1e6 if p99 is not None else None,
            "lat_max_ms": lat["max"] / 1e6,
            "in_flight": d["iops"] * lat["mean"] / 1e9,
            "server_cpu_s": cpu1 - cpu0,
            "server_cpu_ticks": round((cpu1 - cpu0) * CLK_TCK),
            "server_cpu_us_per_io": (cpu1 - cpu0) / ios * 1e6,
            "server_cpu_pct": (cpu1 - cpu0) / wall * 100,
            "threads_peak": sampler.max_threads,
            "rss_base_mib": rss_base_kib / 1024,
            "rss_peak_mib": sampler.max_rss_kib / 1024,
            "rss_growth_mib": max(0, sampler.max_rss_kib - rss_base_kib) / 1024,
            # memdisk and nbdkit memory hold the prefilled disk in their own
            # memory, qemu-nbd in the page cache of its file, a proxy in its
            # upstream.
            "rss_data_mib": (parse_size(args.size) / (1 << 20)
                             if args.prefill and kind != "qemu-nbd"
                             and kind not in PROXY_SERVERS else 0),
            "hwm_mib": hwm_kib / 1024,
            "samples": sampler.samples,
            "client_cpu_s": client_cpu,
            "client_cpu_us_per_io": client_cpu / ios * 1e6,
            "client_cpu_pct": client_cpu / wall * 100,
            # Everything else the machine ran meanwhile (other users,
            # steal): the noise indicator of the point.
            "others_cpu_pct": max(0.0, (sys1 - sys0) - (cpu1 - cpu0) -
                                  (up_cpu1 - up_cpu0 if up is not None
                                   else 0.0) -
                                  client_cpu) / wall * 100,
            "fio_usr_cpu_pct": job.get("usr_cpu"),
            "fio_sys_cpu_pct": job.get("sys_cpu"),
            "fio_iodepth_level": job.get("iodepth_level"),
            "fio_wall_s": wall,
        })
        row["rss_overhead_mib"] = max(0.0, row["rss_peak_mib"] -
                                      row["rss_data_mib"])
        # Per-thread CPU: the event loop(s) against the rest of the process.
        loop, other, by_name = thread_cpu_delta(pid, thr0, thr1)
        row["server_thread_cpu_s"] = by_name
        if has_loop_threads(kind):
            row.update(thread_split_fields("", loop, other, ios, wall))
        else:
            row.update(thread_split_fields("", None, None, ios, wall))
        if up is not None:
            up_cpu = up_cpu1 - up_cpu0
            row.update({
                "upstream_cpu_s": up_cpu,
                "upstream_cpu_ticks": round(up_cpu * CLK_TCK),
                "upstream_cpu_us_per_io": up_cpu / ios * 1e6,
                "upstream_cpu_pct": up_cpu / wall * 100,
            })
            loop, other, by_name = thread_cpu_delta(up.proc.pid, up_thr0,
                                                    up_thr1)
            row["upstream_thread_cpu_s"] = by_name
            row.update(thread_split_fields("upstream_", loop, other, ios,
                                           wall))
        if latency_ms > 0:
            bound = depth * jobs / (latency_ms / 1000)
            row["little_bound_iops"] = bound
            row["pct_of_bound"] = d["iops"] / bound * 100
    except BenchError as e:
        row["error"] = str(e)
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        server.stop()
        row["server_exit"] = server.returncode
        if server.upstream is not None:
            row["upstream_exit"] = server.upstream.returncode
    if "error" not in row and kind.startswith("memdisk") and server.returncode != 0:
        row["error"] = f"memdisk exited with {server.returncode}, not 0"
    return row


def thread_split_fields(prefix, loop, other, ios, wall):
    """Row fields of the loop / other-threads split of a process's CPU
    (None where the server has no event-loop threads of ours)."""
    out = {}
    for name, v in (("loop", loop), ("other_thr", other)):
        p = f"{prefix}{name}_cpu"
        if v is None:
            out.update({f"{p}_s": None, f"{p}_ticks": None,
                        f"{p}_us_per_io": None, f"{p}_pct": None})
        else:
            out.update({f"{p}_s": v, f"{p}_ticks": round(v * CLK_TCK),
                        f"{p}_us_per_io": v / ios * 1e6,
                        f"{p}_pct": v / wall * 100})
    return out


def run_repeated(kind, workload, latency_ms, depth, args):
    runs = [run_point(kind, workload, latency_ms, depth, args)
            for _ in range(max(1, args.repeat))]
    good = sorted((r for r in runs if "error" not in r),
                  key=lambda r: r["iops"])
    if not good:
        return runs[0]
    row = good[(len(good) - 1) // 2]
    if len(runs) > 1:
        row["iops_all"] = [r.get("iops") for r in runs]
        row["failed_repeats"] = len(runs) - len(good)
    return row


# ---------------------------------------------------------------------------
# The matrix


def skip_reason(kind, workload, latency_ms, depth, args):
    if kind == "qemu-nbd" and latency_ms > 0:
        return "qemu-nbd has no latency injection"
    if kind == "memdisk-2loops" and workload != "multiconn":
        return "one connection is served by one loop"
    if kind == "memdisk-cap" and (depth <= MEMDISK_CAP or workload == "multiconn"):
        return f"the cap of {MEMDISK_CAP} in flight only bites above QD {MEMDISK_CAP}"
    if kind == "nbdkit-tqd" and depth <= 16:
        return "nbdkit -tQD with QD <= 16 is covered by nbdkit -t16"
    if kind in PROXY_SERVERS and (workload != "randread"
                                  or latency_ms != PROXY_LATENCY
                                  or depth not in PROXY_DEPTHS):
        return (f"the proxies are compared at {PROXY_LATENCY} ms, random "
                f"reads, QD {'/'.join(map(str, PROXY_DEPTHS))} only")
    if workload in SEQ_WORKLOADS and depth > args.seq_max_depth:
        what = "reads" if workload == "seqread" else "writes"
        return (f"1 MiB {what} at QD > {args.seq_max_depth} pin "
                f"QD MiB of buffers in client and server")
    return None


def plan(args):
    points, skipped = [], []
    for L in args.latencies:
        for w in args.workloads:
            depths = [args.multiconn_depth] if w == "multiconn" else args.depths
            for qd in depths:
                for kind in args.servers:
                    why = skip_reason(kind, w, L, qd, args)
                    if why:
                        skipped.append((w, L, qd, kind, why))
                    else:
                        points.append((kind, w, L, qd))
    return points, skipped


# ---------------------------------------------------------------------------
# Environment


def tool_version(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        out = (p.stdout or p.stderr).strip().splitlines()
        return out[0] if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


def environment(args):
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always",
                              "--dirty"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = "?"
    try:
        mtime = datetime.datetime.fromtimestamp(MEMDISK.stat().st_mtime)
        memdisk_built = mtime.isoformat(timespec="seconds")
    except OSError:
        memdisk_built = "missing"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": cores,
        "cpus_online": os.cpu_count(),
        "mem_total_mib": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": tool_version(["fio", "--version"]),
        "nbdkit": tool_version(["nbdkit", "--version"]),
        "qemu_nbd": tool_version(["qemu-nbd", "--version"]),
        "memdisk_git": rev,
        "memdisk_built": memdisk_built,
        "loadavg_start": load,
    }


# ---------------------------------------------------------------------------
# Reporting


def fmt(v, digits=None, pct=False):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if pct:
        return f"{v:.1f} %"
    if digits is not None:
        return f"{v:.{digits}f}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


SERVER_ORDER = {k: i for i, k in enumerate(KNOWN_SERVERS)}


def sort_key(r):
    return (ALL_WORKLOADS.index(r["workload"]), r["latency_ms"], r["depth"],
            SERVER_ORDER[r["server"]])


def results_tables(rows):
    out = []
    for w in ALL_WORKLOADS:
        wr = sorted([r for r in rows if r["workload"] == w], key=sort_key)
        if not wr:
            continue
        title = WORKLOADS[w][2]
        if w == "multiconn":
            title += f" ({wr[0]['jobs']} connections × QD {wr[0]['depth']})"
        else:
            title += ", one connection"
        out.append(f"### {title}\n")
        head = ["lat ms", "QD", "server", "IOPS", "MiB/s", "mean lat ms",
                "p99 lat ms", "Little bound", "% of bound", "in flight",
                "srv CPU µs/IO", "srv CPU %", "loop CPU µs/IO",
                "other thr CPU µs/IO", "upstream CPU µs/IO",
                "srv threads", "srv RSS MiB",
                "RSS − data MiB", "RSS growth MiB", "srv HWM MiB",
                "fio CPU µs/IO", "fio CPU %",
                "others CPU %"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---:", "---:", ":---"] +
                                  ["---:"] * (len(head) - 3)) + "|")
        for r in wr:
            qd = (f"{r['jobs']}×{r['depth']}" if r["jobs"] > 1
                  else str(r["depth"]))
            cells = [str(r["latency_ms"]), qd, r["label"]]
            if "error" in r:
                cells.append("FAILED: " + r["error"].replace("|", "/")
                             .replace("\n", " ")[:200])
                cells += [""] * (len(head) - len(cells))
            else:
                cells += [
                    fmt(r["iops"]),
                    fmt(r["mib_s"]),
                    fmt(r["lat_mean_ms"]), fmt(r["lat_p99_ms"]),
                    fmt(r.get("little_bound_iops")),
                    fmt(r.get("pct_of_bound"), pct=True)
                    if r.get("pct_of_bound") is not None else "–",
                    fmt(r["in_flight"]),
                    ("≈" if coarse(r) else "") +
                    fmt(r["server_cpu_us_per_io"]),
                    fmt(r["server_cpu_pct"], 0),
                    cpu_cell(r, "loop_cpu"),
                    cpu_cell(r, "other_thr_cpu"),
                    cpu_cell(r, "upstream_cpu"),
                    str(r["threads_peak"]),
                    fmt(r["rss_peak_mib"], 1), fmt(r["rss_overhead_mib"], 1),
                    fmt(r["rss_growth_mib"], 1),
                    fmt(r["hwm_mib"], 1),
                    fmt(r["client_cpu_us_per_io"]),
                    fmt(r["client_cpu_pct"], 0),
                    fmt(r.get("others_cpu_pct"), 0),
                ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def coarse(r, prefix="server_cpu"):
    """Server CPU of fewer than MIN_TICKS clock ticks: ±1 tick matters."""
    ticks = r.get(f"{prefix}_ticks")
    return ticks is not None and ticks < MIN_TICKS


def cpu_cell(r, prefix):
    """µs/IO of one CPU measure of a row, ≈ when coarse, – when the row
    has none (not applicable, or a JSON from before it was measured)."""
    v = r.get(f"{prefix}_us_per_io")
    if v is None:
        return "–"
    return ("≈" if coarse(r, prefix) else "") + fmt(v)


def is_seq(workload):
    return workload in SEQ_WORKLOADS


def metric(workload):
    """(row key, unit) a workload is measured in."""
    return ("mib_s", "MiB/s") if is_seq(workload) else ("iops", "IOPS")


def find(rows, workload, latency, depth, server):
    for r in rows:
        if (r["workload"] == workload and r["latency_ms"] == latency
                and r["depth"] == depth and r["server"] == server
                and "error" not in r):
            return r
    return None


def verdict(ok):
    return "PASS" if ok else "MISS"


def targets(rows):
    """The ratios issue 5 names.  Returns a list of (name, text) lines."""
    lines = []
    nm = "not measured"

    # (a) 50 ms, QD 1024: our IOPS / Little bound >= 97 %, threads <= 4.
    r = find(rows, "randread", 50, 1024, "memdisk")
    if r:
        pct = r["pct_of_bound"]
        lines.append(
            f"(a) 50 ms, QD 1024, 4 KiB random reads: memdisk "
            f"{r['iops']:,.0f} IOPS = {pct:.1f} % of the Little bound "
            f"{r['little_bound_iops']:,.0f} (target ≥ 97 %): "
            f"**{verdict(pct >= 97)}**; peak server threads "
            f"{r['threads_peak']} (target ≤ 4): "
            f"**{verdict(r['threads_peak'] <= 4)}**")
    else:
        lines.append(f"(a) 50 ms, QD 1024, random reads, % of Little bound "
                     f"and threads: {nm}")

    # (b) 10 ms, QD 4096: our IOPS / nbdkit -t4096 >= 3x, RSS <= 1/3.
    r = find(rows, "randread", 10, 4096, "memdisk")
    n = find(rows, "randread", 10, 4096, "nbdkit-tqd")
    if r and n:
        ratio = r["iops"] / n["iops"]
        o = (r["rss_overhead_mib"] / n["rss_overhead_mib"]
             if n["rss_overhead_mib"] else float("inf"))
        g = (f"{r['rss_growth_mib'] / n['rss_growth_mib']:.2f}"
             if n["rss_growth_mib"] else "–")
        lines.append(
            f"(b) 10 ms, QD 4096, 4 KiB random reads: memdisk "
            f"{r['iops']:,.0f} IOPS / {n['label']} {n['iops']:,.0f} IOPS = "
            f"{ratio:.2f}× (target ≥ 3×): **{verdict(ratio >= 3)}**; peak "
            f"RSS beyond the disk's data {r['rss_overhead_mib']:.1f} / "
            f"{n['rss_overhead_mib']:.1f} MiB = {o:.2f} (target ≤ 0.33): "
            f"**{verdict(o <= 1 / 3)}** (growth during the run "
            f"{r['rss_growth_mib']:.1f} / {n['rss_growth_mib']:.1f} MiB = "
            f"{g}; total peak RSS {r['rss_peak_mib']:.1f} / "
            f"{n['rss_peak_mib']:.1f} MiB)")
    else:
        lines.append(f"(b) 10 ms, QD 4096, IOPS and RSS vs nbdkit -t4096: {nm}")
    c = find(rows, "randread", 10, 4096, "memdisk-cap")
    if c and n:
        ratio = c["iops"] / n["iops"]
        lines.append(
            f"(b′) the same with memdisk taking at most {MEMDISK_CAP} "
            f"requests in flight (the rest wait unsent in fio's queue, off "
            f"the list libnbd walks per reply): {c['iops']:,.0f} IOPS = "
            f"{ratio:.2f}× nbdkit -t4096, fio CPU {c['client_cpu_pct']:.0f} %")

    # (c) server CPU per IO.
    r = find(rows, "randread", 10, 1024, "memdisk")
    n = find(rows, "randread", 10, 1024, "nbdkit-tqd")
    if r and n:
        ratio = r["server_cpu_us_per_io"] / n["server_cpu_us_per_io"]
        lines.append(
            f"(c1) server CPU per IO with latency (10 ms, QD 1024, random "
            f"reads): memdisk {r['server_cpu_us_per_io']:.1f} µs / "
            f"{n['label']} {n['server_cpu_us_per_io']:.1f} µs = {ratio:.2f} "
            f"(target ≤ 0.20): **{verdict(ratio <= 0.2)}**")
    else:
        lines.append(f"(c1) server CPU per IO vs nbdkit with the delay filter "
                     f"(10 ms, QD 1024): {nm}")
    # Every matched point with latency, for context.
    ratios = []
    for r in rows:
        if (r["server"] == "memdisk" and r["latency_ms"] > 0
                and "error" not in r):
            for other in ("nbdkit-t16", "nbdkit-tqd"):
                n = find(rows, r["workload"], r["latency_ms"], r["depth"],
                         other)
                if (n and n["server_cpu_us_per_io"] > 0
                        and not coarse(r) and not coarse(n)):
                    ratios.append((r["server_cpu_us_per_io"] /
                                   n["server_cpu_us_per_io"], r, n))
    if ratios:
        vals = sorted(x[0] for x in ratios)
        worst = max(ratios, key=lambda x: x[0])
        lines.append(
            f"(c1′) all {len(vals)} matched points with latency (any "
            f"workload, either nbdkit, ≥ {MIN_TICKS} CPU ticks on both "
            f"sides): memdisk/nbdkit CPU per IO median "
            f"{statistics.median(vals):.2f}, worst {worst[0]:.2f} "
            f"({worst[1]['workload']} {worst[1]['latency_ms']} ms QD "
            f"{worst[1]['depth']} vs {worst[2]['label']}); "
            f"{sum(v <= 0.2 for v in vals)}/{len(vals)} within 0.20")
    r = find(rows, "randread", 0, 64, "memdisk")
    n = find(rows, "randread", 0, 64, "nbdkit-t16")
    if r and n:
        ratio = r["server_cpu_us_per_io"] / n["server_cpu_us_per_io"]
        lines.append(
            f"(c2) server CPU per IO without latency (0 ms, QD 64, random "
            f"reads): memdisk {r['server_cpu_us_per_io']:.1f} µs / nbdkit "
            f"memory -t16 {n['server_cpu_us_per_io']:.1f} µs = {ratio:.2f} "
            f"(target ≤ 0.50): **{verdict(ratio <= 0.5)}**")
    else:
        lines.append(f"(c2) server CPU per IO vs nbdkit memory at 0 ms "
                     f"(QD 64): {nm}")

    # (d) 1 MiB sequential reads at 0 ms: best vs best.
    ours = [r for r in rows if r["workload"] == "seqread"
            and r["latency_ms"] == 0 and r["server"] == "memdisk"
            and "error" not in r]
    theirs = [r for r in rows if r["workload"] == "seqread"
              and r["latency_ms"] == 0
              and r["server"] in ("nbdkit-t16", "nbdkit-tqd")
              and "error" not in r]
    if ours and theirs:
        bo = max(ours, key=lambda r: r["mib_s"])
        bt = max(theirs, key=lambda r: r["mib_s"])
        ratio = bo["mib_s"] / bt["mib_s"]
        per = []
        for r in sorted(ours, key=lambda r: r["depth"]):
            n = find(rows, "seqread", 0, r["depth"], "nbdkit-t16")
            if n:
                per.append(f"QD {r['depth']}: {r['mib_s'] / n['mib_s']:.2f}×")
        lines.append(
            f"(d) 1 MiB sequential reads, 0 ms, best over queue depths: "
            f"memdisk {bo['mib_s']:,.0f} MiB/s (QD {bo['depth']}) / "
            f"nbdkit memory {bt['mib_s']:,.0f} MiB/s ({bt['label']}, QD "
            f"{bt['depth']}) = {ratio:.2f}× (target ≥ 1.2×): "
            f"**{verdict(ratio >= 1.2)}**"
            + (f"; per QD vs nbdkit -t16: {', '.join(per)}" if per else ""))
    else:
        lines.append(f"(d) 1 MiB sequential reads vs nbdkit memory at 0 ms: "
                     f"{nm}")
    return lines


def cpu_us(r, prefix="server_cpu"):
    """A row's CPU per IO for the targets text, ≈ when coarse."""
    return (("≈" if coarse(r, prefix) else "") +
            f"{r[prefix + '_us_per_io']:.2f} µs")


def targets_issue17(rows):
    """The ratios issue 17 names: server CPU per IO against nbdkit, the
    gateway against nbdkit's nbd plugin, 1 MiB throughput.  Returns lines."""
    lines = []
    nm = "not measured"

    def cpu_target(tag, title, r, n, limit, want, loop_context=True):
        if r is None or n is None:
            absent = [w for w, x in zip(want, (r, n)) if x is None]
            lines.append(f"({tag}) {title}: {nm} (no {' and no '.join(absent)} "
                         f"row in this run)")
            return
        b = n["server_cpu_us_per_io"]
        if not b > 0:
            lines.append(f"({tag}) {title}: {nm} ({n['label']} used no "
                         f"measurable CPU)")
            return
        ratio = r["server_cpu_us_per_io"] / b
        text = (f"({tag}) {title}: {r['label']} {cpu_us(r)} / {n['label']} "
                f"{cpu_us(n)} = {ratio:.2f} (target ≤ {limit:.2f}): "
                f"**{verdict(ratio <= limit)}**")
        if loop_context:
            lp = r.get("loop_cpu_us_per_io")
            if lp is None:
                text += ("; event-loop thread only (context): – (not "
                         "measured in this run)")
            else:
                text += (f"; context, not a target — memdisk's event-loop "
                         f"thread only (the library's cost, without its "
                         f"latency-emulating workers): {cpu_us(r, 'loop_cpu')} "
                         f"/ {cpu_us(n)} = {lp / b:.2f}")
        lines.append(text)

    cpu_target("e1", "server CPU per IO, 0 ms, QD 64, 4 KiB random reads, "
               "memdisk vs nbdkit memory -t16",
               find(rows, "randread", 0, 64, "memdisk"),
               find(rows, "randread", 0, 64, "nbdkit-t16"), 0.35,
               ("memdisk", "nbdkit -t16"))
    cpu_target("e2", "server CPU per IO, 10 ms, QD 1024, 4 KiB random reads, "
               "memdisk vs nbdkit -tQD with the delay filter",
               find(rows, "randread", 10, 1024, "memdisk"),
               find(rows, "randread", 10, 1024, "nbdkit-tqd"), 0.15,
               ("memdisk", "nbdkit -t1024"))
    r = next((x for x in rows if x["workload"] == "multiconn"
              and x["latency_ms"] == 0 and x["server"] == "memdisk"
              and "error" not in x), None)
    n = (next((x for x in rows if x["workload"] == "multiconn"
               and x["latency_ms"] == 0 and x["server"] == "nbdkit-t16"
               and x["depth"] == r["depth"] and x["jobs"] == r["jobs"]
               and "error" not in x), None) if r else None)
    shape = (f"{r['jobs']} connections × QD {r['depth']}" if r
             else "multi-connection")
    cpu_target("e3", f"server CPU per IO, {shape}, 0 ms, 4 KiB random "
               f"reads, memdisk vs nbdkit memory -t16", r, n, 0.35,
               ("memdisk", "nbdkit -t16"))

    g = find(rows, "randread", PROXY_LATENCY, 256, "gateway")
    n = find(rows, "randread", PROXY_LATENCY, 256, "nbdkit-nbd")
    cpu_target("e4", f"proxy CPU per IO, {PROXY_LATENCY} ms, QD 256, 4 KiB "
               f"random reads, both in front of a memdisk upstream: "
               f"asio-gateway vs nbdkit nbd plugin", g, n, 0.25,
               ("asio-gateway", "nbdkit nbd -t256"), loop_context=False)
    if g and n and n["server_cpu_us_per_io"] > 0:
        extra = []
        if g.get("loop_cpu_us_per_io") is not None:
            extra.append(f"gateway loop thread {cpu_us(g, 'loop_cpu')} + "
                         f"asio pool {cpu_us(g, 'other_thr_cpu')}")
        if (g.get("upstream_cpu_us_per_io") is not None
                and n.get("upstream_cpu_us_per_io") is not None):
            extra.append(f"upstream memdisk behind them "
                         f"{cpu_us(g, 'upstream_cpu')} / "
                         f"{cpu_us(n, 'upstream_cpu')}")
        extra.append(f"IOPS {g['iops']:,.0f} / {n['iops']:,.0f}")
        lines[-1] += " (" + "; ".join(extra) + ")"

    for tag, w in (("e5", "seqread"), ("e6", "seqwrite")):
        what = WORKLOADS[w][2]
        ours = [r for r in rows if r["workload"] == w
                and r["latency_ms"] == 0 and r["server"] == "memdisk"
                and "error" not in r]
        theirs = [r for r in rows if r["workload"] == w
                  and r["latency_ms"] == 0 and r["server"] == "nbdkit-t16"
                  and "error" not in r]
        if not (ours and theirs):
            absent = [name for name, x in (("memdisk", ours),
                                           ("nbdkit -t16", theirs)) if not x]
            lines.append(f"({tag}) {what}, 0 ms, best MiB/s over queue "
                         f"depths vs nbdkit memory -t16: {nm} (no "
                         f"{' and no '.join(absent)} row in this run)")
            continue
        bo = max(ours, key=lambda r: r["mib_s"])
        bt = max(theirs, key=lambda r: r["mib_s"])
        ratio = bo["mib_s"] / bt["mib_s"]
        per = []
        for r in sorted(ours, key=lambda r: r["depth"]):
            n = find(rows, w, 0, r["depth"], "nbdkit-t16")
            if n:
                per.append(f"QD {r['depth']}: {r['mib_s'] / n['mib_s']:.2f}×")
        lines.append(
            f"({tag}) {what}, 0 ms, best over queue depths: memdisk "
            f"{bo['mib_s']:,.0f} MiB/s (QD {bo['depth']}) / nbdkit memory "
            f"-t16 {bt['mib_s']:,.0f} MiB/s (QD {bt['depth']}) = "
            f"{ratio:.2f}× (target ≥ 1.5×): **{verdict(ratio >= 1.5)}**"
            + (f"; per QD: {', '.join(per)}" if per else ""))
    return lines


# memdisk is compared point by point with these (the Notes).
PEERS = ("nbdkit-t16", "nbdkit-tqd", "qemu-nbd")


def memdisk_behind(rows):
    """Points where memdisk's IOPS (MiB/s for 1 MiB workloads) is below a
    peer's at the same workload, latency and depth."""
    notes = []
    for r in sorted(rows, key=sort_key):
        if r["server"] != "memdisk" or "error" in r:
            continue
        key, unit = metric(r["workload"])
        for peer in PEERS:
            n = find(rows, r["workload"], r["latency_ms"], r["depth"], peer)
            if n is None or n["jobs"] != r["jobs"] or not n[key] > r[key]:
                continue
            a, b = r[key], n[key]
            # Enough digits that the two numbers differ.
            d = 0 if round(a) != round(b) else 1 if a >= 100 else 2
            pct = (a / b - 1) * 100
            notes.append(
                f"memdisk behind {n['label']} at {r['workload']} "
                f"{r['latency_ms']} ms QD {r['total_depth']}: "
                f"{a:,.{d}f} vs {b:,.{d}f} {unit} "
                f"({pct:+.{1 if pct <= -0.1 else 2}f} %)")
    return notes


def observations(rows):
    """Automatic notes: client-bound points, failures, odd exits."""
    notes = []
    cb = [r for r in rows if "error" not in r and r["client_cpu_pct"] >= 85]
    if cb:
        pts = ", ".join(f"{r['workload']} {r['latency_ms']} ms QD "
                        f"{r['total_depth']} {r['label']} "
                        f"({r['client_cpu_pct']:.0f} %)" for r in
                        sorted(cb, key=sort_key))
        notes.append(f"fio used ≥ 85 % of a core (client-bound, the server "
                     f"may be capable of more): {pts}")
    slow = [r for r in rows if "error" not in r and r["latency_ms"] > 0
            and r["server"] == "memdisk" and r["pct_of_bound"] < 90]
    if slow:
        pts = ", ".join(f"{r['workload']} {r['latency_ms']} ms QD "
                        f"{r['total_depth']}: {r['pct_of_bound']:.0f} % "
                        f"(mean lat {r['lat_mean_ms']:.1f} ms, srv CPU "
                        f"{r['server_cpu_pct']:.0f} %, fio CPU "
                        f"{r['client_cpu_pct']:.0f} %)"
                        for r in sorted(slow, key=sort_key))
        notes.append("memdisk below 90 % of the Little bound (requests "
                     "waited beyond the injected latency somewhere: in the "
                     "server, in fio, or for a CPU): " + pts)
    short = [r for r in rows if "error" not in r and
             r["in_flight"] < 0.9 * r["total_depth"]]
    if short:
        pts = ", ".join(f"{r['workload']} {r['latency_ms']} ms QD "
                        f"{r['total_depth']} {r['label']} "
                        f"({r['in_flight']:.0f})"
                        for r in sorted(short, key=sort_key))
        notes.append("fio kept fewer than 90 % of the queue depth in flight "
                     "on average (IOPS × mean latency): " + pts)
    noisy = [r for r in rows if "error" not in r
             and r.get("others_cpu_pct", 0) >= 25]
    if noisy:
        pts = ", ".join(f"{r['workload']} {r['latency_ms']} ms QD "
                        f"{r['total_depth']} {r['label']} "
                        f"({r['others_cpu_pct']:.0f} %)"
                        for r in sorted(noisy, key=sort_key))
        notes.append(f"noisy points: other processes used ≥ 25 % of a core "
                     f"meanwhile ({len(noisy)} of {len(rows)}): {pts}")
    notes += memdisk_behind(rows)
    bad = [r for r in rows if r.get("server_exit") not in (0, None)
           and (r["server"] == "memdisk" or r["server"] == "gateway")]
    for r in bad:
        notes.append(f"{r['label']} exit code {r['server_exit']} after "
                     f"{r['workload']} {r['latency_ms']} ms QD {r['depth']}")
    for r in rows:
        if r.get("upstream_exit") not in (0, None):
            notes.append(f"upstream memdisk of {r['label']} exit code "
                         f"{r['upstream_exit']} after {r['workload']} "
                         f"{r['latency_ms']} ms QD {r['depth']}")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        notes.append(f"FAILED {r['workload']} {r['latency_ms']} ms QD "
                     f"{r['depth']} {r['label']}: {r['error'][:300]}")
    return notes


def header_md(blob):
    env, o = blob["environment"], blob["options"]
    prefill = ("written in full (1 MiB writes) by fio before each point, a "
               "fresh server per point" if o.get("prefill", True)
               else "NOT prefilled (reads hit holes)")
    return f"""# NBD server benchmark: memdisk vs nbdkit vs qemu-nbd

Run {blob['stamp']} ({blob['started']}), {blob['elapsed_s'] / 60:.1f} min total.

**Absolute numbers vary by machine and by what else runs on it; only the
ratios between servers within one run count.**

- Machine: {env['cpu_model']}, {env['cores']} cores usable ({env['cpus_online']} online), {env['mem_total_mib']} MiB RAM, Linux {env['kernel']}
- Load average at start: {env['loadavg_start']}; at end: {env.get('loadavg_end', '?')}
- Tools: {env['fio']}; {env['nbdkit']}; {env['qemu_nbd']}; Python {env['python']}
- memdisk: build/memdisk (git {env['memdisk_git']}, built {env['memdisk_built']}), `--workers {o['memdisk_workers']}`
- Client: fio nbd engine (libnbd), one connection per fio job, {o['runtime']} s per point, time-based, `--norandommap`; disk size {o['size']}, {prefill}
- Server CPU = utime+stime from /proc/PID/stat over the measured fio run ÷ IOs (≈ marks values from fewer than {MIN_TICKS} clock ticks of {1000 // CLK_TCK} ms: coarse); threads and RSS sampled from /proc/PID/status every {SAMPLE_INTERVAL * 1000:.0f} ms; RSS − data = peak RSS minus the disk data held in the server's memory; RSS growth = peak RSS − RSS after the prefill; HWM = VmHWM at the end (prefill included); fio CPU from wait4() rusage of fio and its job processes; "others CPU" = what the rest of the machine used meanwhile (/proc/stat), the noise indicator
- Loop CPU = utime+stime of the event-loop threads (/proc/PID/task/TID/stat: the main thread and any `nbdkit-loop-N`) over the fio run ÷ IOs, for memdisk and the asio gateway; other thr CPU = the rest of their threads (memdisk's latency-emulating workers, the gateway's asio pool); threads that exit during the run count 0, new ones from 0; – for nbdkit and qemu-nbd
- Proxies (asio-gateway, nbdkit nbd -tQD; {PROXY_LATENCY} ms random reads only) front a memdisk upstream with the same latency started for the point; the prefill goes through the proxy; srv CPU, threads and RSS are the proxy's, the upstream's CPU is its own column
- Little bound = total queue depth ÷ latency; "in flight" = IOPS × mean latency
- Command: `{blob['command']}`
- Points: {len(blob['results'])} run, {len(blob['skipped'])} skipped as meaningless (see the JSON)
"""


# ---------------------------------------------------------------------------
# SVG plot (hand-made)

COLORS = {"memdisk-tls": "#ff9896", "nbdkit-tls": "#aec7e8",
          "memdisk": "#d62728", "memdisk-cap": "#ff7f0e", "nbdkit-t16": "#1f77b4",
          "nbdkit-tqd": "#2ca02c", "qemu-nbd": "#9467bd", "memdisk-2loops": "#8c564b",
          "gateway": "#e377c2", "nbdkit-nbd": "#17becf"}
NAMES = {"memdisk-tls": "memdisk over TLS", "nbdkit-tls": "nbdkit -t16 over TLS",
         "memdisk": "memdisk (ours)",
         "memdisk-cap": f"memdisk --max-inflight {MEMDISK_CAP}", "nbdkit-t16": "nbdkit -t16",
         "nbdkit-tqd": "nbdkit -t QD", "qemu-nbd": "qemu-nbd", "memdisk-2loops": "memdisk --loops 2",
         "gateway": "asio-gateway (proxy)", "nbdkit-nbd": "nbdkit nbd -t QD (proxy)"}


def esc(s):
    return (str(s).replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;"))


def nice_num(v):
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def nice_step(raw):
    """1, 2 or 5 times a power of ten, at least raw."""
    e = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if m * e >= raw:
            return m * e
    return 10 * e


def svg_plot(rows, title):
    good = [r for r in rows if "error" not in r]
    curve_wl = [w for w in ("randread", "randwrite", "seqread", "seqwrite")
                if any(r["workload"] == w for r in good)]
    lats = sorted({r["latency_ms"] for r in good})
    has_mc = any(r["workload"] == "multiconn" for r in good)
    PW, PH = 300, 220          # panel plot area
    ML, MR, MT, MB = 62, 14, 34, 40
    CW, CH = PW + ML + MR, PH + MT + MB
    ncols = max(1, len(lats))
    nrows = len(curve_wl) + (1 if has_mc else 0)
    TOP = 56
    W = ncols * CW + 10
    servers = [s for s in KNOWN_SERVERS if any(r["server"] == s for r in good)]
    # The legend: one entry per server, then the Little bound, wrapped
    # into as many lines as the width needs.
    legend, lx, line = [], 10, 0
    for s in servers + [None]:
        width = 30 + 7 * len(NAMES[s]) if s else 110
        if lx > 10 and lx + width > W - 10:
            lx, line = 10, line + 1
        legend.append((s, lx, line))
        lx += width
    LEG = 30 + 18 * line
    H = TOP + nrows * CH + LEG + 10
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="15" '
         f'font-weight="bold">{esc(title)}</text>',
         f'<text x="{W / 2}" y="38" text-anchor="middle" fill="#555">'
         f'log-log; dashed grey = Little bound (QD ÷ latency); absolute '
         f'numbers vary by machine, compare within one run</text>']

    def panel(ix, iy):
        return 5 + ix * CW + ML, TOP + iy * CH + MT

    for iy, w in enumerate(curve_wl):
        key, unit = metric(w)
        for ix, L in enumerate(lats):
            x0, y0 = panel(ix, iy)
            pts = [r for r in good if r["workload"] == w
                   and r["latency_ms"] == L]
            o.append(f'<text x="{x0 + PW / 2}" y="{y0 - 8}" '
                     f'text-anchor="middle" font-weight="bold">'
                     f'{esc(WORKLOADS[w][2])}, {L} ms</text>')
            o.append(f'<rect x="{x0}" y="{y0}" width="{PW}" height="{PH}" '
                     f'fill="none" stroke="#999"/>')
            if not pts:
                o.append(f'<text x="{x0 + PW / 2}" y="{y0 + PH / 2}" '
                         f'text-anchor="middle" fill="#999">not run</text>')
                continue
            depths = sorted({r["depth"] for r in pts})
            dmin, dmax = min(depths), max(depths)
            if dmin == dmax:
                dmin, dmax = dmin / 2, dmax * 2
            lx0, lx1 = math.log10(dmin), math.log10(dmax)
            pad = (lx1 - lx0) * 0.06
            lx0, lx1 = lx0 - pad, lx1 + pad
            vals = [r[key] for r in pts if r[key] > 0]
            bounds = []
            if L > 0:
                # In MiB/s for 1 MiB I/O, the bound has the same number.
                per_io = (parse_size(WORKLOADS[w][1].upper()) / (1 << 20)
                          if key == "mib_s" else 1)
                bounds = [(d, d / (L / 1000) * per_io) for d in depths]
                vals += [b for _, b in bounds]
            ly0 = math.floor(math.log10(max(min(vals), 1e-3)))
            ly1 = math.ceil(math.log10(max(vals)))
            if ly1 <= ly0:
                ly1 = ly0 + 1

            def X(d):
                return x0 + (math.log10(d) - lx0) / (lx1 - lx0) * PW

            def Y(v):
                v = max(v, 10 ** ly0)
                return y0 + PH - (math.log10(v) - ly0) / (ly1 - ly0) * PH

            mults = (1, 2, 5) if ly1 - ly0 <= 2 else (1,)
            for e in range(ly0, ly1 + 1):
                for m in mults:
                    v = m * 10 ** e
                    if v > 10 ** ly1:
                        break
                    yy = Y(v)
                    o.append(f'<line x1="{x0}" y1="{yy:.1f}" x2="{x0 + PW}" '
                             f'y2="{yy:.1f}" stroke="'
                             f'{"#e4e4e4" if m == 1 else "#f3f3f3"}"/>')
                    o.append(f'<text x="{x0 - 4}" y="{yy + 4:.1f}" '
                             f'text-anchor="end">{nice_num(v)}</text>')
            for d in depths:
                xx = X(d)
                o.append(f'<line x1="{xx:.1f}" y1="{y0}" x2="{xx:.1f}" '
                         f'y2="{y0 + PH}" stroke="#eee"/>')
                o.append(f'<text x="{xx:.1f}" y="{y0 + PH + 14}" '
                         f'text-anchor="middle">{d}</text>')
            o.append(f'<text x="{x0 + PW / 2}" y="{y0 + PH + 30}" '
                     f'text-anchor="middle" fill="#555">queue depth</text>')
            o.append(f'<text x="{x0 - 48}" y="{y0 + PH / 2}" '
                     f'text-anchor="middle" fill="#555" transform="rotate(-90 '
                     f'{x0 - 48} {y0 + PH / 2})">{unit}</text>')
            if len(bounds) > 1:
                path = " ".join(f"{X(d):.1f},{Y(b):.1f}" for d, b in bounds)
                o.append(f'<polyline points="{path}" fill="none" '
                         f'stroke="#888" stroke-dasharray="5,4"/>')
            # Ours last, thinnest and on top, so that the others show
            # around it where they coincide.
            for s in reversed(servers):
                sp = sorted([r for r in pts if r["server"] == s],
                            key=lambda r: r["depth"])
                if not sp:
                    continue
                c = COLORS[s]
                wdt, rad = (2, 3.5) if s == "memdisk" else (3.5, 4.5)
                if len(sp) > 1:
                    path = " ".join(f"{X(r['depth']):.1f},{Y(r[key]):.1f}"
                                    for r in sp)
                    o.append(f'<polyline points="{path}" fill="none" '
                             f'stroke="{c}" stroke-width="{wdt}" '
                             f'stroke-opacity="0.85"/>')
                for r in sp:
                    o.append(f'<circle cx="{X(r["depth"]):.1f}" '
                             f'cy="{Y(r[key]):.1f}" r="{rad}" fill="{c}">'
                             f'<title>{esc(r["label"])} QD {r["depth"]}: '
                             f'{r[key]:,.0f} {unit}</title></circle>')

    if has_mc:
        iy = len(curve_wl)
        for ix, L in enumerate(lats):
            x0, y0 = panel(ix, iy)
            pts = [r for r in good if r["workload"] == "multiconn"
                   and r["latency_ms"] == L]
            pts.sort(key=lambda r: SERVER_ORDER[r["server"]])
            o.append(f'<text x="{x0 + PW / 2}" y="{y0 - 8}" '
                     f'text-anchor="middle" font-weight="bold">'
                     f'multi-connection random reads, {L} ms</text>')
            o.append(f'<rect x="{x0}" y="{y0}" width="{PW}" height="{PH}" '
                     f'fill="none" stroke="#999"/>')
            if not pts:
                o.append(f'<text x="{x0 + PW / 2}" y="{y0 + PH / 2}" '
                         f'text-anchor="middle" fill="#999">not run</text>')
                continue
            top = max(r["iops"] for r in pts)
            bound = pts[0].get("little_bound_iops")
            if bound:
                top = max(top, bound)
            step = nice_step(top * 1.1 / 5)
            top = step * math.ceil(top * 1.1 / step)
            bw = PW / (len(pts) * 1.5 + 0.5)
            v = 0
            while v <= top * 1.0001:
                yy = y0 + PH - v / top * PH
                o.append(f'<line x1="{x0}" y1="{yy:.1f}" x2="{x0 + PW}" '
                         f'y2="{yy:.1f}" stroke="#eee"/>')
                o.append(f'<text x="{x0 - 4}" y="{yy + 4:.1f}" '
                         f'text-anchor="end">{nice_num(v)}</text>')
                v += step
            for i, r in enumerate(pts):
                bx = x0 + bw * 0.5 + i * bw * 1.5
                hh = r["iops"] / top * PH
                o.append(f'<rect x="{bx:.1f}" y="{y0 + PH - hh:.1f}" '
                         f'width="{bw:.1f}" height="{hh:.1f}" '
                         f'fill="{COLORS[r["server"]]}"><title>'
                         f'{esc(r["label"])}: {r["iops"]:,.0f} IOPS</title>'
                         f'</rect>')
                o.append(f'<text x="{bx + bw / 2:.1f}" y="{y0 + PH - hh - 4:.1f}" '
                         f'text-anchor="middle" font-size="10">'
                         f'{nice_num(round(r["iops"], -2))}</text>')
                o.append(f'<text x="{bx + bw / 2:.1f}" y="{y0 + PH + 14}" '
                         f'text-anchor="middle" font-size="10">'
                         f'{esc(r["label"])}</text>')
            if bound:
                yy = y0 + PH - bound / top * PH
                o.append(f'<line x1="{x0}" y1="{yy:.1f}" x2="{x0 + PW}" '
                         f'y2="{yy:.1f}" stroke="#888" '
                         f'stroke-dasharray="5,4"/>')
            o.append(f'<text x="{x0 + PW / 2}" y="{y0 + PH + 30}" '
                     f'text-anchor="middle" fill="#555">'
                     f'{pts[0]["jobs"]} connections × QD {pts[0]["depth"]}, '
                     f'IOPS</text>')

    for s, lx, line in legend:
        ly = H - LEG + 4 + 18 * line
        if s is None:
            o.append(f'<line x1="{lx}" y1="{ly + 5}" x2="{lx + 20}" '
                     f'y2="{ly + 5}" stroke="#888" stroke-dasharray="5,4"/>')
            o.append(f'<text x="{lx + 24}" y="{ly + 9}">Little bound</text>')
            continue
        o.append(f'<rect x="{lx}" y="{ly}" width="14" height="10" '
                 f'fill="{COLORS[s]}"/>')
        o.append(f'<text x="{lx + 18}" y="{ly + 9}">{esc(NAMES[s])}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


# ---------------------------------------------------------------------------
# Main


def int_list(s):
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {s}")


def name_list(allowed):
    def parse(s):
        names = [x.strip() for x in s.split(",") if x.strip()]
        for n in names:
            if n not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown {n!r}; choose from {','.join(allowed)}")
        return names
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Benchmark build/memdisk against nbdkit and qemu-nbd "
        "with fio's nbd engine.")
    ap.add_argument("--latencies", type=int_list, default=None,
                    help="injected latencies in ms (default 0,10,50)")
    ap.add_argument("--depths", type=int_list, default=None,
                    help="queue depths (default 1,64,256,1024,4096)")
    ap.add_argument("--servers", type=name_list(KNOWN_SERVERS), default=None,
                    help=f"subset of {','.join(KNOWN_SERVERS)} (default "
                    f"{','.join(ALL_SERVERS)}; the -tls ones serve over TLS; "
                    f"gateway and nbdkit-nbd are proxies in front of a "
                    f"memdisk, run at {PROXY_LATENCY} ms, random reads, QD "
                    f"{','.join(map(str, PROXY_DEPTHS))} only)")
    ap.add_argument("--workloads", type=name_list(ALL_WORKLOADS),
                    default=None,
                    help=f"subset of {','.join(ALL_WORKLOADS)} (default all)")
    ap.add_argument("--runtime", type=float, default=None,
                    help="seconds of fio per point (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="random reads + multi-connection only, depths "
                    "1,64,1024,4096, 3 s per point (explicit options win)")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke test: one 1 s point per server (0 ms, QD 32, "
                    "random reads)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (default bench/results)")
    ap.add_argument("--size", default=None,
                    help="disk size of every server (default 256M; 64M "
                    "with --tiny)")
    ap.add_argument("--no-prefill", dest="prefill", action="store_false",
                    help="do not write the whole disk before each point "
                    "(qemu-nbd then answers reads with holes, no payload)")
    ap.add_argument("--memdisk-workers", type=int, default=2,
                    help="memdisk --workers (default 2)")
    ap.add_argument("--nbdkit-max-threads", type=int, default=4096,
                    help="cap for nbdkit -t QD; the label shows the -t used "
                    "(default 4096)")
    ap.add_argument("--seq-max-depth", type=int, default=256,
                    help="skip 1 MiB sequential reads and writes above this "
                    "queue depth (default 256)")
    ap.add_argument("--jobs", type=int, default=4,
                    help="connections (fio jobs) of the multi-connection run "
                    "(default 4)")
    ap.add_argument("--multiconn-depth", type=int, default=256,
                    help="queue depth per connection of the multi-connection "
                    "run (default 256)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every point N times and keep the run with the "
                    "median IOPS (all IOPS kept in the JSON; default 1)")
    ap.add_argument("--render", metavar="JSON",
                    help="write the report of an earlier run again from its "
                    "JSON (after changing this script), measuring nothing")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the points and exit")
    args = ap.parse_args(argv)

    if args.tiny:
        defaults = dict(latencies=[0], depths=[32], workloads=["randread"],
                        runtime=1, size="64M")
    elif args.quick:
        defaults = dict(latencies=DEFAULT_LATENCIES, depths=[1, 64, 1024, 4096],
                        workloads=["randread", "multiconn"], runtime=3)
    else:
        defaults = dict(latencies=DEFAULT_LATENCIES, depths=DEFAULT_DEPTHS,
                        workloads=ALL_WORKLOADS, runtime=5)
    defaults["servers"] = ALL_SERVERS
    defaults.setdefault("size", "256M")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.runtime == int(args.runtime):
        args.runtime = int(args.runtime)
    if args.runtime <= 0 or any(d < 1 for d in args.depths) or \
            any(L < 0 for L in args.latencies):
        ap.error("runtime and depths must be positive, latencies >= 0")
    return args


def check_tools(args, points):
    """The tools the planned points need (not every server named: most
    skip most points)."""
    servers = {p[0] for p in points}
    missing = []
    if (any(s.startswith("memdisk") or s in PROXY_SERVERS for s in servers)
            and not os.access(MEMDISK, os.X_OK)):
        missing.append(f"{MEMDISK} (run `make`)")
    if "gateway" in servers and not os.access(GATEWAY, os.X_OK):
        missing.append(f"{GATEWAY} (run `make`)")
    need = {"fio"}
    if any(s.startswith("nbdkit") for s in servers):
        need.add("nbdkit")
    if "qemu-nbd" in servers:
        need.add("qemu-nbd")
    for t in sorted(need):
        if shutil.which(t) is None:
            missing.append(t)
    if "nbdkit-nbd" in servers and "nbdkit" not in missing:
        try:
            ok = subprocess.run(["nbdkit", "--dump-plugin", "nbd"],
                                capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if not ok:
            missing.append("nbdkit's nbd plugin")
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)} "
                 f"(`make check-deps` installs the tools)")


def on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args.render, args.out)
    points, skipped = plan(args)
    if args.dry_run:
        for p in points:
            print("run ", *p)
        for s in skipped:
            print("skip", *s)
        print(f"{len(points)} points, about "
              f"{len(points) * (args.runtime + 2.0) * args.repeat / 60:.1f} min")
        return 0
    check_tools(args, points)
    signal.signal(signal.SIGTERM, on_sigterm)
    env = environment(args)
    started = datetime.datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    t_start = time.monotonic()
    print(f"bench: {len(points)} points ({len(skipped)} skipped), "
          f"{args.runtime} s each, about "
          f"{len(points) * (args.runtime + 2.0) * args.repeat / 60:.1f} min; "
          f"{env['cpu_model']}, {env['cores']} cores, load {env['loadavg_start']}",
          file=sys.stderr, flush=True)
    rows = []
    interrupted = False
    try:
        for i, (kind, w, L, qd) in enumerate(points, 1):
            row = run_repeated(kind, w, L, qd, args)
            rows.append(row)
            el = time.monotonic() - t_start
            eta = el / i * (len(points) - i)
            if "error" in row:
                res = "FAILED: " + row["error"][:200]
            else:
                res = (f"{row['iops']:>9,.0f} IOPS {row['mib_s']:>8,.1f} MiB/s "
                       f"lat {row['lat_mean_ms']:8.3f} ms  srv "
                       f"{row['server_cpu_us_per_io']:6.1f} µs/IO "
                       + (f"(loop {row['loop_cpu_us_per_io']:.1f}) "
                          if row.get("loop_cpu_us_per_io") is not None
                          else "")
                       + (f"up {row['upstream_cpu_us_per_io']:.1f} µs/IO "
                          if row.get("upstream_cpu_us_per_io") is not None
                          else "") +
                       f"{row['threads_peak']:>4} thr "
                       f"{row['hwm_mib']:6.1f} MiB  fio "
                       f"{row['client_cpu_pct']:3.0f} %")
            qds = f"{row['jobs']}x{qd}" if row["jobs"] > 1 else str(qd)
            print(f"[{i:3}/{len(points)}] {w:9} {L:>3} ms QD {qds:>6} "
                  f"{row['label']:13} {res}  (eta {eta / 60:.1f} min)",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; writing what was measured",
              file=sys.stderr)
    elapsed = time.monotonic() - t_start
    with open("/proc/loadavg") as f:
        env["loadavg_end"] = " ".join(f.read().split()[:3])
    blob = {
        "stamp": stamp, "started": started.isoformat(timespec="seconds"),
        "elapsed_s": elapsed, "interrupted": interrupted,
        "command": " ".join(sys.argv), "environment": env,
        "options": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(args).items()},
        "skipped": [dict(zip(("workload", "latency_ms", "depth", "server",
                              "reason"), s)) for s in skipped],
        "results": rows,
    }
    md_text = write_outputs(blob, args.out)
    print(md_text)
    if interrupted:
        return 130
    return 1 if any("error" in r for r in rows) else 0


def write_outputs(blob, out):
    """Targets, notes, markdown, SVG and JSON of one run, into out/."""
    rows, env, stamp = blob["results"], blob["environment"], blob["stamp"]
    blob["targets"] = tgt = targets(rows)
    blob["targets_issue17"] = tgt17 = targets_issue17(rows)
    blob["notes"] = notes = observations(rows)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"bench-{stamp}"
    md = [header_md(blob)]
    if blob.get("interrupted"):
        md.append("**Interrupted: partial run.**\n")
    md.append(f"![IOPS vs queue depth]({base.name}.svg)\n")
    md.append("## Targets (issue 17)\n")
    md.append("Server CPU per IO against nbdkit (e1–e3), the asio gateway "
              "against nbdkit's nbd plugin as the other proxy (e4), 1 MiB "
              "sequential throughput (e5, e6).\n")
    md += [f"- {t}" for t in tgt17]
    md.append("")
    md.append("## Targets (issue 5)\n")
    md += [f"- {t}" for t in tgt]
    md.append("")
    md.append("## Results\n")
    md.append(results_tables(rows))
    if notes:
        md.append("## Notes\n")
        md += [f"- {n}" for n in notes]
        md.append("")
    if blob["skipped"]:
        reasons = {}
        for s in blob["skipped"]:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        md.append("## Skipped points\n")
        md += [f"- {n} × {why}" for why, n in reasons.items()]
        md.append("")
    md_text = "\n".join(md)
    svg = svg_plot(rows, f"NBD servers, fio nbd engine — {env['cpu_model']}, "
                   f"{env['cores']} cores, {stamp}")
    js = json.dumps(blob, indent=1) + "\n"
    base.with_suffix(".md").write_text(md_text)
    base.with_suffix(".svg").write_text(svg)
    base.with_suffix(".json").write_text(js)
    (out / "latest.md").write_text(
        md_text.replace(f"({base.name}.svg)", "(latest.svg)"))
    (out / "latest.svg").write_text(svg)
    (out / "latest.json").write_text(js)

    print("\n## Targets (issue 17)\n", file=sys.stderr)
    for t in tgt17:
        print(f"- {t}", file=sys.stderr)
    print("\n## Targets (issue 5)\n", file=sys.stderr)
    for t in tgt:
        print(f"- {t}", file=sys.stderr)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"\nbench: {len(rows)} points in {blob['elapsed_s'] / 60:.1f} min; "
          f"wrote {base}.{{md,json,svg}} and {out}/latest.*", file=sys.stderr)
    return md_text


def render(json_path, out):
    """--render: the report of an earlier run again, from its JSON."""
    blob = json.loads(Path(json_path).read_text())
    blob.setdefault("started", blob["stamp"])
    blob.setdefault("command", "bench/run.py")
    for r in blob["results"]:
        if "server_cpu_s" in r:
            r.setdefault("server_cpu_ticks", round(r["server_cpu_s"] * CLK_TCK))
    write_outputs(blob, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
