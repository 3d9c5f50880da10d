"""Load in the VM: 64 processes x several SMAs and regions for a sustained minute.

Runs only under ``make soak`` (CUSE_KSM_SOAK=1; CUSE_KSM_SOAK_SECONDS to
change the minute), never in ``make test``.  The scanner runs throughout
(bench/cuse_c/bin/ksm_load -S).  Pass: not one unexpected result among all
the calls, and afterwards the daemon's fds, threads and ptrace attachments
are back to baseline and its memory did not grow beyond a small slack.  The
load client prints throughput and latency; they go to docs/benchmarks.md by
hand, never into an assertion.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.integration.conftest import DEVICE, ROOT, daemon_snapshot, settle_to

pytestmark = [
    pytest.mark.skipif(os.environ.get("CUSE_KSM_SOAK") != "1", reason="the long load test: make soak"),
    pytest.mark.on_request,  # its skip under CI is expected (tests/conftest.py)
]

PROCS = int(os.environ.get("CUSE_KSM_SOAK_PROCS", "64"))
SECONDS = int(os.environ.get("CUSE_KSM_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SECONDS * 10 + 600)
def test_soak_64_processes_for_a_minute(daemon_pid):
    subprocess.run(["make", "-s", "-C", str(ROOT / "bench" / "cuse_c")], check=True)
    before = daemon_snapshot(daemon_pid)
    cmd = [str(ROOT / "bench/cuse_c/bin/ksm_load"), "-m", "soak", "-p", str(PROCS), "-t", str(SECONDS)]
    cmd += ["-s", "3", "-r", "2", "-n", "16", "-S", "1000:1000", DEVICE]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS * 10 + 300)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert "errors=0 " in result.stdout
    after = settle_to(daemon_pid, before, timeout=60)
    print(
        f"daemon: fds {before.fds} -> {after.fds}, threads {before.threads} -> {after.threads}, "
        f"RSS {before.rss_kib} -> {after.rss_kib} KiB"
    )
