"""What several test modules share, and the rule that CI never skips a test.

Test modules do not import each other: what two of them use lives here
(helpers are imported from ``tests.conftest``; fixtures are found by
pytest).  Fakes with a subject of their own have modules of their own:
``tests/fakekernel.py`` (the kernel's side of a CUSE channel),
``tests/engine/fakes.py`` (in-memory address spaces), ``tests/host/child.py``
(a process with known memory).

Skips under CI
--------------

Many host tests need root (reading other processes' memory, ptrace,
ns_last_pid) or ``/dev/fuse`` (the control filesystem), and skip without
them so that a developer's plain ``pytest`` works.  CI runs as root on a
machine with FUSE; a skip there means a privilege or a device was lost, and
every test behind it would pass unseen.  So with ``CI=true`` in the
environment, any skip fails the run (:func:`pytest_runtest_makereport`),
unless the test is marked ``@pytest.mark.on_request`` - a test that only
runs when asked for (the soak test, ``make soak``).  Checked by
tests/test_ci_skips.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cuse_ksm import abi, controltree
from cuse_ksm import protocol as p
from cuse_ksm.device import Done, HandOut, KsmDevice
from cuse_ksm.engine import Engine, Sma
from cuse_ksm.session import Borrow, CuseSession
from tests.engine.fakes import FakeSpace

ROOT = Path(__file__).resolve().parents[1]

# -- skips under CI ---------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "on_request: runs only when asked for (an environment variable); its skip is no lost privilege"
    )


def ci() -> bool:
    return os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (report.skipped and ci()) or hasattr(report, "wasxfail") or item.get_closest_marker("on_request"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true ({reason}): CI runs as root with /dev/fuse, so this skip "
        "means the run lost a privilege or a device, and the test would pass unseen"
    )


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: reads other processes' memory")
needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root (allow_other)"
)

# -- FUSE mounts and commands ----------------------------------------------------------------


@contextlib.contextmanager
def mount_dir() -> Iterator[str]:
    """A mount point under a 0755 directory, so that other users can reach it."""
    parent = tempfile.mkdtemp(prefix="cuse-ksm-test-", dir="/tmp")
    os.chmod(parent, 0o755)
    try:
        yield os.path.join(parent, "ksm")
    finally:
        path = os.path.join(parent, "ksm")
        if is_mounted(path):  # the test failed; do not leave a mount behind
            subprocess.run(["umount", "-l", path], check=False)
        shutil.rmtree(parent, ignore_errors=True)


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def python(*argv: str) -> subprocess.CompletedProcess[str]:
    """This interpreter with ``argv``, from the repository root (so ``-m cuse_ksm`` is this tree's), output as text."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


async def run(*argv: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command in a worker thread (the test's own trio loop may be serving its FUSE mount)."""
    if user is not None:
        argv = ("setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv)
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    )


# -- the control files ---------------------------------------------------------------------

READ_ONLY = [v.name for v in controltree.VALUES if not v.writable]


def kthread_ioctl(engine: Engine, info: abi.KthreadInfo) -> Done:
    dev = KsmDevice(engine, FakeSpace)
    fh = dev.open().fh
    out = dev.ioctl(fh, abi.KSM_START_STOP_KTHREAD, 1, info.pack())
    assert isinstance(out, Done)
    return out


def sma_of(borrow: Borrow) -> Sma:
    """The SMA a hand-out's borrow hands out (the test fails if the borrow is no hand-out)."""
    assert isinstance(borrow.outcome, HandOut), borrow.outcome
    assert isinstance(borrow.outcome.target, Sma), borrow.outcome
    return borrow.outcome.target


_uniques = itertools.count(1_000_001, 2)  # request ids of the helpers below, apart from the tests' own


def open_fh(session: CuseSession, tid: int) -> int:
    """A FUSE_OPEN of the device by thread ``tid``: the fh the session answered."""
    unique = next(_uniques)
    reply = session.receive(p.Open(unique, tid, os.O_RDWR))
    assert isinstance(reply, bytes)
    fh: int = p.OPEN_OUT.unpack_from(reply, p.OUT_HEADER.size)[0]
    assert reply == p.reply_open(unique, fh) and fh in session.device.files
    return fh


def hand_out(session: CuseSession, tid: int, cmd: int = abi.KSM_CREATE_SHARED_MEMORY_AREA) -> tuple[Borrow, int]:
    """A whole successful hand-out to ``tid``, as the daemon runs it: the borrow, and the new file's fh.

    ``cmd`` is CREATE_SHARED_MEMORY_AREA (an SMA) or KSM_CREATE_SCAN (a scan fd).
    """
    out = session.receive(p.Ioctl(next(_uniques), tid, open_fh(session, tid), cmd, 0, 0, b"", False))
    assert isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], Borrow), out
    borrow = out[0]
    session.complete_ioctl(borrow)
    fh = open_fh(session, tid)  # the open the borrowed thread makes
    session.borrowed(borrow, (5,))
    return borrow, fh


def get_info(engine: Engine) -> abi.KthreadInfo:
    dev = KsmDevice(engine, FakeSpace)
    out = dev.ioctl(dev.open().fh, abi.KSM_GET_INFO_KTHREAD, 1, b"", abi.STRUCT_SIZE)
    assert isinstance(out, Done)
    return abi.KthreadInfo.unpack(out.out)


BAD_WRITES = [
    ("run", b"2\n"),  # later kernels' unmerge: not in the 2009 driver
    ("run", b"-1\n"),
    ("run", b"yes\n"),
    ("run", b""),
    ("run", b"\n"),
    ("run", b"1 1\n"),
    ("run", b"0x1\n"),
    ("run", b"+1\n"),
    ("sleep", b"4294967296\n"),  # 2**32: not a __u32
    ("sleep", b"1.5\n"),
    ("sleep_millisecs", b"4294968\n"),  # * 1000 > 2**32 - 1
    ("pages_to_scan", b"4294967296\n"),
    ("pages_to_scan", b"10 pages\n"),
    ("max_kernel_pages", b"18446744073709551616\n"),  # 2**64
    ("max_kernel_pages", b"1" * 100),
    ("pages_to_scan", "\u0663\n".encode()),  # an Arabic-Indic three: a digit to str.isdigit, not to us
]
