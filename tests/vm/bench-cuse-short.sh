#!/bin/bash
# A short pass of bench/cuse_c/compare.sh (the daemon against the C libfuse3
# CUSE server), run INSIDE the VM: by guest.sh at the end of `make test-vm`
# (VM_SHORT_BENCH=1), or alone with
#
#   tests/vm/run tests/vm/bench-cuse-short.sh
#
# One cell per layout, for one second: GET_INFO_KTHREAD (the RETRY dance, so
# both a plain and a RETRY reply) from 64 clients (so the daemon's batched
# replies), against each server.  Each cell costs ~4 s of the VM's time and
# starting the servers ~20-35 s, so the full table (16 cells) would add
# ~100 s to every make test; this adds under a minute.
#
# It checks that the comparison still runs end to end: both servers come up,
# no call fails and no client dies (compare.sh's status), and every layout
# prints its table with the row, both servers' throughput and their ratio.
# It asserts no timing, not even that a server answered a call within the
# second: on a loaded host the 64 clients of ksm_load may not all be scheduled
# before their window closes, and a cell then reads 0 ops (seen once under a
# host load of 8).  At 1 s a cell under QEMU's software emulation the figures
# mean nothing; `make bench-cuse` is the measurement.  A server that hangs
# would hang its clients: the whole pass gets 5 minutes, generous for the
# ~1 minute it takes.
#
# Exit status: 0 when all of that holds, else 1.  Output: compare.sh's, then
# one line per problem; also saved in tests/vm/out/bench-cuse-short.log.
set -u
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
out=tests/vm/out
mkdir -p "$out"
log=$out/bench-cuse-short.log
say() { printf 'bench-cuse-short: %s\n' "$*"; }

modes=info
procs_list=64
layouts="shared pinned"
# compare.sh skips the pinned layout on a single CPU; so does this check.
(($(nproc) > 1)) || layouts=shared

SECONDS_EACH=1 MODES=$modes PROCS=$procs_list LAYOUTS=$layouts \
    timeout -k 10 300 bench/cuse_c/compare.sh 2>&1 | tee "$log"
rc=$?
problems=0
problem() { say "FAIL: $*"; problems=$((problems + 1)); }
((rc == 0)) || problem "compare.sh exited with status $rc (124: it ran out of time)"

for layout in $layouts; do
    # A table starts at its "layout NAME:" line and ends at the next blank line.
    table=$(awk -v l="layout $layout:" 'index($0, l) == 1 { on = 1 } on && /^$/ { exit } on' "$log")
    [[ -n $table ]] || { problem "no table for layout $layout"; continue; }
    for mode in $modes; do
        name=$([[ $mode == api ]] && echo GET_API_VERSION || echo GET_INFO_KTHREAD)
        for procs in $procs_list; do
            # ioctl procs | C ops/s p50 p99 cpu | daemon p50 p99 cpu | ratio
            row=$(awk -v n="$name" -v p="$procs" '$1 == n && $2 == p' <<<"$table")
            if [[ -z $row ]]; then
                problem "layout $layout: no row for $name with $procs processes"
            elif ! awk '$4 ~ /^[0-9]+$/ && $9 ~ /^[0-9]+$/ && $NF ~ /^[0-9]+\.[0-9][0-9]$/ { ok = 1 }
                        END { exit !ok }' <<<"$row"; then
                problem "layout $layout: a server's throughput or the ratio is missing: $row"
            fi
        done
    done
done

if ((problems > 0)); then
    say "$problems problem(s); log in $log"
    exit 1
fi
say "every layout printed its table and ratios (no timing checked)"
