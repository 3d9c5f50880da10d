"""Cross-check: the emulator's counters against the running kernel's own KSM, on the same workloads.

For each memory pattern, tests/c/ksm_crosscheck builds the same pages twice:
once registered with /dev/ksm (the emulator scans it), once marked
madvise(MADV_MERGEABLE) for the VM kernel's ksmd.  Each side runs alone (the
other's scanner is stopped) until its pages_shared and pages_sharing have not
moved for two full scans; the two must then be equal, and equal to what the
pattern implies.

What is neutralised on the kernel side, and why:

* ``max_page_sharing`` (default 256): above 256 copies of one content the
  kernel makes several shared pages ("stable node chains"); the 2009 driver
  had no such limit.  It is raised to 4096 for the run (only writable while
  pages_shared is 0, hence the unmerge-all ``run = 2`` before), and the
  patterns keep every content under that.
* ``use_zero_pages`` is set to 0: with 1, zero-filled pages would be mapped
  to the zero page and not counted; no pattern is zero-filled anyway.
* ``merge_across_nodes``: the VM has one NUMA node, so it has no effect; it
  is left as is (it is only writable while nothing is shared).
* ``smart_scan`` (kernels from 6.7, not 6.1): set to 0 when present, so that
  every page is looked at on every pass, as the 2009 scanner did.
* the kernel only scans mergeable VMAs: the workload marks exactly the
  buffer the emulator run registers, with THP refused (MADV_NOHUGEPAGE) in
  both runs so that the kernel scans 4 KiB pages.

The global counters are exact here: nothing else in the VM is mergeable
(checked before each run), and the per-process ``ksm_merging_pages`` of both
sides is compared too.  Every setting touched is restored afterwards.

``--merge kernel`` runs both sides at once, on the same memory: the workload
registers with a kernel-mode daemon, whose REGISTER has it madvise the
buffer and whose scanner settings drive the kernel's ksmd too.  The
emulator's counters must still be the pattern's, the kernel's the same, and
the daemon's ``host_`` files must show the kernel's.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import C_BIN, DEVICE, ROOT, KernelDaemon, kernel_daemon, run_c

SYS = Path("/sys/kernel/mm/ksm")
STATS = Path(os.environ.get("CUSE_KSM_STATS_DIR", "/run/cuse-ksm/ksm"))
SETTLE_TIMEOUT = 180  # seconds per side; the VM is software-emulated
KNOBS = ("pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages", "smart_scan", "run")

# pattern -> (pages, expected pages_shared, expected pages_sharing); see tests/c/ksm_crosscheck.c
PATTERNS: dict[str, tuple[int, int, int]] = {
    "equal": (512, 1, 511),  # 512 copies: above the kernel's default max_page_sharing
    "half": (1024, 4, 508),  # 512 duplicates of 4 contents (128 each), 512 unique pages
    "volatile": (1024, 1, 767),  # 768 identical, 256 rewritten every 2 ms
    "tail": (1024, 0, 0),  # all unique, by the last 8 bytes only
    "tailgroup": (1024, 128, 896),  # 128 groups of 8, differing in the last 8 bytes
    "zeroread": (512, 1, 255),  # 256 identical written pages, 256 only read (the shared zero page)
}


@dataclass(frozen=True)
class Result:
    pages_shared: int
    pages_sharing: int
    merging_pages: int  # the process's ksm_merging_pages
    full_scans: int  # passes the side needed until stable
    seconds: float


def read_int(path: Path) -> int:
    return int(path.read_text())


def write_value(path: Path, value: int | str) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def settle(counts: Callable[[], tuple[int, ...]], scans: Callable[[], int], what: str) -> tuple[tuple[int, ...], int]:
    """Poll until the counts stayed the same for two full scans (and at least three passed); (counts, scans)."""
    start = scans()
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, mark = counts(), start
    while True:
        time.sleep(0.05)
        now, s = counts(), scans()
        if now != last:
            last, mark = now, s
        elif s >= mark + 2 and s >= start + 3:
            return now, s - start
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: counters not stable after {SETTLE_TIMEOUT} s (last {last}, {s - start} scans)")


class Workload:
    """tests/c/ksm_crosscheck: started, ready, stopped by closing its stdin."""

    def __init__(self, mode: str, pattern: str, npages: int, device: str = DEVICE) -> None:
        self.proc = subprocess.Popen(
            [str(C_BIN / "ksm_crosscheck"), mode, pattern, str(npages)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "CUSE_KSM_DEVICE": device},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready "), f"ksm_crosscheck {mode} {pattern}: {line!r}"
        self.pid = int(line.split()[1])

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            assert self.proc.wait(timeout=30) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def kernel_ksm() -> Iterator[None]:
    """The VM kernel's KSM, stopped and clean; every knob put back afterwards."""
    if not (SYS / "run").exists():
        pytest.fail("the VM kernel has no KSM (/sys/kernel/mm/ksm): the cross-check cannot run")
    saved = {k: (SYS / k).read_text().strip() for k in KNOBS if (SYS / k).exists()}
    write_value(SYS / "run", 2)  # unmerge everything: a clean start, and max_page_sharing writable
    try:
        yield
    finally:
        write_value(SYS / "run", 2)
        for k, v in saved.items():
            if k != "run" and (SYS / k).read_text().strip() != v:
                write_value(SYS / k, v)
        write_value(SYS / "run", saved["run"])


