"""``--merge kernel`` in the VM: the 2009 ioctls drive the VM kernel's own KSM.

Checked on the kernel's own counters (/proc/PID/ksm_merging_pages,
/sys/kernel/mm/ksm), never only on ours:

* a 2009 program's registered memory is really merged, the memory really
  comes back (its cgroup's charge, MemFree), and a write to a merged page
  is a copy on write;
* REMOVE unmerges; the last close of an SMA fd leaves the range merged until
  the process exits; exit drops it all;
* the host's KSM settings are put back when the daemon stops (SIGTERM, SIGINT);
* a madvise that fails or is ignored (an unmapped range, MAP_SHARED, a
  traced caller) leaves one clear log line, the regions file says so, and
  the daemon keeps working;
* SIGKILL of the caller at each step of the borrowed madvise leaves no
  tracee, no zombie, nothing leaked.

One ``--merge kernel`` daemon (/dev/ksmk) serves the module; the settings
tests start their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuse_ksm import abi
from tests.integration.conftest import (
    C_BIN,
    ROBUST_BIN,
    SYS_KSM,
    Client,
    KernelDaemon,
    build_robust,
    daemon_snapshot,
    host_knobs,
    kernel_daemon,
    run_c,
    settle_to,
    start_daemon,
    status_field,
    stop_daemon,
    wait_for,
)

MERGE_TIMEOUT = 300  # seconds for the VM kernel's ksmd to merge, under software emulation
REGIONS_HEADER = "sma addr npages merged mapped madvise mergeable"


@pytest.fixture(scope="module")
def kd() -> Iterator[KernelDaemon]:
    build_robust()
    run_c("ksm_abi_sequence")  # builds tests/c if needed
    with kernel_daemon("ksmk") as daemon:
        yield daemon


def sys_int(name: str) -> int:
    return int((SYS_KSM / name).read_text())


def merging(pid: int) -> int:
    """The kernel's own count of the process's merged pages (-1 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/ksm_merging_pages").read_text() or -1)
    except (FileNotFoundError, ProcessLookupError):
        return -1


def regions(kd: KernelDaemon, pid: int) -> list[list[str]]:
    """The rows of processes/PID/regions, header checked."""
    header, *rows = (kd.stats / "processes" / str(pid) / "regions").read_text().splitlines()
    assert header == REGIONS_HEADER
    return [row.split() for row in rows]


def wait_for_log(kd: KernelDaemon, text: str) -> str:
    """The daemon's log line that contains ``text`` (it is written when the borrow ends, after the ioctl returned)."""
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in kd.log_text().splitlines() if text in line]
        return bool(found)

    wait_for(seen, timeout=30, what=f"a log line with {text!r}")
    return found[0]


def assert_log_clean(kd: KernelDaemon) -> None:
    log = kd.log_text()
    assert "Traceback" not in log and ": ERROR: " not in log, log


# -- merging for real --------------------------------------------------------------


class Merger:
    """tests/c/ksm_kernel_merge on the module's daemon: one command per line, each ends with "done CMD"."""

    def __init__(self, kd: KernelDaemon, mib: int, cgroup: Path | None = None) -> None:
        """With ``cgroup``, the program runs in that cgroup from its first page on."""

        def join() -> None:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text("0\n")  # "0": the writer, the child before its exec

        self.proc = subprocess.Popen(
            [str(C_BIN / "ksm_kernel_merge"), str(mib), "5000", "10000"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "CUSE_KSM_DEVICE": kd.device},
            preexec_fn=join,
        )
        self.output: list[str] = []
        try:
            while not (ready := self._line()).startswith("ready "):
                assert ready and not ready.startswith("not ok"), "\n".join(self.output)
        except BaseException:
            self.__exit__()
            raise
        _, pid, _, npages = ready.split()
        self.pid, self.npages = int(pid), int(npages)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.output.append(line.rstrip("\n"))
        return line.rstrip("\n")

    def __call__(self, command: str) -> list[str]:
        """Run one command; its CHECK lines, all of which must be ok."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        lines = []
        while (line := self._line()) != f"done {command}":
            assert line, f"ksm_kernel_merge ended during {command}:\n" + "\n".join(self.output)
            lines.append(line)
        assert not [line for line in lines if line.startswith("not ok")], "\n".join(self.output)
        return lines

    def exit(self) -> None:
        """End of input: the program exits, having passed every check."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.output += self.proc.stdout.read().splitlines()
        assert self.proc.wait(timeout=60) == 0, "\n".join(self.output)
        assert self.output[-1] == "PASS", "\n".join(self.output)

    def __enter__(self) -> Merger:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def free_kib() -> int:
    """MemFree with the page cache dropped, the median of three readings."""
    readings = []
    for _ in range(3):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
        readings.append(int(meminfo["MemFree"].split()[0]))
        time.sleep(0.2)
    return sorted(readings)[1]


