#!/bin/bash
# Soak test: fio random writes with crc32c verify reads against build/memdisk.
#
#   tests/soak.sh SECONDS        (make soak runs it with SOAK_SECONDS)
#
# Starts build/memdisk (2 GiB, --latency-ms 5) on a private Unix socket,
# fills the working set once (so the disk's lazily allocated pages are in
# the server's RSS before anything is measured), then runs fio for SECONDS:
# 4 jobs, i.e. 4 NBD connections, each at iodepth 256 doing 4 KiB random
# writes to its own region, verified with crc32c while running
# (verify_backlog) and in a final verify pass. The server's VmRSS is
# sampled every few seconds.
#
# Fails on any fio or verify error, on a server that died or did not exit
# cleanly (status 0) on SIGTERM, and when the RSS at the end exceeds the
# RSS after the first quarter of the run by more than 20 %.
#
# Environment: SOAK_REGION (per-job region, default 128M), SOAK_JOBS
# (default 4), SOAK_IODEPTH (default 256), SOAK_LATENCY_MS (default 5),
# NBDKIT_ASYNC_LOG (passed to the server).

set -u

secs=${1:-}
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 4 ]; then
    echo "usage: $0 SECONDS   (at least 4)" >&2
    exit 2
fi

root=$(cd "$(dirname "$0")/.." && pwd)
memdisk=$root/build/memdisk
region=${SOAK_REGION:-128M}
jobs=${SOAK_JOBS:-4}
iodepth=${SOAK_IODEPTH:-256}
latency=${SOAK_LATENCY_MS:-5}

for tool in fio; do
    command -v "$tool" >/dev/null || { echo "soak: $tool is not installed" >&2; exit 2; }
done
[ -x "$memdisk" ] || { echo "soak: $memdisk missing: run make first" >&2; exit 2; }

tmp=$(mktemp -d /tmp/nbdka-soak.XXXXXX)
sock=$tmp/nbd.sock
# fio may leave files in its working directory: keep them in ours.
cd "$tmp" || exit 2
pid=
fio_pid=

stop_server() {
    # SIGTERM, up to 10 s for a clean exit, then SIGKILL. Sets server_rc.
    server_rc=
    [ -n "$pid" ] || return
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "soak: server ignored SIGTERM for 10 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    wait "$pid" 2>/dev/null
    server_rc=$?
    pid=
}

cleanup() {
    [ -n "$fio_pid" ] && kill -KILL "$fio_pid" 2>/dev/null && wait "$fio_pid" 2>/dev/null
    stop_server
    cd / && rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rss_kib() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null
}

fail() {
    echo "soak: FAIL: $*" >&2
    if [ -s "$tmp/server.log" ]; then
        echo "--- server stderr (last 40 lines)" >&2
        tail -n 40 "$tmp/server.log" >&2
    fi
    exit 1
}

# ---------------------------------------------------------------- server
"$memdisk" --unix "$sock" --size 2G --latency-ms "$latency" \
    >"$tmp/uri" 2>"$tmp/server.log" </dev/null &
pid=$!
for _ in $(seq 100); do
    [ -s "$tmp/uri" ] && break
    kill -0 "$pid" 2>/dev/null || fail "memdisk exited at start"
    sleep 0.1
done
uri=$(head -n 1 "$tmp/uri")
[ -n "$uri" ] || fail "memdisk printed no URI within 10 s"

# One region per job, spread over the disk (0, 512M, 1G, 1.5G).
common=(--ioengine=nbd "--uri=$uri" "--size=$region" "--numjobs=$jobs"
        --offset_increment=512M --group_reporting)

# ---------------------------------------------------------------- fill
if ! fio --name=fill "${common[@]}" --rw=write --bs=1M --iodepth=32 \
        >"$tmp/fill.out" 2>&1; then
    cat "$tmp/fill.out" >&2
    fail "fio fill failed"
fi
rss_start=$(rss_kib)

# ---------------------------------------------------------------- soak
fio --name=soak "${common[@]}" --rw=randwrite --bs=4k "--iodepth=$iodepth" \
    --verify=crc32c --verify_fatal=1 --verify_backlog=4096 --verify_state_save=0 \
    --time_based "--runtime=$secs" >"$tmp/fio.out" 2>&1 &
fio_pid=$!

