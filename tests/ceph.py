"""A throw-away single-node Ceph cluster for tests: one ceph-mon, one
ceph-osd on the in-memory object store, no mgr, no auth, msgr2 on
127.0.0.1 only, everything (conf, data, logs, sockets) in a private
temporary directory.  Nothing under /etc/ceph or /var/lib/ceph is read or
written: every command gets --conf, and `env` carries CEPH_CONF.

    with CephCluster() as c:
        c.create_pool("rbd")
        c.create_image("rbd", "img", 64 << 20)
        subprocess.run(["rbd", "info", "rbd/img"], env=c.env, check=True)

Measured on the 2-core test machine (Ceph 16.2, Debian 12), start to a
usable image takes about 0.9 s: start() 0.45 s (of which `ceph osd new`,
the only ceph CLI call, is 0.2 s), create_pool() 0.4 s (two ceph/rbd CLI
calls), create_image() 0.04 s; 1.2-1.4 s with both cores busy.  A clean
OSD restart takes 0.3-0.5 s.  The self-check at the bottom
(`/usr/bin/python3 tests/ceph.py`) prints these.

Needs Debian's ceph-mon, ceph-osd and ceph-common (tests/install-deps.sh).
"""

import atexit
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid

START_TIMEOUT = 30.0   # seconds for a daemon to come up
STOP_TIMEOUT = 15.0    # seconds from SIGTERM until SIGKILL
CMD_TIMEOUT = 60.0     # any ceph/rbd command
POLL = 0.02            # poll interval inside the waits
PG_NUM = 8             # "osd pool default pg num" below

# {dir} is the temp dir, {port} the monitor's port, {fsid} the cluster's.
CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{port}]
auth cluster required = none
auth service required = none
auth client required = none
# The default keyring search path is under /etc/ceph: keep away from it.
keyring = {dir}/keyring
# msgr2 on IPv4 loopback only.
ms bind msgr1 = false
ms bind msgr2 = true
ms bind ipv6 = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
run dir = {dir}/run
crash dir = {dir}/crash
pid file = {dir}/run/$name.pid
# Fail instead of waiting the default 300 s for a dead monitor.
client mount timeout = 30
# One OSD: pools of size 1 without warnings, few PGs, no autoscaler
# (that lives in the mgr, which we do not run).
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = {pg_num}
osd pool default pgp num = {pg_num}
osd pool default pg autoscale mode = off
# Replicas across OSDs, not hosts (there is one of each anyway).
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true

[mon]
mon data = {dir}/mon/$cluster-$id
log file = {dir}/log/$name.log
mon cluster log file = {dir}/log/cluster.log
# Each cluster change otherwise waits ~1 s for the paxos batch.
paxos propose interval = 0.05
# Do not shut down when the disk holding /tmp is nearly full.
mon data avail crit = 0
mon data avail warn = 0
# The single OSD must never be marked out (0 disables it).
mon osd down out interval = 0

[osd]
osd data = {dir}/osd/$cluster-$id
log file = {dir}/log/$name.log
osd objectstore = memstore
# Sparse, in RAM: only written pages cost memory.  Without the page set a
# small random write allocates a whole 4 MiB object buffer.
memstore device bytes = 4G
memstore page set = true
memstore page size = 4096
# MemStore saves its objects to osd data only on a clean unmount, which
# the fast shutdown skips: restarting the OSD would lose everything.
osd fast shutdown = false
"""

# Added by write_client_conf(delay_max=...): every message a librados
# client gets from the OSD is held back a random 0..delay_max seconds.
DELAY_CONF = """
[client]
ms inject delay type = osd
ms inject delay max = {delay_max}
ms inject delay probability = 1
"""


class CephError(RuntimeError):
    pass


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _asok(path, prefix, timeout=5.0):
    """One admin-socket command, as `ceph daemon` sends it: the JSON
    command and a NUL, answered by a 4-byte big-endian length and the
    JSON output.  Much faster than spawning the ceph CLI to poll."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"prefix": prefix, "format": "json"}).encode()
                  + b"\0")
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            if not chunk:
                raise OSError("admin socket closed")
            head += chunk
        (n,) = struct.unpack(">I", head)
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise OSError("admin socket closed")
            data += chunk
    return json.loads(data)


