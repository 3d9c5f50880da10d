#!/bin/bash
# The front-end cost of real merging (--merge kernel), in one VM: issue 12's
# "Measure" section.
#
#   make bench-kernel                             (from the repository root, host)
#   = tests/vm/run bench/cuse_c/kernel_merge.sh   with VM_MEMORY and the variables below
#
# Inside the VM: starts three daemons, /dev/ksmkb with --merge kernel,
# /dev/ksmkx with --merge kernel --cross-check and /dev/ksmem with --merge
# emulate (each with its control files under
# /run/cuse-ksm/NAME), then ROUNDS rounds of bench/cuse_c/bin/ksm_kmerge on
# the dup50 workload of MIB MiB, each round in this order:
#
#   (a) dev      registered through /dev/ksmkb (CREATE_SHARED_MEMORY_AREA,
#                REGISTER, START_STOP with PAGES_TO_SCAN and SLEEP_US): until
#                the host kernel's full merge
#   (b) madvise  the same workload madvised by the program, the same knobs
#                written to /sys/kernel/mm/ksm by it: until the same full merge
#   (x) cross    as (a), through /dev/ksmkx: the emulated scanner runs beside
#                ksmd (--cross-check), what (a) did before it was paused by
#                default
#   (c) emulate  registered through /dev/ksmem: until the emulated scanner's
#                full merge (nothing is really merged); only in the first
#                EMULATE_ROUNDS (default 1) rounds: it takes ~10 times (a)
#
# Before (a) and (b), run=2 unmerges everything left, and run goes back to 0
# once pages_shared and pages_sharing are 0.  Each run reports the time from
# its first registration call to the full merge, the daemon's CPU time
# (utime + stime) and ksmd's over that time.  Then REGISTER latency: REG_ROUNDS
# (default 2) runs of `ksm_kmerge register` (REGIONS regions of REGION_PAGES
# pages) against /dev/ksmkb and /dev/ksmem in turn.  The daemons then get
# SIGTERM and must exit 0, and the host's KSM settings must be back.
#
# Prints every RESULT line, then a summary: medians, the ratio (a)/(b) of the
# merge times ("RATIO a_over_b=..."), REGISTER p50/p99 per mode.
#
# Environment: MIB (default 1024), ROUNDS (5), PAGES_TO_SCAN (100000), SLEEP_US
# (0), MERGE_TIMEOUT (seconds per merge, 900), REGIONS (500), REGION_PAGES (4),
# REG_ROUNDS (2), EMULATE_ROUNDS (1).  tests/vm/bench-kernel-short.sh runs a small version.
#
# Exit status: 0, or 1 when a run failed (a call, a merge that never
# completed), a daemon did not exit cleanly, or the settings were not restored.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
PYTHON=${PYTHON:-python3}
mib=${MIB:-1024} rounds=${ROUNDS:-5} to_scan=${PAGES_TO_SCAN:-100000} sleep_us=${SLEEP_US:-0}
merge_timeout=${MERGE_TIMEOUT:-900} regions=${REGIONS:-500} region_pages=${REGION_PAGES:-4}
reg_rounds=${REG_ROUNDS:-2} emulate_rounds=${EMULATE_ROUNDS:-1}
say() { printf 'kernel_merge.sh: %s\n' "$*"; }
ksm=/sys/kernel/mm/ksm
kmerge=bench/cuse_c/bin/ksm_kmerge

source bench/cuse_c/servers.sh
[[ -w $ksm/run ]] || { say "no writable $ksm/run: this kernel has no KSM"; exit 1; }
ksmd=$(pgrep -x ksmd) || { say "no ksmd thread"; exit 1; }
knobs() { echo "run=$(<$ksm/run) pages_to_scan=$(<$ksm/pages_to_scan) sleep_millisecs=$(<$ksm/sleep_millisecs)"; }
knobs_before=$(knobs)

start_daemon ksmkb . cuse_ksm --merge kernel --stats-dir /run/cuse-ksm/ksmkb
start_daemon ksmkx . cuse_ksm --merge kernel --cross-check --stats-dir /run/cuse-ksm/ksmkx
start_daemon ksmem . cuse_ksm --merge emulate --stats-dir /run/cuse-ksm/ksmem
wait_for_servers
for name in ksmkb ksmkx ksmem; do
    for ((i = 0; i < 300; i++)); do
        [[ -e /run/cuse-ksm/$name/run ]] && break
        sleep 0.1
    done
    [[ -e /run/cuse-ksm/$name/run ]] || { say "the control files of $name did not appear"; exit 1; }
done

say "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB," \
    "THP $(sed 's/.*\[\(.*\)\].*/\1/' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo '?');" \
    "KSM before: $knobs_before"
say "workload dup50, $mib MiB; pages_to_scan $to_scan, sleep $sleep_us us; $rounds rounds of (a) dev (b) madvise (x) cross-check, (c) emulate in $emulate_rounds"