interval=$(( secs / 20 ))
[ "$interval" -lt 1 ] && interval=1
[ "$interval" -gt 5 ] && interval=5
quarter=$(( secs / 4 ))
start=$(date +%s)
rss_quarter=
rss_peak=0
rss_end=
samples=0
while kill -0 "$fio_pid" 2>/dev/null; do
    sleep "$interval"
    kill -0 "$pid" 2>/dev/null || break
    r=$(rss_kib)
    [ -n "$r" ] || continue
    now=$(( $(date +%s) - start ))
    echo "$now $r" >>"$tmp/rss.log"
    samples=$((samples + 1))
    # Only samples of the write phase count; the final verify pass is
    # reads only (and fio may stop before the next sample anyway).
    if [ "$now" -le "$secs" ]; then
        [ -z "$rss_quarter" ] && [ "$now" -ge "$quarter" ] && rss_quarter=$r
        rss_end=$r
    fi
    [ "$r" -gt "$rss_peak" ] && rss_peak=$r
    # Bound the wait: fio's final verify pass cannot take longer than this.
    if [ "$now" -gt $(( secs * 3 + 120 )) ]; then
        fail "fio still running after $now s"
    fi
done
wait "$fio_pid"
fio_rc=$?
fio_pid=
kill -0 "$pid" 2>/dev/null || { cat "$tmp/fio.out" >&2; fail "the server died during the soak"; }

# One last sample after fio is done: the connections are gone, so what the
# server holds now is the disk and whatever leaked.
r=$(rss_kib)
[ -n "$r" ] && rss_after=$r || rss_after=0
stop_server

# ---------------------------------------------------------------- verdict
# fio's own read IOPS cover only its final verify pass: count per second.
reads=$(sed -n 's/^ *issued rwts: total=\([0-9]*\),.*/\1/p' "$tmp/fio.out" | head -n 1)
writes=$(sed -n 's/^ *issued rwts: total=[0-9]*,\([0-9]*\),.*/\1/p' "$tmp/fio.out" | head -n 1)
verify_errors=$(grep -ciE 'verify.*(fail|bad)|bad magic|crc32c.*wanted' "$tmp/fio.out")
mib() { echo $(( ${1:-0} / 1024 )); }

echo "soak: ${secs}s, $jobs connections x iodepth $iodepth, 4 KiB random writes + crc32c verify reads over $jobs x $region, latency ${latency} ms"
echo "soak: fio exit $fio_rc; ${reads:-?} verified reads, ${writes:-?} writes ($(( ${reads:-0} / secs )) + $(( ${writes:-0} / secs )) per second); verify errors: $verify_errors"
echo "soak: server RSS MiB: after fill $(mib "$rss_start"), at 1/4 $(mib "$rss_quarter"), end $(mib "$rss_end"), peak $(mib "$rss_peak"), idle after fio $(mib "$rss_after") ($samples samples)"
echo "soak: server exit status ${server_rc:-?}"

status=0
if [ "$fio_rc" -ne 0 ] || [ "$verify_errors" -ne 0 ] || ! grep -q 'err= 0' "$tmp/fio.out"; then
    echo "--- fio output" >&2
    cat "$tmp/fio.out" >&2
    echo "soak: FAIL: fio reported errors" >&2
    status=1
fi
if [ -z "$rss_quarter" ] || [ -z "$rss_end" ]; then
    echo "soak: FAIL: too few RSS samples" >&2
    status=1
elif [ $(( rss_end * 100 )) -gt $(( rss_quarter * 120 )) ]; then
    echo "soak: FAIL: RSS grew from $(mib "$rss_quarter") MiB at 1/4 to $(mib "$rss_end") MiB at the end (> 20 %)" >&2
    cat "$tmp/rss.log" >&2
    status=1
fi
if [ "${server_rc:-1}" -ne 0 ]; then
    echo "soak: FAIL: server exit status ${server_rc:-?} after SIGTERM" >&2
    status=1
fi
if grep -qE 'panicked|internal error|nbdkit-async: error' "$tmp/server.log"; then
    echo "--- server stderr" >&2
    tail -n 40 "$tmp/server.log" >&2
    echo "soak: FAIL: errors in the server log" >&2
    status=1
fi
[ "$status" -eq 0 ] && echo "soak: PASS"
exit "$status"
