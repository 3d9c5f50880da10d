"""Integration tests: run inside the VM against the real /dev/ksm served by the daemon."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
C_BIN = ROOT / "tests" / "c" / "bin"
DEVICE = os.environ.get("CUSE_KSM_DEVICE", "/dev/ksm")

sys.path.insert(0, str(ROOT / "examples"))


def pytest_collection_modifyitems(config, items):
    try:
        is_dev = stat.S_ISCHR(os.stat(DEVICE).st_mode)
    except FileNotFoundError:
        is_dev = False
    if not is_dev:
        skip = pytest.mark.skip(reason=f"{DEVICE} is not served here: these run in the VM (make test-vm)")
        for item in items:
            item.add_marker(skip)


def find_daemon_pid() -> int:
    if "CUSE_KSM_DAEMON_PID" in os.environ:
        return int(os.environ["CUSE_KSM_DAEMON_PID"])
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"cuse_ksm" in cmd or any(part.endswith(b"cuse-ksm") for part in cmd[:2]):
                return int(entry)
    raise LookupError("no cuse-ksm daemon running")


@pytest.fixture
def scanner_restored() -> Iterator[None]:
    """The programs set the scanner through the ioctl; put back what was there."""
    from pyksm import Ksm

    with Ksm(DEVICE) as ksm:
        before = ksm.info()
    yield
    with Ksm(DEVICE) as ksm:
        if before.flags & 1 and before.pages_to_scan:
            ksm.start(before.pages_to_scan, before.sleep)
        else:
            ksm.stop()


@pytest.fixture
def daemon_pid() -> int:
    return find_daemon_pid()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run_c(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = C_BIN / name
    if not exe.exists():
        subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "c")], check=True)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
