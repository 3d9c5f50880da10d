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
modprobe cuse || { say "no cuse module"; exit 1; }
make -s -C bench/cuse_c || exit 1
bench/cuse_c/bin/ksm_cuse -f -s --name ksmc &
pids=($!)
names=(ksmc)
for i in "${!dirs[@]}"; do
    # Run from the version's directory: `python -m` puts the cwd first on sys.path.
    (cd "$root/${dirs[$i]}" && exec "$PYTHON" -m cuse_ksm --name "ksmab$i" --no-stats-dir --log-level warning) &
    pids+=($!)
    names+=("ksmab$i")
done
trap 'kill -TERM ${pids[*]} 2>/dev/null; wait' EXIT
for ((t = 0; t < 300; t++)); do
    ok=1
    for name in "${names[@]}"; do [[ -c /dev/$name ]] || ok=0; done
    ((ok)) && break
    sleep 0.1
done
((ok)) || { say "devices did not appear"; exit 1; }
say "kernel $(uname -r), $(nproc) CPUs, ${SECONDS_EACH:-5} s per run; versions: ${labels[*]}"

run() { # mode procs device -> "ops_per_s errors p50 p99"
    bench/cuse_c/bin/ksm_load -m "$1" -p "$2" -t "${SECONDS_EACH:-5}" "/dev/$3" | tail -1 |
        sed -n 's/.* errors=\([0-9]*\) ops_per_s=\([0-9]*\) p50_us=\([0-9]*\).* p99_us=\([0-9]*\).*/\2 \1 \3 \4/p'
}
status=0
for cell in ${CELLS:-api:1 api:64 info:1 info:64}; do
    mode=${cell%:*} procs=${cell#*:}
    for ((round = 1; round <= ${ROUNDS:-3}; round++)); do
        read -r c c_err c50 c99 < <(run "$mode" "$procs" ksmc)
        line=$(printf '%-4s x%-3s C %6s p50 %6s p99 %6s' "$mode" "$procs" "${c:-?}" "${c50:-?}" "${c99:-?}")
        for i in "${!dirs[@]}"; do
            read -r x x_err x50 x99 < <(run "$mode" "$procs" "ksmab$i")
            [[ ${x_err:-1} == 0 && ${c_err:-1} == 0 ]] || status=1
            ratio=$(awk -v a="${x:-0}" -v b="${c:-0}" 'BEGIN { printf "%.2f", b ? a / b : 0 }')
            line+=$(printf ' | %s %6s p50 %6s p99 %6s ratio %s' "${labels[$i]}" "${x:-?}" "${x50:-?}" "${x99:-?}" "$ratio")
        done
        echo "$line"
    done
done
((status == 0)) || say "some run had errors (or no result)"
exit $status
