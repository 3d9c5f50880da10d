#!/usr/bin/env bash
# The short demo: start the daemon, drive /dev/ksm from C and from Python, stop.
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
