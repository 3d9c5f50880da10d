"""Integration tests: run inside the VM against the real /dev/ksm served by the daemon."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
C_BIN = ROOT / "tests" / "c" / "bin"
ROBUST = ROOT / "tests" / "robust"
ROBUST_BIN = ROBUST / "bin"
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


# -- a second daemon ------------------------------------------------------------------------

# Options for a daemon started beside the VM's main one when the test needs
# no control files of its own: the main daemon keeps /run/cuse-ksm/ksm, and
# only warnings reach the test's output.
SECOND_DAEMON = ("--no-stats-dir", "--log-level", "warning")


def start_daemon(name: str, *options: str) -> subprocess.Popen[str]:
    """A daemon serving /dev/<name>, returned once the node is there."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cuse_ksm", "--name", name, *options],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A daemon starts in seconds, but in a loaded VM under software emulation
    # (the first one needs 15 s there) 30 s has proved too short.
    deadline = time.monotonic() + 60
    while not os.path.exists(f"/dev/{name}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"/dev/{name} did not appear: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc


def stop_daemon(proc: subprocess.Popen[str], signum: int = signal.SIGTERM) -> str:
    """Send a daemon of :func:`start_daemon` ``signum`` and wait for it to exit; returns its stderr.

    A clean stop is exit status 0 (``proc.returncode``), which the caller
    asserts, with the stderr returned here to show when it is not.
    """
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=15)
    return err


# -- the daemon's resources, before and after ---------------------------------------------

# The daemon's memory may grow a little (allocator, caches); a leak per call
# over hundreds of calls would exceed this.
RSS_SLACK_KIB = 32 * 1024


def build_robust() -> None:
    """Build tests/robust (the C clients the robustness tests drive)."""
    subprocess.run(["make", "-s", "-C", str(ROBUST)], check=True)


@dataclass(frozen=True)
class Snapshot:
    fds: int
    threads: int
    rss_kib: int
    traced: tuple[int, ...]  # processes the daemon is attached to


def traced_by(pid: int) -> tuple[int, ...]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for task in os.listdir(f"/proc/{entry}/task"):
                with open(f"/proc/{entry}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith("TracerPid:") and int(line.split()[1]) == pid:
                            out.append(int(task))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return tuple(out)


def daemon_snapshot(pid: int) -> Snapshot:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Snapshot(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        rss_kib=rss,
        traced=traced_by(pid),
    )


def settle_to(pid: int, before: Snapshot, timeout: float = 15) -> Snapshot:
    """Wait until the daemon is back to ``before`` (releases are asynchronous), then check."""
    deadline = time.monotonic() + timeout
    while True:
        now = daemon_snapshot(pid)
        back = (now.fds, now.threads, now.traced) == (before.fds, before.threads, ())
        if back or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert os.path.exists(f"/proc/{pid}"), "the daemon died"
    assert now.fds == before.fds, f"daemon fds {before.fds} -> {now.fds}"
    assert now.threads == before.threads, f"daemon threads {before.threads} -> {now.threads}"
    assert now.traced == (), f"the daemon is still attached to {now.traced}"
    assert now.rss_kib - before.rss_kib < RSS_SLACK_KIB, f"daemon RSS {before.rss_kib} -> {now.rss_kib} KiB"
    return now


def status_field(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0