# Nothing merged, ksmd stopped: the state each kernel run starts from.
unmerge_all() {
    echo 2 >$ksm/run || return 1
    local i
    for ((i = 0; i < 1200; i++)); do
        (($(<$ksm/pages_shared) == 0 && $(<$ksm/pages_sharing) == 0)) && break
        sleep 0.1
    done
    echo 0 >$ksm/run || return 1
    (($(<$ksm/pages_shared) == 0 && $(<$ksm/pages_sharing) == 0)) ||
        { say "pages still merged 120 s after run=2: $(<$ksm/pages_shared) shared"; return 1; }
}

status=0
declare -A merge_s cpu ksmd_cpu setup_ms
run() { # KEY ARGS... : one ksm_kmerge run, its RESULT line echoed and filed under KEY
    local key=$1 line
    shift
    line=$("$kmerge" "$@" | tail -1)
    echo "$key: $line"
    if [[ $line != RESULT* ]]; then
        say "FAIL: $key: no RESULT line from $kmerge $*"
        status=1
        return 1
    fi
    merge_s[$key]+=" $(sed -n 's/.* merge_s=\([0-9.]*\).*/\1/p' <<<"$line")"
    cpu[$key]+=" $(sed -n 's/.* daemon_cpu_s=\([0-9.]*\).*/\1/p' <<<"$line")"
    ksmd_cpu[$key]+=" $(sed -n 's/.* ksmd_cpu_s=\([0-9.]*\).*/\1/p' <<<"$line")"
    setup_ms[$key]+=" $(sed -n 's/.* setup_ms=\([0-9.]*\).*/\1/p' <<<"$line")"
}
merge_args=(-M "$mib" -p "$to_scan" -s "$sleep_us" -t "$merge_timeout" -K "$ksmd")
for ((round = 1; round <= rounds; round++)); do
    say "round $round of $rounds"
    unmerge_all || status=1
    run a dev "${merge_args[@]}" -d /dev/ksmkb -D "${server_pid[ksmkb]}" -e /run/cuse-ksm/ksmkb
    unmerge_all || status=1
    run b madvise "${merge_args[@]}" -D "${server_pid[ksmkb]}"
    unmerge_all || status=1
    run x dev "${merge_args[@]}" -d /dev/ksmkx -D "${server_pid[ksmkx]}" -e /run/cuse-ksm/ksmkx
    ((round > emulate_rounds)) ||
        run c dev "${merge_args[@]}" -d /dev/ksmem -D "${server_pid[ksmem]}" -e /run/cuse-ksm/ksmem -w emulated
done
unmerge_all || status=1

declare -A p50 p99 create
for ((round = 1; round <= reg_rounds; round++)); do
    for name in ksmkb ksmem; do
        line=$("$kmerge" register -n "$regions" -r "$region_pages" -d "/dev/$name" | tail -1)
        echo "register $name: $line"
        [[ $line == RESULT* ]] || { say "FAIL: register $name: no RESULT line"; status=1; continue; }
        p50[$name]+=" $(field "$line" p50_us)"
        p99[$name]+=" $(field "$line" p99_us)"
        create[$name]+=" $(field "$line" create_us)"
    done
done

for name in ksmkb ksmkx ksmem; do
    stop_server "$name" || status=1
done
knobs_after=$(knobs)
if [[ $knobs_after != "$knobs_before" ]]; then
    say "FAIL: KSM settings not restored: before $knobs_before, after $knobs_after"
    status=1
fi

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2); else print "?" }'; }
echo
say "summary: dup50 $mib MiB, pages_to_scan $to_scan, sleep $sleep_us us; medians (every run listed)"
printf '%-44s | %-9s %-9s %-10s %-9s | %s\n' "run" "merge s" "setup ms" "daemon CPU" "ksmd CPU" "merge s, each round"
for key in a b x c; do
    case $key in
    a) label="(a) /dev/ksm, --merge kernel: kernel merge" ;;
    b) label="(b) madvise + /sys/kernel/mm/ksm" ;;
    x) label="(x) as (a), with --cross-check" ;;
    c) label="(c) /dev/ksm, --merge emulate: emulated" ;;
    esac
    printf '%-44s | %-9s %-9s %-10s %-9s |%s\n' "$label" "$(median "${merge_s[$key]:-}")" \
        "$(median "${setup_ms[$key]:-}")" "$(median "${cpu[$key]:-}")" "$(median "${ksmd_cpu[$key]:-}")" "${merge_s[$key]:-}"
done
over_b() { # KEY: the median merge time of KEY over (b)'s
    awk -v a="$(median "${merge_s[$1]:-}")" -v b="$(median "${merge_s[b]:-}")" \
        'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.3f", a / b; else print "?" }'
}
echo "RATIO a_over_b=$(over_b a) x_over_b=$(over_b x) (medians of the merge times; goal <= 1.1)"
for name in ksmkb ksmem; do
    mode=$([[ $name == ksmkb ]] && echo kernel || echo emulate)
    echo "REGISTER --merge $mode: p50_us=$(median "${p50[$name]:-}") p99_us=$(median "${p99[$name]:-}")" \
        "create_us=$(median "${create[$name]:-}") ($regions regions of $region_pages pages;" \
        "p50s${p50[$name]:-}; p99s${p99[$name]:-}; CREATE_SHARED_MEMORY_AREA${create[$name]:-})"
done
exit $status
