"""The control files against the real daemon: counters of real merged memory, writes, status, --trace."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyksm import Ksm

from tests.integration.conftest import (
    DEVICE,
    ROOT,
    STATS,
    keep_sample,
    ready_program,
    start_daemon,
    stop_daemon,
    value,
    write,
)

NPAGES = 64
# The VM is software-emulated: merging 64 pages takes a few passes of a
# slow Python scanner, so be patient.
MERGE_TIMEOUT = 120


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def kthread_restored() -> Iterator[None]:
    """Leave the scanner as the test found it (later tests expect their own settings only)."""
    with Ksm(DEVICE) as ksm:
        before = ksm.info()
        saved = (before.sleep, before.pages_to_scan, before.flags)
    yield
    assert write("run", "0\n") == 0
    assert write("sleep", f"{saved[0]}\n") == 0
    assert write("pages_to_scan", f"{saved[1]}\n") == 0
    assert write("run", f"{saved[2] & 1}\n") == 0


@pytest.fixture
def merger(kthread_restored) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """tests/c/ksm_merge_wait: NPAGES identical pages, registered, scanner started by ioctl; waits on stdin."""
    with ready_program("ksm_merge_wait", str(NPAGES), "256", "20000") as started:
        yield started


def test_the_mount_is_there():
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    assert ["cuse-ksm", str(STATS)] in [m[:2] for m in mounts], "the daemon did not mount its control files"
    assert sorted(p.name for p in STATS.iterdir()) == sorted(
        [
            "run",
            "sleep",
            "sleep_millisecs",
            "pages_to_scan",
            "max_kernel_pages",
            "kernel_pages_allocated",
            "pages_shared",
            "pages_sharing",
            "pages_unshared",
            "pages_volatile",
            "full_scans",
            "pages_scanned",
            "general_profit",
            "emulator_memory",
            "processes",
        ]
    )


def test_pages_sharing_reaches_n_minus_one_for_identical_pages(merger):
    proc, pid, addr = merger
    # The C program started the scanner with the ioctl: the files show it.
    assert (value("run"), value("sleep"), value("sleep_millisecs"), value("pages_to_scan")) == (1, 20000, 20, 256)
    wait_until(
        lambda: value("pages_sharing") == NPAGES - 1 and value("pages_shared") == 1,
        MERGE_TIMEOUT,
        f"pages_sharing {NPAGES - 1} and pages_shared 1",
    )
    # cat, as an administrator would, and as any user may.
    cat = subprocess.run(["cat", str(STATS / "pages_sharing")], capture_output=True, text=True, check=True)
    assert cat.stdout == f"{NPAGES - 1}\n"
    nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(STATS / "pages_shared")],
        capture_output=True,
        text=True,
    )
    assert (nobody.returncode, nobody.stdout) == (0, "1\n"), nobody.stderr
    assert value("kernel_pages_allocated") == 1
    assert value("full_scans") >= 2 and value("pages_scanned") >= 2 * NPAGES
    # Its own directory, as /proc/<pid>/ksm_merging_pages in later kernels.
    procdir = STATS / "processes" / str(pid)
    assert [p.name for p in (STATS / "processes").iterdir()] == [str(pid)]
    assert value("ksm_merging_pages", procdir) == NPAGES
    lines = (procdir / "regions").read_text().splitlines()
    assert lines[0] == "sma addr npages merged mapped"
    assert lines[1].split()[1:] == [f"{addr:#x}", str(NPAGES), str(NPAGES), str(NPAGES)]
    # Today's profit figures: every page seen (64 rmap items), all merged into one.
    assert (procdir / "ksm_stat").read_text() == (
        f"ksm_rmap_items {NPAGES}\n"
        "ksm_zero_pages 0\n"
        f"ksm_merging_pages {NPAGES}\n"
        f"ksm_process_profit {NPAGES * 4096 - NPAGES * 64}\n"
        "ksm_merge_any: no\n"
        "ksm_mergeable: yes\n"
    )
    assert (STATS / "general_profit").read_text() == f"{(NPAGES - 1) * 4096 - NPAGES * 64}\n"
    memory = dict(line.split() for line in (STATS / "emulator_memory").read_text().splitlines())
    assert (memory["registered_pages"], memory["rmap_items"]) == (str(NPAGES), str(NPAGES))
    assert int(memory["emulator_profit"]) == (NPAGES - 1) * 4096 - int(memory["metadata"])

    # cuse-ksm status reads the same.
    status = subprocess.run(
        [sys.executable, "-m", "cuse_ksm", "status"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    keep_sample("status-sample.txt", status.stdout)
    out = status.stdout.splitlines()
    assert "scanner: running (256 pages every 20000 us), max_kernel_pages unlimited" in out
    assert f"would save: 0.25 MiB ({NPAGES - 1} pages: pages_sharing)" in out
    assert (
        "profit, today's kernel's formula: would be 0.24 MiB "
        f"(general_profit: {NPAGES - 1} pages saved less 64 B for each of {NPAGES} rmap items)"
    ) in out
    assert any(line.startswith("profit, the emulator's real cost: would be ") for line in out)
    assert out[-1].split() == [str(pid), "1", str(NPAGES), str(NPAGES), "0.25"]

    # The process exits: its SMA's release drops the region, and the figures follow.
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    wait_until(lambda: not procdir.exists(), 30, f"{procdir} to go away")
    assert value("pages_sharing") == 0 and value("pages_shared") == 0


def test_writes_steer_the_scanner_the_ioctl_sees(kthread_restored):
    with Ksm(DEVICE) as ksm:
        assert write("pages_to_scan", "100\n") == 0
        assert write("sleep_millisecs", "3\n") == 0
        assert write("run", "1\n") == 0
        info = ksm.info()
        assert (info.sleep, info.pages_to_scan, info.flags) == (3000, 100, 1)
        assert write("run", "0\n") == 0
        assert ksm.info().flags == 0
        # ...and the reverse.
        assert ksm.start(64, 700) == 0
        assert (value("run"), value("sleep"), value("pages_to_scan")) == (1, 700, 64)
        # Bad writes: EINVAL, nothing changed.
        for name, data in [("run", "2\n"), ("run", "on\n"), ("sleep", "4294967296\n"), ("sleep_millisecs", "-1\n")]:
            assert write(name, data) == errno.EINVAL, (name, data)
        assert write("pages_shared", "1\n") == errno.EACCES
        info = ksm.info()
        assert (info.sleep, info.pages_to_scan, info.flags) == (700, 64, 1)
        # run = 1 with pages_to_scan 0: stored (the ioctl would return +1 and change nothing).
        assert write("pages_to_scan", "0\n") == 0
        assert write("run", "1\n") == 0
        assert ksm.start(0, 5) == 1
        info = ksm.info()
        assert (info.sleep, info.pages_to_scan, info.flags) == (700, 0, 1)


def is_mounted(path: str) -> bool:
    return any(line.split()[1] == path for line in Path("/proc/mounts").read_text().splitlines())


def test_second_daemon_mounts_its_own_dir_traces_and_unmounts():
    name = "ksmctl"
    stats = f"/run/cuse-ksm/{name}"
    proc = start_daemon(name, "--trace", "--log-level", "warning")
    try:
        wait_until(lambda: is_mounted(stats), 10, f"{stats} mounted")
        assert value("run", Path(stats)) == 0
        with Ksm(f"/dev/{name}") as ksm:
            assert ksm.api_version() == 1
            assert ksm.start(0, 9) == 1
            with ksm.create_sma() as sma:
                sma_fd = sma.fd
    finally:
        err = stop_daemon(proc)
    assert proc.returncode == 0, err
    assert not is_mounted(stats), "the control files outlived the daemon"
    me = os.getpid()
    lines = [line for line in err.splitlines() if "trace:" in line]
    keep_sample("trace-sample.txt", "\n".join(lines) + "\n")
    assert len(lines) == 3, err
    assert re.search(rf"trace: pid {me} /dev/{name} KSM_GET_API_VERSION 0 = 1 <[\d.]+ ms>$", lines[0]), lines
    assert re.search(
        rf"trace: pid {me} /dev/{name} KSM_START_STOP_KTHREAD\[2009-03\] "
        r"\{sleep=9, pages_to_scan=0, flags=0x1, pad=0, reserved_bits=0\} = 1 <",
        lines[1],
    ), lines
    assert re.search(rf"KSM_CREATE_SHARED_MEMORY_AREA 0 = {sma_fd} \(sma#\d+\) <", lines[2]), lines


def test_a_killed_daemons_stale_mount_is_cleared_on_restart():
    name = "ksmcrash"
    stats = f"/run/cuse-ksm/{name}"
    proc = start_daemon(name)
    wait_until(lambda: is_mounted(stats), 10, f"{stats} mounted")
    stop_daemon(proc, signal.SIGKILL)
    with pytest.raises(OSError) as e:
        os.stat(stats)
    assert e.value.errno == errno.ENOTCONN
    wait_until(lambda: not os.path.exists(f"/dev/{name}"), 10, f"/dev/{name} to go")
    proc = start_daemon(name)
    try:
        wait_until(lambda: os.path.exists(f"{stats}/pages_shared"), 10, "the new mount")
        assert value("pages_shared", Path(stats)) == 0
    finally:
        err = stop_daemon(proc)
    assert "stale mount" in err
    assert not is_mounted(stats)