class CephCluster:
    """One mon (id "a") and one OSD (id 0) in a fresh temp dir."""

    def __init__(self, keep=False):
        self.keep = keep          # leave the temp dir behind on stop()
        self.dir = None           # the temp dir, while running
        self.conf_path = None     # its ceph.conf
        self.env = None           # os.environ + CEPH_CONF, for subprocesses
        self.port = None          # the monitor's (msgr2, 127.0.0.1)
        self.fsid = None
        self.mon = None           # Popen
        self.osd = None           # Popen
        self.osd_id = None
        self._num_pgs = 0         # PGs of the pools create_pool() made

    # ------------------------------------------------------------------
    # Lifecycle

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self):
        # Also stop the daemons if the test process exits without stop().
        atexit.register(self.stop)
        # Short path: admin socket paths must fit in 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="ceph-")
        for sub in ("run", "log", "crash", "mon", "osd"):
            os.mkdir(os.path.join(self.dir, sub))
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        self.conf_path = os.path.join(self.dir, "ceph.conf")
        with open(self.conf_path, "w") as f:
            f.write(CONF.format(dir=self.dir, port=self.port,
                                fsid=self.fsid, pg_num=PG_NUM))
        self.env = dict(os.environ, CEPH_CONF=self.conf_path)

        # Monitor: a monmap with just us, mkfs, run in the foreground.
        monmap = os.path.join(self.dir, "monmap")
        self._run(["monmaptool", "--create", "--fsid", self.fsid,
                   "--addv", "a", "[v2:127.0.0.1:%d]" % self.port, monmap])
        self._run(["ceph-mon", "--conf", self.conf_path, "--mkfs", "-i", "a",
                   "--monmap", monmap])
        self.mon = self._spawn(["ceph-mon", "-f", "--conf", self.conf_path,
                                "-i", "a"])
        self._wait("ceph-mon to form a quorum", lambda: self._asok_try(
            "mon.a", "mon_status").get("state") == "leader")

        # OSD: allocate its id, mkfs the (memstore) data dir, run it.
        osd_uuid = str(uuid.uuid4())
        self.osd_id = int(self.ceph("osd", "new", osd_uuid).strip())
        os.mkdir(self.osd_data())
        self._run(["ceph-osd", "--conf", self.conf_path, "-i",
                   str(self.osd_id), "--mkfs", "--osd-uuid", osd_uuid])
        self.start_osd()

    def stop(self):
        """Stops the OSD, then the monitor (SIGTERM, SIGKILL after
        STOP_TIMEOUT), and removes the temp dir.  Safe to call more than
        once and after a failed start."""
        atexit.unregister(self.stop)
        try:
            proc, self.osd = self.osd, None
            if proc is not None:
                _terminate(proc)
        finally:
            try:
                proc, self.mon = self.mon, None
                if proc is not None:
                    _terminate(proc)
            finally:
                if self.dir and not self.keep:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    self.dir = None

    def stop_osd(self):
        """Clean OSD shutdown (SIGTERM; MemStore writes its data out)."""
        proc, self.osd = self.osd, None
        if proc is not None:
            rc = _terminate(proc)
            if rc != 0:
                raise CephError("ceph-osd exited with %s\n%s"
                                % (rc, self._log_tails()))

    def start_osd(self):
        """(Re)starts the OSD from its data dir; returns once it is up."""
        assert self.osd is None, "OSD already running"
        self.osd = self._spawn(["ceph-osd", "-f", "--conf", self.conf_path,
                                "-i", str(self.osd_id)])
        # "active" means the OSD has seen itself marked up in a map the
        # monitors committed, so clients see it up too.
        self._wait("ceph-osd to be up", lambda: self._osd_asok(
            "status").get("state") == "active")
        self._wait_pgs_active()

    # ------------------------------------------------------------------
    # Pools, images, snapshots

    def create_pool(self, name):
        """A replicated pool of size 1, initialized for RBD."""
        self.ceph("osd", "pool", "create", name, str(PG_NUM), str(PG_NUM),
                  "replicated", "--size", "1")
        self._num_pgs += PG_NUM
        self._wait_pgs_active()
        self.rbd("pool", "init", name)

    def create_image(self, pool, name, size_bytes):
        """A format 2 image with rbd's default features."""
        self.rbd("create", "--size", "%dB" % size_bytes,
                 "%s/%s" % (pool, name))

    def snapshot(self, pool, image, snap):
        self.rbd("snap", "create", "%s/%s@%s" % (pool, image, snap))

    def write_image(self, pool, image, offset, data):
        """Writes bytes `data` at `offset` of an existing image: `rbd
        import` only creates images, so this pipes a one-extent diff into
        `rbd import-diff`."""
        # "rbd diff v1": header, a 'w' record (le64 offset, le64 length,
        # data), the 'e' end record.
        diff = (b"rbd diff v1\n" + b"w" + struct.pack("<QQ", offset, len(data))
                + bytes(data) + b"e")
        self._run(["rbd", "--conf", self.conf_path, "import-diff",
                   "--no-progress", "-", "%s/%s" % (pool, image)],
                  input=diff)

    def read_image(self, pool, image, snap=None):
        """The whole image (or snapshot) as bytes, via `rbd export`."""
        spec = "%s/%s" % (pool, image) + ("@" + snap if snap else "")
        return self._run(["rbd", "--conf", self.conf_path, "export",
                          "--no-progress", spec, "-"], binary=True)

    # ------------------------------------------------------------------
    # Commands and configuration

    def ceph(self, *args):
        """Runs the ceph CLI against this cluster; returns stdout."""
        return self._run(["ceph", "--conf", self.conf_path, *args])

    def rbd(self, *args):
        """Runs the rbd CLI against this cluster; returns stdout."""
        return self._run(["rbd", "--conf", self.conf_path, *args])

    def write_client_conf(self, path, delay_max=None):
        """Writes a copy of ceph.conf to `path`; with delay_max (seconds),
        librados clients using it get every OSD reply delayed by a random
        0..delay_max, like a cluster across a network."""
        with open(self.conf_path) as f:
            text = f.read()
        if delay_max is not None:
            text += DELAY_CONF.format(delay_max=delay_max)
        with open(path, "w") as f:
            f.write(text)
        return path

    def osd_data(self):
        return os.path.join(self.dir, "osd", "ceph-%d" % self.osd_id)

    # ------------------------------------------------------------------
    # Internals

    def _spawn(self, argv):
        # The daemons log to their files; their stdout/stderr (mostly
        # nothing) go there too, so a crash message is not lost.
        out = open(os.path.join(self.dir, "log", "%s.out" % argv[0]), "ab")
        try:
            return subprocess.Popen(argv, env=self.env,
                                    stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()

    def _run(self, argv, timeout=None, binary=False, input=None):
        """Runs a command to completion; returns its stdout (bytes when
        `binary` or `input` is bytes).  Fails with the daemons' logs."""
        self._check_alive()
        timeout = timeout or CMD_TIMEOUT
        binary = binary or input is not None
        feed = ({"input": input} if input is not None
                else {"stdin": subprocess.DEVNULL})
        try:
            p = subprocess.run(argv, env=self.env, capture_output=True,
                               text=not binary, timeout=timeout, **feed)
        except subprocess.TimeoutExpired:
            raise CephError("timed out after %ss: %s\n%s"
                            % (timeout, " ".join(argv), self._log_tails()))
        if p.returncode != 0:
            err = p.stderr if not binary else p.stderr.decode(errors="replace")
            raise CephError("exit %d: %s\n%s\n%s"
                            % (p.returncode, " ".join(argv), err.strip(),
                               self._log_tails()))
        return p.stdout

    def _asok_try(self, name, prefix):
        """The answer of admin socket command `prefix` of daemon `name`,
        or {} while the socket or the command is not there yet (a daemon
        logs an early poll as "request ... not defined": harmless)."""
        try:
            return _asok(os.path.join(self.dir, "run", "ceph-%s.asok" % name),
                         prefix)
        except (OSError, ValueError):
            return {}

    def _osd_asok(self, prefix):
        return self._asok_try("osd.%d" % self.osd_id, prefix)

    def _wait_pgs_active(self):
        """Waits until the OSD has all the PGs of the pools we created and
        each has peered (the mgr that would report PG states is not run)."""
        seen = {}

        def active():
            pgs = self._osd_asok("dump_pgstate_history").get("pgs", [])
            seen.update((pg["pg"], pg["currently"]) for pg in pgs)
            # "Started/Primary/Active/Clean" etc.; Activating still blocks I/O.
            return (len(pgs) >= self._num_pgs and all(
                "/Active/" in pg["currently"] and
                not pg["currently"].endswith("/Activating") for pg in pgs))
        self._wait(lambda: "the %d PGs to be active; the OSD has %s"
                   % (self._num_pgs, seen), active)

    def _wait(self, what, cond, timeout=None):
        """Polls cond() until true; fails if a daemon dies or on timeout.
        `what` (a string, or a function giving one) names it in errors."""
        timeout = timeout or START_TIMEOUT
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if cond():
                return
            if time.monotonic() > deadline:
                if callable(what):
                    what = what()
                raise CephError("timed out after %ss waiting for %s\n%s"
                                % (timeout, what, self._log_tails()))
            time.sleep(POLL)

    def _check_alive(self):
        for name in ("mon", "osd"):
            proc = getattr(self, name)
            if proc is not None and proc.poll() is not None:
                raise CephError("ceph-%s died (exit %s)\n%s"
                                % (name, proc.returncode, self._log_tails()))

    def _log_tails(self, lines=20):
        """The last lines of every daemon log, for error messages."""
        out = []
        logdir = os.path.join(self.dir or "", "log")
        if not os.path.isdir(logdir):
            return ""
        for name in sorted(os.listdir(logdir)):
            with open(os.path.join(logdir, name), "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                tail = f.read().decode(errors="replace").splitlines()[-lines:]
            if tail:
                out.append("--- %s/%s (tail)\n%s"
                           % (logdir, name, "\n".join(tail)))
        return "\n".join(out)


def _terminate(proc):
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _self_check():
    """Start, write, snapshot, restart the OSD, read back, stop."""
    size, mib = 64 << 20, 1 << 20
    t0 = time.monotonic()
    with CephCluster() as c:
        t1 = time.monotonic()
        c.create_pool("rbd")
        c.create_image("rbd", "img", size)
        t2 = time.monotonic()
        print("start %.2f s, + pool and image %.2f s = usable after %.2f s"
              % (t1 - t0, t2 - t1, t2 - t0))

        data = os.urandom(mib)
        c.write_image("rbd", "img", 3 * mib, data)
        expect = bytes(3 * mib) + data + bytes(size - 4 * mib)
        assert c.read_image("rbd", "img") == expect, "read back differs"
        c.snapshot("rbd", "img", "snap")
        c.write_image("rbd", "img", 3 * mib, bytes(4096))  # differs from snap
        head = bytes(3 * mib + 4096) + data[4096:] + bytes(size - 4 * mib)
        assert c.read_image("rbd", "img") == head, "overwrite differs"

        # 1 MiB of 4 KiB random writes (unknown data: rbd bench picks the
        # byte) exercise the page-set memstore; the restart must keep them.
        c.rbd("bench", "--io-type", "write", "--io-size", "4K",
              "--io-total", "1M", "--io-pattern", "rand", "rbd/img")
        head = c.read_image("rbd", "img")

        t3 = time.monotonic()
        c.stop_osd()
        c.start_osd()
        print("OSD restart %.2f s" % (time.monotonic() - t3))
        assert c.read_image("rbd", "img", "snap") == expect, "snap differs"
        assert c.read_image("rbd", "img") == head, "head differs after restart"

        # A client with injected delays still works (and is slower).
        slow = c.write_client_conf(os.path.join(c.dir, "slow.conf"), 0.01)
        t4 = time.monotonic()
        subprocess.run(["rbd", "--conf", slow, "info", "rbd/img"], env=c.env,
                       check=True, stdout=subprocess.DEVNULL, timeout=60)
        print("rbd info with delay max 0.01: %.2f s" % (time.monotonic() - t4))
    print("ok: total %.2f s" % (time.monotonic() - t0))


if __name__ == "__main__":
    _self_check()
