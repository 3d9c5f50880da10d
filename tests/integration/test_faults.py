"""Clients that die mid-call or exit with SMAs open never take the daemon down."""

import os
import random
import signal
import subprocess
import time

from tests.integration.conftest import C_BIN, open_fds, run_c


def tracer_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def test_exiting_with_smas_open_releases_them(daemon_pid):
    baseline = open_fds(daemon_pid)
    result = run_c("ksm_churn", "50", "leak")  # 50 rounds, never closing anything
    assert result.returncode == 0, result.stdout
    assert result.stdout.count(".") == 50
    time.sleep(0.5)
    assert open_fds(daemon_pid) == baseline  # every pinned address space was let go
    assert run_c("ksm_abi_sequence").returncode == 0


def test_clients_killed_at_random_moments(daemon_pid):
    rng = random.Random(2009)
    baseline = open_fds(daemon_pid)
    killed = 0
    for _ in range(12):
        procs = [subprocess.Popen([str(C_BIN / "ksm_churn")], stdout=subprocess.DEVNULL) for _ in range(3)]
        time.sleep(rng.uniform(0.02, 0.4))
        for p in procs:
            assert tracer_of(p.pid) in (0, daemon_pid)
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
            killed += p.returncode == -signal.SIGKILL
    assert killed == 36
    assert os.path.exists(f"/proc/{daemon_pid}")
    deadline = time.monotonic() + 10
    while open_fds(daemon_pid) != baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(daemon_pid) == baseline
    result = run_c("ksm_abi_sequence")
    assert result.returncode == 0, result.stdout