@pytest.fixture
def emulator_scanner() -> Iterator[None]:
    """The emulator's scanner settings, put back afterwards (stopped meanwhile)."""
    saved = {k: (STATS / k).read_text().strip() for k in ("run", "sleep", "pages_to_scan")}
    write_value(STATS / "run", 0)
    try:
        yield
    finally:
        write_value(STATS / "run", 0)
        write_value(STATS / "sleep", saved["sleep"])
        write_value(STATS / "pages_to_scan", saved["pages_to_scan"])
        write_value(STATS / "run", saved["run"])


def neutralise_kernel() -> None:
    """The kernel's KSM clean and counting as the 2009 driver did (module docstring)."""
    assert (read_int(SYS / "pages_shared"), read_int(SYS / "pages_sharing")) == (0, 0), "kernel KSM not clean"
    write_value(SYS / "max_page_sharing", 4096)
    write_value(SYS / "use_zero_pages", 0)
    if (SYS / "smart_scan").exists():
        write_value(SYS / "smart_scan", 0)


def run_kernel(pattern: str, npages: int) -> Result:
    write_value(STATS / "run", 0)  # the emulator's scanner stays stopped (nothing of ours is registered anyway)
    neutralise_kernel()
    write_value(SYS / "pages_to_scan", npages)
    write_value(SYS / "sleep_millisecs", 20)
    t0 = time.monotonic()
    with Workload("madvise", pattern, npages) as w:
        write_value(SYS / "run", 1)
        (shared, sharing), scans = settle(
            lambda: (read_int(SYS / "pages_shared"), read_int(SYS / "pages_sharing")),
            lambda: read_int(SYS / "full_scans"),
            f"kernel, {pattern}",
        )
        merging = read_int(Path(f"/proc/{w.pid}/ksm_merging_pages"))
        seconds = time.monotonic() - t0
    write_value(SYS / "run", 2)  # unmerge and stop: the kernel's ksmd is off for the emulator's run
    return Result(shared, sharing, merging, scans, seconds)


def run_emulator(pattern: str, npages: int) -> Result:
    assert read_int(SYS / "run") != 1, "the kernel's ksmd must be stopped"
    deadline = time.monotonic() + 60
    while read_int(STATS / "pages_shared") or any((STATS / "processes").iterdir()):
        assert time.monotonic() < deadline, "the emulator still holds memory of earlier tests"
        time.sleep(0.1)
    write_value(STATS / "pages_to_scan", npages)
    write_value(STATS / "sleep", 20000)
    t0 = time.monotonic()
    with Workload("ksm", pattern, npages) as w:
        write_value(STATS / "run", 1)
        (shared, sharing), scans = settle(
            lambda: (read_int(STATS / "pages_shared"), read_int(STATS / "pages_sharing")),
            lambda: read_int(STATS / "full_scans"),
            f"emulator, {pattern}",
        )
        merging = read_int(STATS / "processes" / str(w.pid) / "ksm_merging_pages")
        seconds = time.monotonic() - t0
    write_value(STATS / "run", 0)
    return Result(shared, sharing, merging, scans, seconds)


