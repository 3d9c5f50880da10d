"""``cuse-ksm pages`` and ``processes/PID/pages`` against the real daemon: every state, each count exact.

tests/c/ksm_page_states lays out its pages (its header says which page
does what); this test runs the scanner one full pass at a time between the
program's steps: ``pages_to_scan`` is exactly the registered pages of live
processes, so a round of kksmd is one pass, and the long ``sleep`` after it leaves time to
stop the scanner (``run`` 0) before the next.  Only this test's processes
may be registered meanwhile (the suite runs its tests one at a time).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import C_BIN, ROOT, STATS, keep_sample, run_c, value, write

PAGE = 4096
NPAGES, CHILD_PAGES, MORE_PAGES = 64, 16, 32
ROUND_SLEEP_US = 3_000_000  # after each pass: time for the test to stop the scanner


class Workload:
    """tests/c/ksm_page_states, one command a line."""

    def __init__(self) -> None:
        run_c("ksm_abi_sequence")  # builds tests/c if needed
        self.proc = subprocess.Popen(
            [str(C_BIN / "ksm_page_states")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        out = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            out += line
            if line.startswith(("ready ", "FAIL")):
                break
        m = re.search(r"^ready (\d+) (0x[0-9a-f]+) (\d+)$", out, re.M)
        assert m, f"ksm_page_states did not get ready: {out}"
        self.pid, self.addr, self.child = int(m.group(1)), int(m.group(2), 16), int(m.group(3))

    def __call__(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer.startswith(f"ok {command}"), answer
        return answer

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def workload() -> Iterator[Workload]:
    saved = {name: value(name) for name in ("run", "sleep", "pages_to_scan", "max_kernel_pages")}
    assert write("run", "0\n") == 0
    w = Workload()
    try:
        yield w
    finally:
        w.close()
        assert write("run", "0\n") == 0
        for name in ("max_kernel_pages", "sleep", "pages_to_scan", "run"):
            assert write(name, f"{saved[name]}\n") == 0


def one_pass() -> None:
    """Let the scanner run one round, which is one full pass; stopped again after it."""
    before = value("full_scans")
    assert write("run", "1\n") == 0
    deadline = time.monotonic() + 120
    while value("full_scans") == before:
        assert time.monotonic() < deadline, "no full scan within 120 s"
        time.sleep(0.02)
    assert write("run", "0\n") == 0
    assert value("full_scans") == before + 1, "more than one pass: the round was not one pass"


def cuse_ksm(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cuse_ksm", "pages", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def summary_counts(text: str) -> list[dict[str, int]]:
    """The state rows of each region of a `cuse-ksm pages` summary."""
    regions: list[dict[str, int]] = []
    for line in text.splitlines():
        if line.startswith("region "):
            regions.append({})
        elif (m := re.match(r"  ([a-z_]+) +(\d+) ", line)) and regions:
            regions[-1][m.group(1)] = int(m.group(2))
    return regions


def file_counts(pid: int) -> list[dict[str, int]]:
    """The nonzero states of each region of processes/PID/pages."""
    regions: list[dict[str, int]] = []
    for line in (STATS / "processes" / str(pid) / "pages").read_text().splitlines():
        words = line.split()
        if words[0] == "region":
            regions.append({})
        elif words[0] == "state" and int(words[2]):
            regions[-1][words[1]] = int(words[2])
    return regions


REGION_1 = {
    "merged": 9,  # 0-7 into one shared page, 14 alone in another (15 was written)
    "unstable": 5,  # 8-11, 18
    "volatile": 2,  # 12-13
    "seen_once": 1,  # 20
    "written": 1,  # 15
    "at_limit": 1,  # 19
    "zero_page": 2,  # 16-17
    "not_present": NPAGES - 21,  # 21-63
}


def test_every_state_counted_exactly(workload: Workload) -> None:
    w = workload
    assert write("pages_to_scan", f"{NPAGES + CHILD_PAGES}\n") == 0
    assert write("sleep", f"{ROUND_SLEEP_US}\n") == 0
    assert write("max_kernel_pages", "0\n") == 0
    assert file_counts(w.pid) == [{"not_scanned": NPAGES}]
    for _ in range(2):  # first sight, then merges and the unstable tree
        w("tick")
        one_pass()
    w("tick")
    w("pair")
    one_pass()  # 18-19 seen once
    w("tick")
    w("final")
    assert w("kill-child") == "ok kill-child 1"
    assert write("max_kernel_pages", f"{value('pages_shared')}\n") == 0  # no third shared page
    # The child's region is gone now and costs the scanner nothing, as holes
    # do: a round of NPAGES + CHILD_PAGES would run on into the next pass.
    assert write("pages_to_scan", f"{NPAGES}\n") == 0
    one_pass()
    w("register2")  # never scanned: the scanner stays stopped

    assert file_counts(w.pid) == [REGION_1, {"not_scanned": MORE_PAGES}]
    assert file_counts(w.child) == [{"unreadable": CHILD_PAGES}]
    # The counters, as the 2009 definitions give them: states refine, never change them.
    assert [value(n) for n in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")] == [2, 7, 5, 4]

    text = cuse_ksm(str(w.pid))
    keep_sample("pages.txt", f"$ cuse-ksm pages {w.pid}\n{text}")
    assert summary_counts(text) == [REGION_1, {"not_scanned": MORE_PAGES}]
    assert "into 2 shared pages: " in text and "(8 sharers, 8 here)" in text and "(1 sharer, 1 here)" in text
    assert summary_counts(cuse_ksm(str(w.child))) == [{"unreadable": CHILD_PAGES}]

    # One page, and a range: counted from the runs.
    assert summary_counts(cuse_ksm(str(w.pid), f"{w.addr + 19 * PAGE + 100:x}")) == [{"at_limit": 1}]
    part = cuse_ksm(str(w.pid), f"{w.addr + 6 * PAGE:#x}-{w.addr + 17 * PAGE:#x}")
    assert summary_counts(part) == [{"merged": 3, "unstable": 4, "volatile": 2, "written": 1, "zero_page": 1}]

    runs = cuse_ksm(str(w.pid), "-v")
    keep_sample("pages-v.txt", f"$ cuse-ksm pages {w.pid} -v\n{runs}")
    assert f"  {w.addr:#x}-{w.addr + 8 * PAGE:#x}          8 merged into #" in runs
    assert f"  {w.addr + 21 * PAGE:#x}-{w.addr + NPAGES * PAGE:#x}         43 not_present" in runs

    drawn = cuse_ksm(str(w.pid), "--map")
    keep_sample("pages-map.txt", f"$ cuse-ksm pages {w.pid} --map\n{drawn}")
    assert "\x1b[" not in drawn  # a pipe, not a terminal
    rows = [line.split()[1] for line in drawn.splitlines() if line.startswith(f"  {w.addr:#x} ")]
    assert rows and rows[0].startswith("########++++~~#w00+Lo...")
