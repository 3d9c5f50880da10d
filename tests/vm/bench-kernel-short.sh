#!/bin/bash
# A short pass of bench/cuse_c/kernel_merge.sh (--merge kernel against
# madvise, the full benchmark being `make bench-kernel`), run INSIDE the VM:
# by guest.sh at the end of `make test-vm` (VM_SHORT_BENCH=1), or alone with
#
#   tests/vm/run tests/vm/bench-kernel-short.sh
#
# One round on 16 MiB (each duplicate content twice), REGISTER timed over 20
# regions per daemon: ~1 minute of the VM's time.  It checks that the
# benchmark still runs end to end: both daemons start and exit 0 with the
# host's KSM settings put back, every run reaches its full merge (the kernel's
# or the emulated one: ksm_kmerge gives up after MERGE_TIMEOUT and prints no
# RESULT line), and the summary has its ratios and REGISTER percentiles.  It
# asserts no timing: at this size under QEMU's software emulation the figures
# mean nothing.  The whole pass gets 10 minutes.
#
# Exit status: 0 when all of that holds, else 1.  Output: kernel_merge.sh's,
# then one line per problem; also saved in tests/vm/out/bench-kernel-short.log.
set -u
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
out=tests/vm/out
mkdir -p "$out"
log=$out/bench-kernel-short.log
say() { printf 'bench-kernel-short: %s\n' "$*"; }

MIB=16 ROUNDS=1 EMULATE_ROUNDS=1 REGIONS=20 REG_ROUNDS=1 MERGE_TIMEOUT=300 \
    timeout -k 10 600 bench/cuse_c/kernel_merge.sh 2>&1 | tee "$log"
rc=$?
problems=0
problem() { say "FAIL: $*"; problems=$((problems + 1)); }
((rc == 0)) || problem "kernel_merge.sh exited with status $rc (124: it ran out of time)"

for key in a b x c; do
    line=$(grep "^$key: RESULT bench=merge " "$log")
    if [[ -z $line ]]; then
        problem "no RESULT line for run ($key)"
    elif ! awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
                END { exit !(v["expected"] > 0 && v["merged"] == v["expected"] && v["merge_s"] ~ /^[0-9.]+$/) }' <<<"$line"; then
        problem "run ($key) did not report a full merge with its time: $line"
    fi
done
grep -Eq '^RATIO a_over_b=[0-9.]+ x_over_b=[0-9.]+ ' "$log" || problem "no RATIO line with both ratios"
for mode in kernel emulate; do
    grep -Eq "^REGISTER --merge $mode: p50_us=[0-9.]+ p99_us=[0-9.]+ create_us=[0-9.]+ " "$log" ||
        problem "no REGISTER percentiles for --merge $mode"
done

if ((problems > 0)); then
    say "$problems problem(s); log in $log"
    exit 1
fi
say "every run merged fully and the summary has its ratios and percentiles (no timing checked)"
