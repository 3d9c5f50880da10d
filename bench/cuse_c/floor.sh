#!/bin/bash
# Where the daemon's time goes under 64 clients of GET_API_VERSION: the C
# server, the daemon, and bench/cuse_c/floor_server.py (the daemon with that
# ioctl answered by a bare loop, one reply per request read: the least a
# Python server does per request), in both CPU layouts of compare.sh.
#
#   tests/vm/run bench/cuse_c/floor.sh          (from the repository root, host)
#
# Per request, for each server: its CPU time and the time it spent runnable
# but waiting for a CPU (/proc/PID/schedstat, in microseconds), and how often
# it was preempted (nonvoluntary_ctxt_switches).  Environment: SECONDS_EACH
# (default 5), ROUNDS (default 2), PROCS (default 64).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
PYTHON=${PYTHON:-python3}
each=${SECONDS_EACH:-5}
procs=${PROCS:-64}
say() { printf 'floor.sh: %s\n' "$*"; }

modprobe cuse || { say "no cuse module"; exit 1; }
make -s -C bench/cuse_c || exit 1
nproc_=$(nproc)
((nproc_ >= 2)) || { say "needs 2 CPUs"; exit 1; }
declare -A pids
bench/cuse_c/bin/ksm_cuse -f -s --name ksmc &
pids[ksmc]=$!
"$PYTHON" -m cuse_ksm --name ksmpy --no-stats-dir --log-level warning &
pids[ksmpy]=$!
"$PYTHON" -m bench.cuse_c.floor_server --name ksmfloor --no-stats-dir --log-level warning &
pids[ksmfloor]=$!
trap 'kill -TERM ${pids[*]} 2>/dev/null; wait' EXIT
for ((i = 0; i < 300; i++)); do
    [[ -c /dev/ksmc && -c /dev/ksmpy && -c /dev/ksmfloor ]] && break
    sleep 0.1
done
[[ -c /dev/ksmc && -c /dev/ksmpy && -c /dev/ksmfloor ]] || { say "devices did not appear"; exit 1; }
say "kernel $(uname -r), $nproc_ CPUs, $procs clients of GET_API_VERSION, $each s per run"

snap() { # run_ns wait_ns nonvoluntary_switches
    echo "$(awk '{ print $1, $2 }' "/proc/$1/schedstat") $(awk '/^nonvoluntary_ctxt_switches/ { print $2 }' "/proc/$1/status")"
}
status=0
for layout in shared pinned; do
    if [[ $layout == shared ]]; then server_cpus=0-$((nproc_ - 1)) client_cpus=$server_cpus
    else server_cpus=0 client_cpus=1-$((nproc_ - 1)); fi
    echo
    echo "layout $layout: servers on CPU $server_cpus, clients on CPU $client_cpus"
    printf '%-9s %8s | %9s %9s %11s\n' server "ops/s" "cpu us" "wait us" "preempted"
    for server in ksmc ksmpy ksmfloor; do
        taskset -a -p -c "$server_cpus" "${pids[$server]}" >/dev/null || exit 1
    done
    for ((round = 1; round <= ${ROUNDS:-2}; round++)); do
        for server in ksmc ksmpy ksmfloor; do
            read -r run0 wait0 nv0 < <(snap "${pids[$server]}")
            line=$(taskset -c "$client_cpus" bench/cuse_c/bin/ksm_load -m api -p "$procs" -t "$each" "/dev/$server" | tail -1)
            rc=$?
            read -r run1 wait1 nv1 < <(snap "${pids[$server]}")
            ((rc == 0)) || { status=1; echo "$server: $line"; }
            ops=$(sed -n 's/.* ops=\([0-9]*\).*/\1/p' <<<"$line")
            rate=$(sed -n 's/.* ops_per_s=\([0-9]*\).*/\1/p' <<<"$line")
            awk -v s="$server" -v n="${ops:-0}" -v r="${rate:-0}" -v run=$((run1 - run0)) -v wait=$((wait1 - wait0)) \
                -v nv=$((nv1 - nv0)) 'BEGIN { if (!n) n = 1
                    printf "%-9s %8d | %9.1f %9.1f %11.2f\n", s, r, run / 1e3 / n, wait / 1e3 / n, nv / n }'
        done
    done
done
exit $status
