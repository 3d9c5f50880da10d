"""In the VM: who may open the device node, and which thread the fd hand-out traces.

* With the default options the node is root's, mode 0600: another user
  cannot open it.  With ``--mode 0666`` any user can, and an unprivileged
  caller gets its SMA fd and registers its own memory like root.
* The fd hand-out attaches to the thread that called CREATE and to no
  other: a sibling thread watching its own TracerPid never sees the daemon.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import threading

import pyksm

from tests.integration.conftest import (
    DEVICE,
    ROBUST_BIN,
    SECOND_DAEMON,
    build_robust,
    start_daemon,
    status_field,
    stop_daemon,
)

NOBODY = 65534


def as_nobody() -> None:
    os.setgid(NOBODY)
    os.setgroups([])
    os.setuid(NOBODY)


def nobody_client(device: str, commands: str) -> subprocess.CompletedProcess[str]:
    build_robust()
    exe = "/tmp/ksm_client_robust"
    shutil.copy(ROBUST_BIN / "ksm_client", exe)
    os.chmod(exe, 0o755)
    return subprocess.run(
        [exe, device], input=commands, capture_output=True, text=True, timeout=60, preexec_fn=as_nobody
    )


def test_default_node_refuses_other_users():
    st = os.stat(DEVICE)
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)
    result = nobody_client(DEVICE, "api\n")
    assert result.stdout.strip() == f"err open {errno.EACCES}"


def test_mode_0666_lets_any_user_register_its_own_memory():
    name = "ksmopen"
    proc = start_daemon(name, *SECOND_DAEMON, "--mode", "0666")
    try:
        # The mode is applied just after the node appears.
        for _ in range(200):
            if os.stat(f"/dev/{name}").st_mode & 0o777 == 0o666:
                break
            threading.Event().wait(0.05)
        assert os.stat(f"/dev/{name}").st_mode & 0o777 == 0o666
        result = nobody_client(f"/dev/{name}", "api\nsma\nreg 4 0x41\n")
        lines = result.stdout.splitlines()
        assert len(lines) == 4 and lines[0].startswith("ok pid "), (lines, result.stderr)
        assert lines[1] == "ok 1"  # GET_API_VERSION
        assert lines[2].startswith("ok "), lines  # its SMA fd, handed out by ptrace
        assert lines[3].startswith("ok "), lines  # REGISTER of its own pages
    finally:
        err = stop_daemon(proc)
        assert proc.returncode == 0, err


def test_handout_touches_only_the_calling_thread(daemon_pid):
    """A sibling thread polls its own TracerPid while another thread creates SMAs."""
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        tid = threading.get_native_id()
        while not stop.is_set():
            seen.append(status_field_of_task(tid))

    def status_field_of_task(tid: int) -> int:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
        return 0

    caller_traced = []
    fd = os.open(DEVICE, os.O_RDWR)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(20):
            sma = pyksm._libc.ioctl(fd, pyksm.KSM_CREATE_SHARED_MEMORY_AREA, None)
            assert sma >= 0, os.strerror(ctypes.get_errno())
            caller_traced.append(status_field(os.getpid(), "TracerPid"))
            assert pyksm._libc.ioctl(sma, pyksm.KSM_REMOVE_MEMORY_REGION, None) == 0
            os.close(sma)
    finally:
        stop.set()
        watcher.join()
        os.close(fd)
    assert len(seen) > 20
    assert set(seen) == {0}, "the daemon attached to a thread that did not call it"
    assert set(caller_traced) == {0}, "the caller is still traced after its CREATE returned"
