"""The host kernel's KSM (/sys/kernel/mm/ksm), driven for a side-by-side figure.

Every setting we touch is saved first and written back on the way out, even
when the measurement fails or is interrupted.  The settings are global to
the machine, so two benchmarks (the short one runs inside ``make test``)
take turns: each holds an exclusive lock while it has changed them.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.workload import Workload

KSM = Path("/sys/kernel/mm/ksm")
# The settings a measurement changes, in the order they are restored
# (``run`` last but one: stop scanning before putting the rate back).
TOUCHED = ("run", "pages_to_scan", "sleep_millisecs")
# Held while the settings are changed (see the module docstring).
LOCK = Path("/tmp/cuse-ksm-bench-ksm.lock")


def available() -> bool:
    return (KSM / "run").exists() and os.access(KSM / "run", os.W_OK)


def read(name: str) -> str:
    return (KSM / name).read_text().strip()


def read_int(name: str) -> int:
    return int(read(name))


def write(name: str, value: int | str) -> None:
    (KSM / name).write_text(f"{value}\n")


@contextmanager
def settings(**values: int) -> Iterator[dict[str, str]]:
    """Apply ``values`` (run, pages_to_scan, sleep_millisecs), restore the saved ones afterwards."""
    with open(LOCK, "a") as lock:
        # Wait for another benchmark to put the settings back: saving them
        # while it has changed them would "restore" its values, not ours.
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = {name: read(name) for name in TOUCHED}
        try:
            for name in ("sleep_millisecs", "pages_to_scan", "run"):
                if name in values:
                    write(name, values[name])
            yield saved
        finally:
            write("run", "0")  # stop first, then put everything back
            for name in ("pages_to_scan", "sleep_millisecs", "run"):
                write(name, saved[name])


def ksmd_cpu_seconds() -> float:
    """utime + stime of the ksmd kernel thread."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "ksmd":
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        return (int(fields[11]) + int(fields[12])) / tick
    return float("nan")


def other_mergeable(exclude: int) -> list[tuple[int, str]]:
    """Processes other than ``exclude`` with memory the kernel's KSM scans (qemu marks guest RAM mergeable)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == exclude:
            continue
        try:
            stat = Path(f"/proc/{pid}/ksm_stat").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if "ksm_mergeable: yes" in stat or "ksm_merge_any: yes" in stat:
            found.append((int(pid), comm))
    return found


def merging_pages(pid: int) -> int:
    """Pages of ``pid`` that map a KSM page (pages_shared + pages_sharing, seen from that process)."""
    return int(Path(f"/proc/{pid}/ksm_merging_pages").read_text())


@dataclass
class KernelRun:
    seconds: float
    cpu_seconds: float
    full_scans: int
    merging_pages: int
    pages_scanned: int  # the kernel's pages_scanned counter, delta over the run
    pages_skipped: int  # pages smart_scan skipped, delta over the run
    others: list[tuple[int, str]]
    settings: dict[str, str]


def measure(
    workload: Workload, *, pages_to_scan: int, scanned_pages: int | None = None, timeout: float = 600
) -> KernelRun:
    """Time the kernel from ``run=1`` until the workload is fully merged (or ``scanned_pages`` were scanned).

    The workload must have been started with ``mergeable=True``: its
    madvise(MADV_MERGEABLE) is the kernel's registration.  Completion is
    read from the workload's own /proc/<pid>/ksm_merging_pages, since the
    global counters also count any other mergeable process (a qemu guest).
    Passes are counted in pages scanned, not by ``full_scans``: that counter
    also ticks when the cursor wraps over an empty list right after ``run=1``.
    """
    want = sum(workload.expected())
    scans0 = read_int("full_scans")
    scanned0, skipped0 = read_int("pages_scanned"), _read_int_or_0("pages_skipped")
    others = other_mergeable(workload.pid)
    with settings(sleep_millisecs=0, pages_to_scan=pages_to_scan) as saved:
        cpu0 = ksmd_cpu_seconds()
        t0 = time.perf_counter()
        write("run", 1)
        while True:
            merging = merging_pages(workload.pid)
            scans = read_int("full_scans") - scans0
            if scanned_pages is not None:
                if read_int("pages_scanned") - scanned0 >= scanned_pages:
                    break
            elif merging >= want:
                break
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"kernel KSM: {merging=} of {want}, {scans=} after {timeout} s")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        cpu = ksmd_cpu_seconds() - cpu0
        scanned = read_int("pages_scanned") - scanned0
        skipped = _read_int_or_0("pages_skipped") - skipped0
        context = {f"saved_{k}": v for k, v in saved.items()}
        context.update({n: read(n) for n in ("smart_scan", "max_page_sharing", "use_zero_pages") if (KSM / n).exists()})
    return KernelRun(elapsed, cpu, scans, merging, scanned, skipped, others, context)


def _read_int_or_0(name: str) -> int:
    return read_int(name) if (KSM / name).exists() else 0
