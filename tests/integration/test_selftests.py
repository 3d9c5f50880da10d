"""The kernel's KSM selftests, ported to the 2009 /dev/ksm API (tests/selftests), run on the real device.

Each program prints ``ok``/``not ok`` lines and one summary line
``NAME: PASS (n checks)``; this test builds them, runs each, and asserts it
passed.  Their output is kept in tests/vm/out/selftests/ (the README's table
comes from there).

Each runs twice: on the VM's daemon (``--merge emulate``) and on one with
``--merge kernel``, where the VM kernel's ksmd merges the same memory for
real: the emulated counters the programs check must not change with it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import DEVICE, ROOT, KernelDaemon, kernel_daemon

SELFTESTS = ROOT / "tests" / "selftests"
STATS = Path(os.environ.get("CUSE_KSM_STATS_DIR", "/run/cuse-ksm/ksm"))
PROGRAMS = ["ksm_merge", "ksm_unmerge", "ksm_zero_pages", "ksm_many_processes", "ksm_cow", "ksm_merge_time"]


@pytest.fixture(scope="module")
def built() -> Path:
    subprocess.run(["make", "-s", "-C", str(SELFTESTS)], check=True)
    return SELFTESTS / "bin"


def parse(output: str) -> tuple[list[str], list[str], list[str]]:
    """(ok lines, not-ok lines, summary lines) of a program's output."""
    lines = output.splitlines()
    oks = [line for line in lines if line.startswith("ok - ")]
    bad = [line for line in lines if line.startswith("not ok - ")]
    summary = [line for line in lines if ": PASS (" in line or ": FAIL (" in line]
    return oks, bad, summary


def test_parse_sees_a_failure() -> None:
    """The verdict parser itself: a not-ok line and a FAIL summary are caught."""
    oks, bad, summary = parse("# x\nok - a\nnot ok - b\nx: FAIL (1 of 2 checks failed)\n")
    assert (len(oks), len(bad), summary) == (1, 1, ["x: FAIL (1 of 2 checks failed)"])


@pytest.fixture(scope="module")
def kernel_mode_daemon() -> Iterator[KernelDaemon]:
    with kernel_daemon("ksmselftest", "--cross-check") as daemon:
        yield daemon


@pytest.fixture(params=["emulate_mode", "kernel_mode"])
def target(request: pytest.FixtureRequest, scanner_restored: None) -> Iterator[tuple[str, Path]]:
    """(device, control files) of the daemon in each mode; its scanner stopped after the test."""
    if request.param == "emulate_mode":
        yield DEVICE, STATS
        return
    daemon: KernelDaemon = request.getfixturevalue("kernel_mode_daemon")
    yield daemon.device, daemon.stats
    (daemon.stats / "run").write_text("0\n")
    log = daemon.log_text()
    assert "Traceback" not in log and ": ERROR: " not in log, log


@pytest.mark.parametrize("program", PROGRAMS)
def test_ported_selftest(program: str, built: Path, target: tuple[str, Path]) -> None:
    device, stats = target
    result = subprocess.run(
        [str(built / program)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUSE_KSM_DEVICE": device, "CUSE_KSM_STATS_DIR": str(stats)},
    )
    out_dir = ROOT / "tests" / "vm" / "out"
    if out_dir.is_dir():
        (out_dir / "selftests").mkdir(exist_ok=True)
        mode = "" if device == DEVICE else "-kernel"
        (out_dir / "selftests" / f"{program}{mode}.txt").write_text(result.stdout + result.stderr)
    print(result.stdout)
    oks, bad, summary = parse(result.stdout)
    assert not bad, result.stdout + result.stderr
    assert summary == [f"{program}: PASS ({len(oks)} checks)"], result.stdout + result.stderr
    assert oks, "no checks ran"
    assert result.returncode == 0, result.stdout + result.stderr
