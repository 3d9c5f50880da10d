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

nproc_=$(nproc)
((nproc_ >= 2)) || { say "needs 2 CPUs"; exit 1; }
source bench/cuse_c/servers.sh
start_c_server ksmc
start_daemon ksmpy
start_daemon ksmfloor . bench.cuse_c.floor_server
wait_for_servers
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
        taskset -a -p -c "$server_cpus" "${server_pid[$server]}" >/dev/null || exit 1
    done
    for ((round = 1; round <= ${ROUNDS:-2}; round++)); do
        for server in ksmc ksmpy ksmfloor; do
            read -r run0 wait0 nv0 < <(snap "${server_pid[$server]}")
            line=$(load "$client_cpus" api "$procs" "$each" "$server") || { status=1; echo "$server: $line"; }
            read -r run1 wait1 nv1 < <(snap "${server_pid[$server]}")
            ops=$(field "$line" ops)
            rate=$(field "$line" ops_per_s)
            awk -v s="$server" -v n="${ops:-0}" -v r="${rate:-0}" -v run=$((run1 - run0)) -v wait=$((wait1 - wait0)) \
                -v nv=$((nv1 - nv0)) 'BEGIN { if (!n) n = 1
                    printf "%-9s %8d | %9.1f %9.1f %11.2f\n", s, r, run / 1e3 / n, wait / 1e3 / n, nv / n }'
        done
    done
done
exit $status
