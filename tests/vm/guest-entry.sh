#!/bin/bash
# First thing run inside the VM (by tests/vm/run via vng --exec), as root.
# Loads the settings that the host wrote, runs the guest command with stdout
# and stderr merged (they reach the host's stdout live), then writes
# "RUN_ID STATUS" to tests/vm/out/status, which is what the host trusts.
#
#   guest-entry.sh ENV_FILE
set -u

env_file=${1:?usage: guest-entry.sh ENV_FILE}
# shellcheck disable=SC1090
if ! . "$env_file"; then
    echo "guest-entry: cannot read $env_file" >&2
    exit 125 # no status file: the host reports a failure
fi

exec 2>&1
cd "$VM_ROOT" || exit 125

export PYTHONUNBUFFERED=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[[ -w ${HOME:-/nonexistent} ]] || export HOME=/tmp

now=$(date +%s.%N)
read -r uptime _ </proc/uptime
printf 'guest-entry: kernel %s, %s CPUs, %s MiB; guest started %.1fs after the host launched vng (kernel uptime %ss)\n' \
    "$(uname -r)" "$(nproc)" "$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)" \
    "$(awk -v a="$VM_HOST_START" -v b="$now" 'BEGIN {print b - a}')" "$uptime"
echo "guest-entry: running: ${VM_GUEST_CMD[*]}"

"${VM_GUEST_CMD[@]}"
rc=$?

dmesg >"$VM_OUT/dmesg.log" 2>/dev/null
printf '%s %s\n' "$VM_RUN_ID" "$rc" >"$VM_OUT/status.tmp" &&
    mv -f "$VM_OUT/status.tmp" "$VM_OUT/status"
sync
echo "guest-entry: guest command exited with status $rc"
exit "$rc"
