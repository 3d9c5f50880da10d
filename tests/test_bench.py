"""The short benchmark runs every section and prints every ratio line (``make bench`` cannot rot).

Only that it runs: no figure is checked, since timings on a shared machine
say nothing about correctness.  The host kernel's side runs too where this
process may drive /sys/kernel/mm/ksm; the bench restores its settings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import kernel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the bench reads other processes' memory: needs root")

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--size-mib", "64", "--repeat", "1", "--quiet-wait", "0", "--latency-seconds", "0.5"]
NUMBER_OR_NA = r"(\d+\.\d\d|n/a) \("
# Each section's heading, the ratio line that ends it (section 1's is the
# last line), and whether that ratio is against the host kernel's KSM.
SECTIONS = {
    "50 % duplicates": (rf"^64 MiB ratio emulator/kernel: {NUMBER_OR_NA}", True),
    "worst case": (rf"^worst case ratio emulator/kernel: {NUMBER_OR_NA}", True),
    "engine memory per registered page": (rf"^memory ratio emulator/kernel: {NUMBER_OR_NA}", False),
    "ioctl latency": (rf"^latency ratio busy/idle: {NUMBER_OR_NA}", False),
    "50 % duplicates, 64 MiB, time to full merge while `cuse-ksm pages`": (
        rf"^pages ratio loop/alone: {NUMBER_OR_NA}",
        False,
    ),
}


def test_the_short_bench_runs_every_section() -> None:
    with_kernel = kernel.available()
    argv = SHORT if with_kernel else [*SHORT, "--no-kernel"]
    run = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for heading, (ratio, against_kernel) in SECTIONS.items():
        assert any(line.startswith(heading) for line in lines), f"section {heading!r} did not run:\n{run.stdout}"
        found = [m for line in lines if (m := re.match(ratio, line))]
        assert len(found) == 1, f"no ratio line for {heading!r}:\n{run.stdout}"
        # A figure, unless it is against a kernel side that did not run.
        assert (found[0].group(1) == "n/a") == (against_kernel and not with_kernel), run.stdout
    assert re.match(SECTIONS["50 % duplicates"][0], lines[-1]), "the last line is not section 1's ratio line"
    # The read ceiling, against which the worst case's scan rate is judged: two figures.
    figures = r"  read ceiling .*: 1 thread ([\d.]+) M pages/s, 2 threads ([\d.]+) M"
    ceiling = [m for line in lines if (m := re.match(figures, line))]
    assert len(ceiling) == 1 and all(float(x) > 0 for x in ceiling[0].groups()), run.stdout


def run_bench(*argv: str) -> str:
    run = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_the_per_pass_bench_runs_and_dup50_merges_in_its_second_pass() -> None:
    out = run_bench("bench.passes", "dup50", "--size-mib", "16", "--passes", "3")
    counters = re.findall(
        r"^  pass (\d): .* M pages/s; full_scans (\d+), pages_shared (\d+), pages_sharing (\d+)$", out, re.M
    )
    # 4096 pages: 2048 copies of 1024 contents (bench/workload.py), merged in pass 2.
    assert counters == [("1", "1", "0", "0"), ("2", "2", "1024", "1024"), ("3", "3", "1024", "1024")], out


def test_the_holes_bench_runs_and_the_real_region_merges() -> None:
    out = run_bench("bench.holes", "--limit", "5")
    assert re.search(r"^  paced \(ksmctl start 5000 100\): pages_sharing 255 after [\d.]+ ms", out, re.M), out
