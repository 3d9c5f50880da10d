#!/bin/bash
# Instructions the daemon's request loop executes per ioctl, counted by
# valgrind (callgrind): they repeat to within ~1 %, where CPU time on this
# shared machine moves by 15 %.
#
#   bench/instructions.sh [api|info]...        (default: both)
#
# Runs `python -m bench.requests --case C N` under callgrind for two values
# of N and divides the difference of the serving process's totals by the
# difference of N, so start-up and the loop's set-up cancel out.  The
# child process that plays the kernel is counted separately and ignored.
# Needs valgrind (apt-get install valgrind).
set -eu
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind not found" >&2; exit 2; }
py=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
small=2000 large=12000
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
total() { # case n -> instructions of the serving (first) process
    valgrind --tool=callgrind --callgrind-out-file="$tmp/out.%p" "$py" -m bench.requests --case "$1" "$2" \
        >/dev/null 2>"$tmp/log"
    local pid
    pid=$(grep -m1 -o '^==[0-9]*==' "$tmp/log" | tr -d =)
    grep "^==$pid== Collected" "$tmp/log" | awk '{ print $4 }'
}
cases=("$@")
((${#cases[@]})) || cases=(api info)
for c in "${cases[@]}"; do
    a=$(total "$c" $small)
    b=$(total "$c" $large)
    echo "$c: $(((b - a) / (large - small))) instructions per ioctl"
done
