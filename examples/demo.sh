#!/usr/bin/env bash
# The short demo: start the daemon, drive /dev/ksm from C and from Python,
# watch the scanner merge identical pages; then the same with --merge kernel,
# where the host kernel's KSM shares them for real; stop.
# Runs where CUSE exists (inside the VM that `make demo` boots, or on a real
# machine with the cuse module); needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

$PYTHON -m cuse_ksm --log-level debug &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon' EXIT
for _ in $(seq 300); do [ -c /dev/ksm ] && break; sleep 0.1; done
[ -c /dev/ksm ] || { echo "demo: /dev/ksm did not appear" >&2; exit 1; }
ls -l /dev/ksm

echo "== an unmodified C program compiled against include/linux/ksm.h"
make -s -C tests/c
tests/c/bin/ksm_abi_sequence
echo "== the same from Python (examples/pyksm.py, ctypes)"
$PYTHON examples/pyksm.py

echo "== kksmd at work: 1024 identical pages registered, merged on the second pass"
stats=/run/cuse-ksm/ksm
coproc merger { tests/c/bin/ksm_merge_wait 1024 4096 10000; }
while read -r word pid addr <&"${merger[0]}" && [ "$word" != ready ]; do :; done
echo "pid $pid registered 1024 identical pages at $addr and started the scanner"
for _ in $(seq 600); do
    [ "$(cat $stats/pages_sharing)" = 1023 ] && break
    sleep 0.1
done
echo "pages_shared $(cat $stats/pages_shared), pages_sharing $(cat $stats/pages_sharing), full_scans $(cat $stats/full_scans)"
$PYTHON -m cuse_ksm status
exec {merger[1]}>&-  # end of its stdin: it exits
wait "$merger_PID"

echo "== --merge kernel: the same program, and the host kernel's KSM shares the pages for real"
kill -TERM $daemon; wait $daemon || true
settings() { (cd /sys/kernel/mm/ksm && echo "run=$(cat run) pages_to_scan=$(cat pages_to_scan) sleep_millisecs=$(cat sleep_millisecs)"); }
echo "host KSM before: $(settings)"
$PYTHON -m cuse_ksm --merge kernel &
daemon=$!
for _ in $(seq 300); do [ -c /dev/ksm ] && break; sleep 0.1; done
[ -c /dev/ksm ] || { echo "demo: /dev/ksm did not appear" >&2; exit 1; }
coproc merger { tests/c/bin/ksm_merge_wait 1024 1024 20000; }
while read -r word pid addr <&"${merger[0]}" && [ "$word" != ready ]; do :; done
echo "pid $pid registered 1024 identical pages; its own madvise made them mergeable; host KSM now: $(settings)"
# The kernel shares a page among at most max_page_sharing (256) sites, so
# it keeps 4 copies of this one where the 2009 driver kept 1: the counts
# differ, the memory saved hardly does.
for _ in $(seq 600); do
    [ "$(cat /proc/"$pid"/ksm_merging_pages)" -ge 1020 ] && break
    sleep 0.1
done
echo "/proc/$pid/ksm_merging_pages: $(cat /proc/"$pid"/ksm_merging_pages) (the kernel's own count)"
$PYTHON -m cuse_ksm status
exec {merger[1]}>&-
wait "$merger_PID"
kill -TERM $daemon; wait $daemon
trap - EXIT
echo "host KSM after the daemon stopped: $(settings)"
