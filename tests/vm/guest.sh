#!/bin/bash
# Integration test run INSIDE the VM (as root, cwd = repository root); the
# default guest command of tests/vm/run.  Do not run it on a host: it loads
# cuse and creates /dev/ksm.
#
#  1. modprobe cuse
#  2. start the daemon from the working tree: $PYTHON -m cuse_ksm --log-level info
#     (log: tests/vm/out/daemon.log, also shown on the console prefixed "[daemon]")
#  3. wait up to 30 s for /dev/ksm
#  4. make -C tests/c, if tests/c/Makefile exists
#  5. $PYTHON -m pytest -q tests/integration $PYTEST_ARGS
#     (PYTEST_ARGS is parsed like shell words, e.g. PYTEST_ARGS="-k 'merge and not slow' -x")
#  6. SIGTERM the daemon: it must exit with status 0 within 10 s, and /dev/ksm
#     must then be gone
#  7. if VM_SHORT_BENCH=1 (make test-vm sets it): tests/vm/bench-cuse-short.sh,
#     a 1-s-a-cell pass of bench/cuse_c/compare.sh that checks every table and
#     ratio is printed, and no timing; then tests/vm/bench-kernel-short.sh, one
#     16 MiB round of bench/cuse_c/kernel_merge.sh (--merge kernel against
#     madvise) that checks every run merged fully, and no timing
#
# Exit status: pytest's status if it failed, else 1 if any other step failed,
# else 0.  The tests see CUSE_KSM_VM=1, CUSE_KSM_DEVICE=/dev/ksm and
# CUSE_KSM_DAEMON_PID in their environment.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
out=tests/vm/out
mkdir -p "$out"
PYTHON=${PYTHON:-python3}
DEVICE=/dev/ksm
export PYTHONUNBUFFERED=1

log() { printf 'guest.sh: %s\n' "$*"; }
failed=()
fail() { local step=$1; shift; log "FAIL ($step): $*"; failed+=("$step"); }

finish() {
    local rc=$1
    if ((rc == 0 && ${#failed[@]} > 0)); then rc=1; fi
    if ((${#failed[@]} > 0)); then
        log "failed steps: ${failed[*]}"
    fi
    log "exit status $rc"
    exit "$rc"
}

show_daemon_log() {
    log "--- $out/daemon.log (last 50 lines) ---"
    tail -n 50 "$out/daemon.log" | awk '{ print "    " $0 }'
    log "---"
}

# --- 1. cuse ------------------------------------------------------------------
if ! modprobe cuse; then
    fail "modprobe-cuse" "the running kernel ($(uname -r)) has no cuse module"
    finish 1
fi
if [[ ! -c /dev/cuse ]]; then
    fail "dev-cuse" "cuse loaded but /dev/cuse is missing"
    finish 1
fi
if [[ -e $DEVICE ]]; then
    fail "stale-device" "$DEVICE exists before the daemon starts"
    finish 1
fi

# --- 2. daemon ----------------------------------------------------------------
log "starting daemon: $PYTHON -m cuse_ksm --log-level info"
: >"$out/daemon.log"
"$PYTHON" -m cuse_ksm --log-level info \
    > >(exec tee -a "$out/daemon.log" | sed -u 's/^/[daemon] /') 2>&1 &
daemon_pid=$!
export CUSE_KSM_VM=1 CUSE_KSM_DEVICE=$DEVICE CUSE_KSM_DAEMON_PID=$daemon_pid
trap 'kill -KILL "$daemon_pid" 2>/dev/null' EXIT

# --- 3. wait for /dev/ksm -------------------------------------------------------
for ((i = 0; i < 300; i++)); do
    [[ -c $DEVICE ]] && break
    if ! kill -0 "$daemon_pid" 2>/dev/null; then break; fi
    sleep 0.1
done
if [[ ! -c $DEVICE ]]; then
    if kill -0 "$daemon_pid" 2>/dev/null; then
        fail "daemon-start" "$DEVICE did not appear within 30 s"
    else
        wait "$daemon_pid"
        fail "daemon-start" "the daemon exited with status $? before $DEVICE appeared"
    fi
    sleep 0.2 # let the log pipe drain
    show_daemon_log
    finish 1
fi
log "$DEVICE is up after $((i / 10)).$((i % 10)) s: $(ls -l "$DEVICE")"

# --- 4. C test programs -------------------------------------------------------------
build_ok=1
if [[ -f tests/c/Makefile ]]; then
    log "building C test programs: make -C tests/c"
    if ! make -C tests/c; then
        fail "c-build" "make -C tests/c failed; integration tests not run"
        build_ok=
    fi
else
    log "no tests/c/Makefile: skipping the C build"
fi

# --- 5. integration tests -------------------------------------------------------------
pytest_rc=0
if [[ -n $build_ok ]]; then
    eval "extra=(${PYTEST_ARGS:-})" || { fail "pytest-args" "cannot parse PYTEST_ARGS"; extra=(); }
    log "running: $PYTHON -m pytest -q tests/integration ${extra[*]}"
    "$PYTHON" -m pytest -q --junitxml="$out/junit.xml" tests/integration "${extra[@]}"
    pytest_rc=$?
    ((pytest_rc == 0)) || fail "pytest" "pytest exited with status $pytest_rc"
fi

# --- 6. shutdown --------------------------------------------------------------------
if ! kill -0 "$daemon_pid" 2>/dev/null; then
    wait "$daemon_pid"
    fail "daemon-died" "the daemon died during the tests (status $?)"
    show_daemon_log
else
    log "stopping the daemon (SIGTERM)"
    kill -TERM "$daemon_pid"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$daemon_pid" 2>/dev/null; then
        fail "daemon-stop" "the daemon did not exit within 10 s of SIGTERM; killing it"
        kill -KILL "$daemon_pid"
        wait "$daemon_pid" 2>/dev/null
        show_daemon_log
    else
        wait "$daemon_pid"
        daemon_rc=$?
        if ((daemon_rc != 0)); then
            fail "daemon-exit" "the daemon exited with status $daemon_rc after SIGTERM (want 0)"
            show_daemon_log
        else
            log "daemon exited with status 0"
        fi
    fi
fi
trap - EXIT
# The kernel removes the CUSE device when the daemon closes /dev/cuse; the
# devtmpfs node may vanish a moment later.
for ((i = 0; i < 30; i++)); do
    [[ -e $DEVICE ]] || break
    sleep 0.1
done
if [[ -e $DEVICE ]]; then
    fail "device-left" "$DEVICE still exists after the daemon exited"
fi

# --- 7. the short benchmark passes ---------------------------------------------------
# After the daemon above is gone: each pass starts its own servers.
if [[ ${VM_SHORT_BENCH:-} == 1 ]]; then
    log "running: tests/vm/bench-cuse-short.sh"
    tests/vm/bench-cuse-short.sh || fail "bench-cuse-short" "the short bench/cuse_c/compare.sh pass failed"
    log "running: tests/vm/bench-kernel-short.sh"
    tests/vm/bench-kernel-short.sh || fail "bench-kernel-short" "the short bench/cuse_c/kernel_merge.sh pass failed"
fi

finish "$pytest_rc"
