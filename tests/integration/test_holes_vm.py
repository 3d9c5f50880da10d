"""Issue 14 in the VM: 2^32-1 unmapped pages registered before 256 real ones must not keep them from merging.

tests/c/ksm_holes registers both regions (REGISTER returns 0 for both, as
in 2009); `ksmctl start 5000 100` then runs the scanner as the issue's user
did (5000 pages a round, 100 us between rounds).  Before holes were
skipped, the real region was first reached after stepping over 2^32-1
pages: 12 minutes on the host (docs/benchmarks.md, "Holes"), longer in
this software-emulated VM; now it merges within two passes of its own
pages.  The daemon's log says the first region is
mostly unmapped, and ``regions`` shows how many pages of each are mapped.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.integration.conftest import DEVICE, ROOT, STATS, VM_OUT, keep_sample, ready_program, value

MERGE_TIMEOUT = 30  # seconds: a few rounds of 100 ms, with room for the software-emulated VM
HOLE = "0x100000000000"


def ksmctl(*args: str) -> None:
    """examples/ksmctl (built by the test before its clock starts)."""
    subprocess.run(
        [str(ROOT / "examples" / "bin" / "ksmctl"), *args],
        check=True,
        timeout=30,
        env={**os.environ, "KSM_DEVICE": DEVICE},
    )


def test_the_real_region_merges_though_four_billion_unmapped_pages_come_first(scanner_restored: None) -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT), "examples"], check=True)
    ksmctl("stop")
    sharing0, shared0 = value("pages_sharing"), value("pages_shared")
    with ready_program("ksm_holes") as (_, pid, addr):
        procdir = STATS / "processes" / str(pid)
        header, *rows = (procdir / "regions").read_text().splitlines()
        assert header == "sma addr npages merged mapped"
        assert [row.split()[1:] for row in rows] == [[HOLE, "4294967295", "0", "0"], [f"{addr:#x}", "256", "0", "256"]]
        log = Path(VM_OUT / "daemon.log").read_text() if (VM_OUT / "daemon.log").exists() else ""
        warning = [line for line in log.splitlines() if f"from tid {pid}: the region at {HOLE}" in line]
        assert len(warning) == 1 and "WARNING" in warning[0], log[-2000:]
        assert "of 4294967295 pages is mostly unmapped: 0 of its pages are mapped" in warning[0]
        scans0 = value("full_scans")
        started = time.monotonic()
        ksmctl("start", "5000", "100")
        started_scanning = time.monotonic()  # ksmctl has returned: the scanner runs
        while value("pages_sharing") - sharing0 < 255:
            elapsed = time.monotonic() - started
            assert elapsed < MERGE_TIMEOUT, f"pages_sharing {value('pages_sharing') - sharing0} after {elapsed:.1f} s"
            time.sleep(0.05)
        done = time.monotonic()
        elapsed, after_return = done - started, done - started_scanning
        ksmctl("stop")
        assert value("pages_shared") - shared0 == 1
        assert value(f"processes/{pid}/ksm_merging_pages") == 256
        report = (
            f"ksm_holes: pages_sharing 255 {elapsed:.2f} s after `ksmctl start 5000 100` was run, "
            f"{after_return:.2f} s after it returned "
            f"({value('full_scans') - scans0} full scans meanwhile)\n{warning[0]}\n"
        )
        print(report)
        keep_sample("holes.txt", report)
