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
# with 64 client processes, SECONDS (default 10) each.  Prints a table with
# the daemon/C throughput ratio.  Environment: SECONDS_EACH, PROCS ("1 64").
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
PYTHON=${PYTHON:-python3}
each=${SECONDS_EACH:-10}
procs_list=${PROCS:-1 64}
say() { printf 'compare.sh: %s\n' "$*"; }

modprobe cuse || { say "no cuse module"; exit 1; }
make -s -C bench/cuse_c || exit 1
bench/cuse_c/bin/ksm_cuse -f -s --name ksmc &
c_pid=$!
"$PYTHON" -m cuse_ksm --name ksmpy --no-stats-dir --log-level warning &
py_pid=$!
trap 'kill -TERM $c_pid $py_pid 2>/dev/null; wait' EXIT
for ((i = 0; i < 300; i++)); do
    [[ -c /dev/ksmc && -c /dev/ksmpy ]] && break
    sleep 0.1
done
[[ -c /dev/ksmc && -c /dev/ksmpy ]] || { say "devices did not appear"; exit 1; }
say "kernel $(uname -r), $(nproc) CPUs, $each s per run"

declare -A rate p50 p99
status=0
for mode in api info; do
    for procs in $procs_list; do
        for server in ksmc ksmpy; do
            line=$(bench/cuse_c/bin/ksm_load -m "$mode" -p "$procs" -t "$each" "/dev/$server" | tail -1)
            rc=$?
            echo "$server: $line"
            ((rc == 0)) || status=1
            key=$mode.$procs.$server
            rate[$key]=$(sed -n 's/.* ops_per_s=\([0-9]*\).*/\1/p' <<<"$line")
            p50[$key]=$(sed -n 's/.* p50_us=\([0-9]*\).*/\1/p' <<<"$line")
            p99[$key]=$(sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' <<<"$line")
        done
    done
done
echo
printf '%-18s %6s | %10s %8s %8s | %10s %8s %8s | %7s\n' ioctl procs "C ops/s" "p50 us" "p99 us" "daemon" "p50 us" "p99 us" "ratio"
for mode in api info; do
    name=$([[ $mode == api ]] && echo GET_API_VERSION || echo GET_INFO_KTHREAD)
    for procs in $procs_list; do
        c=$mode.$procs.ksmc py=$mode.$procs.ksmpy
        ratio=$(awk -v a="${rate[$py]:-0}" -v b="${rate[$c]:-0}" 'BEGIN { printf "%.2f", b ? a / b : 0 }')
        printf '%-18s %6s | %10s %8s %8s | %10s %8s %8s | %7s\n' "$name" "$procs" \
            "${rate[$c]:-?}" "${p50[$c]:-?}" "${p99[$c]:-?}" "${rate[$py]:-?}" "${p50[$py]:-?}" "${p99[$py]:-?}" "$ratio"
    done
done
exit $status
