#!/bin/bash
# Two (or more) versions of the daemon side by side with the C server, in one
# VM: the way to see whether a change to the request path moves a cell, when
# two runs of the same code differ by ±0.05.
#
#   bench/cuse_c/ab.sh REV [REV...]        (from the repository root, host)
#
# Each REV is a git revision (HEAD~1, a0663ce...) or "worktree" for the
# working tree as it stands.  On the host the script extracts each
# revision's cuse_ksm/ into tests/vm/out/ab/ (the directory the VM shares
# read-write), then boots one VM and runs itself there: the C server as
# /dev/ksmc and each version as /dev/ksmab0, /dev/ksmab1..., all alive at
# once, then for every cell and round runs bench/cuse_c/bin/ksm_load
# against C and each version in turn, so that every version meets the
# same moment of a noisy machine.  Prints throughput, errors, p50/p99 and
# the ratio to C of each version, one line per cell and round.  Servers
# are not pinned (compare.sh's shared layout).
#
# Environment: CELLS (default "api:1 api:64 info:1 info:64": mode:clients),
# ROUNDS (default 3), SECONDS_EACH (default 5).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
root=$PWD
say() { printf 'ab.sh: %s\n' "$*" >&2; }
PYTHON=${PYTHON:-python3}

if [[ ${1:-} != --guest ]]; then
    (($# >= 1)) || { say "usage: bench/cuse_c/ab.sh REV [REV...] (a git revision, or worktree)"; exit 2; }
    rm -rf tests/vm/out/ab && mkdir -p tests/vm/out/ab || exit 1
    dirs=()
    for rev in "$@"; do
        if [[ $rev == worktree ]]; then
            dirs+=(.)
            continue
        fi
        dir=tests/vm/out/ab/$(git rev-parse --short "$rev") || { say "no revision '$rev'"; exit 2; }
        mkdir -p "$dir" && git archive "$rev" cuse_ksm | tar -x -C "$dir" || exit 1
        dirs+=("$dir")
    done
    AB_LABELS="$*" AB_DIRS="${dirs[*]}" VM_PASS_ENV="AB_LABELS AB_DIRS CELLS ROUNDS SECONDS_EACH" \
        PYTHON=$(command -v "$PYTHON") exec tests/vm/run bench/cuse_c/ab.sh --guest
fi

# --- in the VM ----------------------------------------------------------------
read -r -a labels <<<"$AB_LABELS"
read -r -a dirs <<<"$AB_DIRS"
source bench/cuse_c/servers.sh
start_c_server ksmc
for i in "${!dirs[@]}"; do
    start_daemon "ksmab$i" "$root/${dirs[$i]}"
done
wait_for_servers
say "kernel $(uname -r), $(nproc) CPUs, ${SECONDS_EACH:-5} s per run; versions: ${labels[*]}"
all_cpus=0-$(($(nproc) - 1))

run() { # mode procs name -> "ops_per_s p50 p99"; fails if a call failed
    local line
    line=$(load "$all_cpus" "$1" "$2" "${SECONDS_EACH:-5}" "$3")
    local rc=$?
    echo "$(field "$line" ops_per_s) $(field "$line" p50_us) $(field "$line" p99_us)"
    return $rc
}
status=0
for cell in ${CELLS:-api:1 api:64 info:1 info:64}; do
    mode=${cell%:*} procs=${cell#*:}
    for ((round = 1; round <= ${ROUNDS:-3}; round++)); do
        out=$(run "$mode" "$procs" ksmc) || status=1
        read -r c c50 c99 <<<"$out"
        line=$(printf '%-4s x%-3s C %6s p50 %6s p99 %6s' "$mode" "$procs" "${c:-?}" "${c50:-?}" "${c99:-?}")
        for i in "${!dirs[@]}"; do
            out=$(run "$mode" "$procs" "ksmab$i") || status=1
            read -r x x50 x99 <<<"$out"
            ratio=$(awk -v a="${x:-0}" -v b="${c:-0}" 'BEGIN { printf "%.2f", b ? a / b : 0 }')
            line+=$(printf ' | %s %6s p50 %6s p99 %6s ratio %s' "${labels[$i]}" "${x:-?}" "${x50:-?}" "${x99:-?}" "$ratio")
        done
        echo "$line"
    done
done
((status == 0)) || say "some run had errors (or no result)"
exit $status