def record(line: str) -> None:
    """One run's figures: in the test's output, and kept in tests/vm/out/crosscheck.txt."""
    print(line)
    out = ROOT / "tests" / "vm" / "out"
    if out.is_dir():
        with open(out / "crosscheck.txt", "a") as f:
            f.write(line)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_emulator_counts_as_the_kernel(pattern: str, kernel_ksm: None, emulator_scanner: None) -> None:
    run_c("ksm_abi_sequence")  # builds tests/c if needed
    npages, want_shared, want_sharing = PATTERNS[pattern]
    kernel = run_kernel(pattern, npages)
    emulator = run_emulator(pattern, npages)
    line = (
        f"{pattern} {npages} kernel {kernel.pages_shared} {kernel.pages_sharing} {kernel.merging_pages} "
        f"emulator {emulator.pages_shared} {emulator.pages_sharing} {emulator.merging_pages} "
        f"scans {kernel.full_scans} {emulator.full_scans} seconds {kernel.seconds:.1f} {emulator.seconds:.1f}\n"
    )
    record(line)
    # The kernel must show what the pattern implies, or the comparison proves nothing.
    assert (kernel.pages_shared, kernel.pages_sharing) == (want_shared, want_sharing), line
    assert (emulator.pages_shared, emulator.pages_sharing) == (kernel.pages_shared, kernel.pages_sharing), line
    assert emulator.merging_pages == kernel.merging_pages, line


@pytest.fixture(scope="module")
def kernel_mode() -> Iterator[KernelDaemon]:
    run_c("ksm_abi_sequence")  # builds tests/c if needed
    with kernel_daemon("ksmcross", "--cross-check") as daemon:
        yield daemon


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_kernel_mode_merges_what_the_emulator_counts(pattern: str, kernel_mode: KernelDaemon, kernel_ksm: None) -> None:
    npages, want_shared, want_sharing = PATTERNS[pattern]
    stats = kernel_mode.stats
    neutralise_kernel()
    # Through the daemon's control files, as an administrator would: both scanners take them.
    write_value(stats / "pages_to_scan", npages)
    write_value(stats / "sleep", 20000)
    t0 = time.monotonic()
    emulated0, kernel0 = read_int(stats / "full_scans"), read_int(SYS / "full_scans")
    try:
        with Workload("ksm", pattern, npages, kernel_mode.device) as w:
            write_value(stats / "run", 1)
            # A stopped scanner's pace reaches the host's when it starts (a stop writes only run).
            assert (read_int(SYS / "pages_to_scan"), read_int(SYS / "sleep_millisecs")) == (npages, 20)
            (e_shared, e_sharing, k_shared, k_sharing), scans = settle(
                lambda: (
                    read_int(stats / "pages_shared"),
                    read_int(stats / "pages_sharing"),
                    read_int(SYS / "pages_shared"),
                    read_int(SYS / "pages_sharing"),
                ),
                # A scan of both: the fewer of the two sides' full scans.
                lambda: min(read_int(stats / "full_scans") - emulated0, read_int(SYS / "full_scans") - kernel0),
                f"kernel mode, {pattern}",
            )
            process = stats / "processes" / str(w.pid)
            e_merging = read_int(process / "ksm_merging_pages")
            k_merging = read_int(Path(f"/proc/{w.pid}/ksm_merging_pages"))
            host_files = (
                read_int(stats / "host_pages_shared"),
                read_int(stats / "host_pages_sharing"),
                read_int(process / "host_ksm_merging_pages"),
            )
    finally:
        write_value(stats / "run", 0)
    line = (
        f"{pattern} {npages} kernel-mode emulated {e_shared} {e_sharing} {e_merging} "
        f"kernel {k_shared} {k_sharing} {k_merging} host_files {host_files} "
        f"scans {scans} seconds {time.monotonic() - t0:.1f}\n"
    )
    record(line)
    assert (e_shared, e_sharing) == (want_shared, want_sharing), line
    assert (k_shared, k_sharing) == (want_shared, want_sharing), line
    assert e_merging == k_merging, line
    assert host_files == (k_shared, k_sharing, k_merging), line