@pytest.fixture
def memcg() -> Iterator[Path]:
    """A cgroup (v2) with the memory controller, for one process: its memory.current is that process's memory.

    MemFree moves with everything in the VM: the daemon's scanner builds its
    tables for the same pages while the kernel merges them, and freed pages
    may wait on per-CPU lists, so over three runs it rose by 73 % to 108 %
    of the saving.  The cgroup's charge moves only with the process's pages.
    """
    root, mounted = Path("/sys/fs/cgroup"), False
    if not (root / "cgroup.controllers").exists():
        root, mounted = Path("/run/cuse-ksm-test-cgroup"), True
        root.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup2", "none", str(root)], check=True)
    if "memory" not in (root / "cgroup.subtree_control").read_text().split():
        (root / "cgroup.subtree_control").write_text("+memory\n")
    group = root / "cuse-ksm-merge"
    group.mkdir()
    try:
        yield group
    finally:
        wait_for(lambda: (group / "cgroup.procs").read_text() == "", what="the cgroup to empty")
        group.rmdir()
        if mounted:
            subprocess.run(["umount", str(root)], check=True)


def charged_kib(cgroup: Path) -> int:
    return int((cgroup / "memory.current").read_text()) // 1024


def sharing_when_merged(npages: int) -> int:
    """pages_sharing for npages of 4 contents all merged: the kernel shares one page at most max_page_sharing times."""
    copies = npages // 4
    shared = -(-copies // sys_int("max_page_sharing"))  # per content: 16 for 64 MiB at the default 256
    return npages - 4 * shared


def wait_merged(m: Merger) -> None:
    """Until the kernel merges nearly all of m's pages, then until its count stays put for a full scan."""
    want = m.npages - 8
    wait_for(lambda: merging(m.pid) >= want, timeout=MERGE_TIMEOUT, what=f"ksm_merging_pages >= {want}")
    scans = sys_int("full_scans")
    wait_for(lambda: sys_int("full_scans") >= scans + 1, timeout=MERGE_TIMEOUT, what="one more full scan")


def within_10_percent(got: int, want: int) -> bool:
    return abs(got - want) <= want / 10


def test_registered_memory_is_merged_by_the_kernel_and_remove_unmerges(kd: KernelDaemon, memcg: Path) -> None:
    sharing0 = sys_int("pages_sharing")
    with Merger(kd, 64, memcg) as m:
        assert m.npages == 16384
        wait_for(lambda: regions(kd, m.pid)[0][5] != "pending", what="the madvise")
        (row,) = regions(kd, m.pid)
        assert row[4:] == [str(m.npages), "ok", str(m.npages)], row  # all mapped, madvised, all in a mergeable mapping
        before = (charged_kib(memcg), free_kib())
        m("start")
        wait_merged(m)
        assert merging(m.pid) >= 16376
        sharing = sys_int("pages_sharing") - sharing0
        merged = (charged_kib(memcg), free_kib())
        # The control files tell the kernel's figures as the kernel does.
        assert int((kd.stats / "processes" / str(m.pid) / "host_ksm_merging_pages").read_text()) == merging(m.pid)
        assert int((kd.stats / "host_pages_sharing").read_text()) == sys_int("pages_sharing")
        # The host's profit files exist where the VM's kernel has them (6.1: ksm_stat, no general_profit).
        assert (kd.stats / "host_general_profit").exists() == os.path.exists("/sys/kernel/mm/ksm/general_profit")
        host_stat = kd.stats / "processes" / str(m.pid) / "host_ksm_stat"
        assert host_stat.exists() == os.path.exists(f"/proc/{m.pid}/ksm_stat")
        if host_stat.exists():
            names = lambda text: [line.split()[0] for line in text.splitlines()]  # noqa: E731
            assert names(host_stat.read_text()) == names(Path(f"/proc/{m.pid}/ksm_stat").read_text())
        # Without --cross-check the emulated scanner stands still while ksmd merges.
        assert [(kd.stats / f).read_text() for f in ("cross_check", "pages_scanned", "pages_sharing")] == ["0\n"] * 3
        figures = (
            f"pages_sharing {sharing} ({sharing * 4} KiB); the process's cgroup {before[0]} -> {merged[0]} KiB, "
            f"MemFree {before[1]} -> {merged[1]} KiB"
        )
        print(figures)
        assert sharing >= sharing_when_merged(m.npages) - 8, figures
        # The process holds that much less memory, and the VM has most of it back.
        assert within_10_percent(before[0] - merged[0], sharing * 4), figures
        assert merged[1] - before[1] >= sharing * 4 / 2, figures

        cow = m("cow")
        print("\n".join(cow))
        m("check")

        m("remove")  # MADV_UNMERGEABLE: every merged page is copied back
        wait_for(lambda: merging(m.pid) == 0, timeout=MERGE_TIMEOUT, what="ksm_merging_pages 0 after REMOVE")
        unmerged = (charged_kib(memcg), free_kib())
        figures += f"; after REMOVE {unmerged[0]} KiB, MemFree {unmerged[1]} KiB"
        print(figures)
        assert within_10_percent(unmerged[0] - merged[0], sharing * 4), figures
        assert merged[1] - unmerged[1] >= sharing * 4 / 2, figures
        assert not (kd.stats / "processes" / str(m.pid)).exists()
        m("check")
        m.exit()
    wait_for(lambda: sys_int("pages_sharing") == sharing0, timeout=MERGE_TIMEOUT, what="pages_sharing back")
    assert_log_clean(kd)


def test_closing_the_sma_leaves_the_range_merged_until_exit(kd: KernelDaemon) -> None:
    sharing0 = sys_int("pages_sharing")
    with Merger(kd, 8) as m:
        m("start")
        wait_merged(m)
        m("close")  # no REMOVE: the release drops the region from the emulation only
        wait_for(lambda: not (kd.stats / "processes" / str(m.pid)).exists(), what="the region's release")
        scans = sys_int("full_scans")
        wait_for(lambda: sys_int("full_scans") >= scans + 2, timeout=MERGE_TIMEOUT, what="two more full scans")
        assert merging(m.pid) >= m.npages - 8, "the last close unmerged the range"
        assert sys_int("pages_sharing") - sharing0 >= sharing_when_merged(m.npages) - 8
        m("check")
        m.exit()
    wait_for(lambda: sys_int("pages_sharing") == sharing0, timeout=MERGE_TIMEOUT, what="pages_sharing back at exit")


def test_exit_with_the_region_registered_ends_the_merging(kd: KernelDaemon) -> None:
    sharing0 = sys_int("pages_sharing")
    with Merger(kd, 8) as m:
        m("start")
        wait_merged(m)
        assert sys_int("pages_sharing") - sharing0 >= sharing_when_merged(m.npages) - 8
        m.exit()  # the SMA fd still open, the region still registered
        wait_for(lambda: not (kd.stats / "processes" / str(m.pid)).exists(), what="the process to leave the tree")
    wait_for(lambda: sys_int("pages_sharing") == sharing0, timeout=MERGE_TIMEOUT, what="pages_sharing back at exit")


# -- the host's settings ------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_host_settings_are_restored_when_the_daemon_stops(signum: int) -> None:
    from pyksm import Ksm

    name = f"ksmknobs{signum}"
    before = host_knobs()
    mine = {"run": 1, "pages_to_scan": 1234, "sleep_millisecs": 34}  # START_STOP's 33333 us, rounded up
    assert before != mine
    proc = start_daemon(name, "--merge", "kernel")
    try:
        assert host_knobs() == before, "starting the daemon changed the host's settings"
        with Ksm(f"/dev/{name}") as ksm:
            assert ksm.start(1234, 33333) == 0
        assert host_knobs() == mine, "START_STOP_KTHREAD did not reach the host"
        with Ksm(f"/dev/{name}") as ksm:
            assert ksm.stop() == 0
        assert host_knobs()["run"] == 0
    finally:
        err = stop_daemon(proc, signum)
    assert proc.returncode == 0, err
    assert host_knobs() == before, err
    assert "host KSM settings restored" in err, err


# -- madvise that fails or is ignored ----------------------------------------------------


def test_register_of_an_unmapped_range_is_logged_and_shown(kd: KernelDaemon) -> None:
    with Client(kd.device) as c:
        assert c("sma").startswith("ok ")
        addr = int(c("reg 8 0x61").split()[1], 16)
        assert c("unmap") == "ok"
        assert c("again") == "ok"  # the 2009 driver returned 0: so does kernel mode
        line = wait_for_log(
            kd, f"KSM_REGISTER_MEMORY_REGION[2009-03] from tid {c.pid}: madvise({addr:#x}, 0x8000) failed"
        )
        assert "WARNING" in line and "ENOMEM" in line and "not mapped" in line, line
        mapped, unmapped = regions(kd, c.pid)
        assert mapped[4:] == ["0", "ok", "0"], mapped  # advised, then unmapped: nothing left to merge
        assert unmapped[4:] == ["0", "ENOMEM", "0"], unmapped
        assert c("api") == "ok 1"


def test_register_of_a_shared_mapping_is_logged_and_shown(kd: KernelDaemon) -> None:
    with Client(kd.device) as c:
        assert c("sma").startswith("ok ")
        assert c("shared 8 0x62").startswith("ok ")
        line = wait_for_log(kd, f"KSM_REGISTER_MEMORY_REGION[2009-03] from tid {c.pid}: only 0 of the region's 8 pages")
        assert "WARNING" in line and "(8 mapped)" in line and "shared" in line, line
        (row,) = regions(kd, c.pid)
        assert row[4:] == ["8", "ok", "0"], row  # mapped, madvise said 0, and the kernel ignores it
        assert c("api") == "ok 1"


def test_register_from_a_traced_caller_is_logged_and_shown(kd: KernelDaemon) -> None:
    proc = subprocess.Popen(
        [str(C_BIN / "ksm_traced_register")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "CUSE_KSM_DEVICE": kd.device},
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        lines: list[str] = []
        while not (any(x.startswith("tracer ") for x in lines) and any(x.startswith("registered ") for x in lines)):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        tracer = int(next(line for line in lines if line.startswith("tracer ")).split()[1])
        child = int(next(line for line in lines if line.startswith("registered ")).split()[1])
        line = wait_for_log(kd, f"KSM_REGISTER_MEMORY_REGION[2009-03] from tid {child}: madvise(")
        assert "WARNING" in line and "failed with EBUSY" in line, line
        assert f"thread {child} is already being traced by pid {tracer}" in line, line
        (row,) = regions(kd, child)
        assert row[5:] == ["EBUSY", "0"], row
        proc.stdin.close()
        out = proc.stdout.read()
        assert proc.wait(timeout=30) == 0, "".join(lines) + out
        assert out.endswith("PASS\n"), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_still_borrows(kd: KernelDaemon) -> None:
    """A new caller's REGISTER is madvised, and all of it is mergeable."""
    with Client(kd.device) as c:
        assert c("sma").startswith("ok ")
        assert c("reg 8 0x63").startswith("ok ")
        wait_for(lambda: regions(kd, c.pid)[0][5] != "pending", what="the madvise")
        (row,) = regions(kd, c.pid)
        assert row[4:] == ["8", "ok", "8"], row


def test_after_the_failures_the_daemon_still_merges(kd: KernelDaemon) -> None:
    assert_still_borrows(kd)
    assert_log_clean(kd)


# -- SIGKILL at each step of the borrowed madvise -------------------------------------------

LOOP_PAGES = 1 << 18  # 1 GiB, never touched: REMOVE's MADV_UNMERGEABLE walks every page of it, slowly
STEPS = {
    # step: (TracerPid is the daemon, system call shown in /proc/PID/syscall, its argument that tells which)
    "register, held in its ioctl": (False, 16, 1, abi.KSM_REGISTER_MEMORY_REGION),
    "register, borrowed in its ioctl": (True, 16, 1, abi.KSM_REGISTER_MEMORY_REGION),
    "register, in the injected madvise": (True, 28, 2, 12),  # MADV_MERGEABLE
    "remove, held in its ioctl": (False, 16, 1, abi.KSM_REMOVE_MEMORY_REGION),
    "remove, borrowed in its ioctl": (True, 16, 1, abi.KSM_REMOVE_MEMORY_REGION),
    "remove, in the injected madvise": (True, 28, 2, 13),  # MADV_UNMERGEABLE
}


def at_step(pid: int, daemon: int, step: tuple[bool, int, int, int]) -> bool:
    """Is single-threaded process ``pid`` at ``step`` now?"""
    traced, nr, arg, value = step
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # "running", or the system call number and its six arguments in hex.
    if fields[0] != str(nr) or int(fields[1 + arg], 16) != value:
        return False
    return status_field(pid, "TracerPid") == (daemon if traced else 0)


@pytest.mark.parametrize("step", list(STEPS))
def test_caller_killed_at_each_step_of_the_madvise(kd: KernelDaemon, step: str) -> None:
    (kd.stats / "run").write_text("0\n")  # no scanner: only the ioctls run
    daemon = kd.proc.pid
    before = daemon_snapshot(daemon)
    hits = 0
    deadline = time.monotonic() + 90
    while hits < 3 and time.monotonic() < deadline:
        p = subprocess.Popen(
            [str(ROBUST_BIN / "ksm_loop"), kd.device, "remove", str(LOOP_PAGES)], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        caught = time.monotonic() + 10
        while time.monotonic() < caught and p.poll() is None:
            if at_step(p.pid, daemon, STEPS[step]):
                p.send_signal(signal.SIGKILL)
                hits += 1
                break
        p.kill()
        # Reaped by us: the daemon, its tracer, did not leave it a zombie.
        assert p.wait(timeout=30) == -signal.SIGKILL, p.stdout.read()
        p.stdout.close()
    assert hits, f"never caught a caller at step {step!r}"
    settle_to(daemon, before)
    wait_for(lambda: not any((kd.stats / "processes").iterdir()), what="no region left")
    assert_still_borrows(kd)
    settle_to(daemon, before)
    assert_log_clean(kd)
