"""The January 2009 ABI on the real device: an unmodified program of that ABI, and both ABIs at once."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pyksm import Ksm

from tests.integration.conftest import (
    DEVICE,
    SECOND_DAEMON,
    keep_sample,
    ready_program,
    run_c,
    start_daemon,
    stop_daemon,
    wait_for,
)

STATS = Path(os.environ.get("CUSE_KSM_STATS_DIR", "/run/cuse-ksm/ksm"))
NPAGES = 64
MERGE_TIMEOUT = 120  # a few passes of the scanner in a software-emulated VM


def value(path: Path) -> int:
    return int(path.read_text())


def test_a_january_program_sees_that_drivers_answers(scanner_restored):
    """tests/c/ksm_2009_01, compiled against include/linux/ksm-2009-01.h: every call, each quirk."""
    result = run_c("ksm_2009_01", "sequence", DEVICE)
    print(result.stdout)
    assert "not ok" not in result.stdout, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("PASS") and result.returncode == 0, result.stdout + result.stderr


def test_march_and_january_programs_share_one_scanner(scanner_restored):
    """Identical pages registered through the two ABIs merge into one shared page; one set of parameters."""
    with (
        ready_program("ksm_merge_wait", str(NPAGES), "128", "10000") as (_, march, _),
        ready_program("ksm_2009_01", "merge", str(NPAGES), "0x5a") as (_, january, _),
    ):
        # The January START_STOP came last: the March GET_INFO reads its parameters.
        with Ksm(DEVICE) as ksm:
            info = ksm.info()
        assert (info.sleep, info.pages_to_scan, info.flags) == (20000, 256, 1)
        assert value(STATS / "sleep") == 20000 and value(STATS / "pages_to_scan") == 256
        wait_for(
            lambda: value(STATS / "pages_sharing") == 2 * NPAGES - 1,
            MERGE_TIMEOUT,
            f"pages_sharing {2 * NPAGES - 1}",
        )
        assert value(STATS / "pages_shared") == 1
        for pid in (march, january):
            assert value(STATS / "processes" / str(pid) / "ksm_merging_pages") == NPAGES


def test_trace_names_each_call_with_its_abi():
    name = "ksmjan"
    proc = start_daemon(name, "--trace", *SECOND_DAEMON)
    try:
        result = run_c("ksm_2009_01", "sequence", f"/dev/{name}")
    finally:
        err = stop_daemon(proc)
    assert result.returncode == 0, result.stdout
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if "trace:" in line]
    keep_sample("trace-sample-2009-01.txt", "\n".join(lines) + "\n")
    expected = [
        r"/dev/ksmjan KSM_START_STOP_KTHREAD\[2009-01\] \{sleep=4321, pages_to_scan=55, flags=0\} = 0 <",
        r"/dev/ksmjan KSM_GET_INFO_KTHREAD\[2009-01\] \{sleep=4321, pages_to_scan=55, flags=0\} = 0 <",
        r"/dev/ksmjan KSM_CREATE_SCAN\[2009-01\] 0 = \d+ \(scan#1\) <",
        # never copied in (the driver never read it): the raw pointer, and the +22 the caller got
        r"scan#1 KSM_SCAN\[2009-01\] 0x[0-9a-f]+ = 22 <",
        r"sma#\d+ KSM_REGISTER_MEMORY_REGION\[2009-01\] \{npages=8, pad=0xcccccccc, addr=0x[0-9a-f]+\} = 0 <",
    ]
    for pattern in expected:
        assert any(re.search(pattern, line) for line in lines), (pattern, "\n".join(lines))
