"""A second daemon with its own name: node mode and group, clean exit on SIGINT and SIGTERM."""

import os
import signal
import stat
import time

import pytest

from tests.integration.conftest import start_daemon, stop_daemon


def wait_for_access(path: str, mode: int, gid: int) -> os.stat_result:
    deadline = time.monotonic() + 10
    while True:
        st = os.stat(path)
        if (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, gid) or time.monotonic() > deadline:
            return st


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_node_mode_group_and_clean_exit(signum):
    name = f"ksmopt{signum}"
    proc = start_daemon(name, "--mode", "0640", "--group", "4242")
    st = wait_for_access(f"/dev/{name}", 0o640, 4242)
    assert stat.S_ISCHR(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, 4242)
    fd = os.open(f"/dev/{name}", os.O_RDWR)  # a client holding the device open does not delay the exit
    try:
        err = stop_daemon(proc, signum)
    finally:
        os.close(fd)
    assert proc.returncode == 0, err
    assert not os.path.exists(f"/dev/{name}")
    assert "shutting down" in err


def test_default_node_is_root_only():
    proc = start_daemon("ksmdefault")
    try:
        st = os.stat("/dev/ksmdefault")
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    finally:
        err = stop_daemon(proc)
        assert proc.returncode == 0, err
