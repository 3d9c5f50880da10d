#!/bin/bash
# The daemon against a minimal C CUSE server (libfuse3), same VM, same load.
#
#   tests/vm/run bench/cuse_c/compare.sh        (from the repository root, host)
#
# Inside the VM: loads cuse, builds bench/cuse_c, starts the C server as
# /dev/ksmc (single-threaded, libfuse's -s, as the daemon is) and the daemon
# as /dev/ksmpy (no control files, log level warning), then runs
# bench/cuse_c/bin/ksm_load against each in turn: GET_API_VERSION (one round
# trip) and GET_INFO_KTHREAD (the RETRY dance, two round trips), with 1 and
# with 64 client processes, SECONDS_EACH (default 10) seconds each.  Prints a
# table with each server's throughput, latency and CPU time per call (from
# /proc/PID/schedstat), and the daemon/C throughput ratio.
#
# Two CPU layouts, each with its own table (LAYOUTS, default "shared pinned"):
#   shared  nothing pinned: clients and server share both CPUs, as they would
#           on a desktop.
#   pinned  the server alone on CPU 0, the clients on the others: the usual
#           way to measure a server, its load generator kept off its CPU.
# Under QEMU's software emulation they differ for the daemon far more than
# they would on hardware: see docs/benchmarks.md.
#
# Environment: SECONDS_EACH, PROCS ("1 64"), LAYOUTS ("shared pinned"),
# MODES ("api info"; tests/vm/bench-cuse-short.sh runs only info, which makes
# both kinds of round trip).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
PYTHON=${PYTHON:-python3}
each=${SECONDS_EACH:-10}
procs_list=${PROCS:-1 64}
say() { printf 'compare.sh: %s\n' "$*"; }

source bench/cuse_c/servers.sh
start_c_server ksmc
start_daemon ksmpy
wait_for_servers
say "kernel $(uname -r), $(nproc) CPUs, $each s per run"
last_cpu=$(($(nproc) - 1))

# Server CPU time (ns, from schedstat: precise, not tick-sampled).
cpu_ns() { awk '{ print $1 }' "/proc/$1/schedstat"; }

status=0
for layout in ${LAYOUTS:-shared pinned}; do
    case $layout in
    shared) server_cpus=0-$last_cpu client_cpus=0-$last_cpu ;;
    pinned)
        if ((last_cpu < 1)); then
            say "pinned layout needs 2 CPUs; skipped"
            continue
        fi
        server_cpus=0 client_cpus=1-$last_cpu
        ;;
    *) say "unknown layout '$layout'"; exit 2 ;;
    esac
    for server in ksmc ksmpy; do
        taskset -a -p -c "$server_cpus" "${server_pid[$server]}" >/dev/null || exit 1
    done
    declare -A rate p50 p99 cpu
    for mode in ${MODES:-api info}; do
        for procs in $procs_list; do
            for server in ksmc ksmpy; do
                before=$(cpu_ns "${server_pid[$server]}")
                line=$(load "$client_cpus" "$mode" "$procs" "$each" "$server") || status=1
                after=$(cpu_ns "${server_pid[$server]}")
                echo "$layout $server: $line"
                key=$mode.$procs.$server
                rate[$key]=$(field "$line" ops_per_s)
                p50[$key]=$(field "$line" p50_us)
                p99[$key]=$(field "$line" p99_us)
                ops=$(field "$line" ops)
                cpu[$key]=$(awk -v ns=$((after - before)) -v n="${ops:-0}" 'BEGIN { printf "%.0f", n ? ns / 1e3 / n : 0 }')
            done
        done
    done
    echo
    echo "layout $layout: servers on CPU $server_cpus, clients on CPU $client_cpus"
    printf '%-16s %5s | %8s %7s %7s %6s | %8s %7s %7s %6s | %5s\n' ioctl procs "C ops/s" "p50 us" "p99 us" "cpu us" \
        "daemon" "p50 us" "p99 us" "cpu us" ratio
    for mode in ${MODES:-api info}; do
        name=$([[ $mode == api ]] && echo GET_API_VERSION || echo GET_INFO_KTHREAD)
        for procs in $procs_list; do
            c=$mode.$procs.ksmc py=$mode.$procs.ksmpy
            ratio=$(awk -v a="${rate[$py]:-0}" -v b="${rate[$c]:-0}" 'BEGIN { printf "%.2f", b ? a / b : 0 }')
            printf '%-16s %5s | %8s %7s %7s %6s | %8s %7s %7s %6s | %5s\n' "$name" "$procs" \
                "${rate[$c]:-?}" "${p50[$c]:-?}" "${p99[$c]:-?}" "${cpu[$c]:-?}" \
                "${rate[$py]:-?}" "${p50[$py]:-?}" "${p99[$py]:-?}" "${cpu[$py]:-?}" "$ratio"
        done
    done
    echo
    unset rate p50 p99 cpu
done
exit $status
