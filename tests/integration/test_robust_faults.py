"""Faults in the VM: kills inside each ioctl and the hand-out, exits with
regions registered, SMA fds inherited across fork, memory unmapped under the scanner, the
daemon stopped under its clients - and afterwards nothing leaked: fds, threads, memory,
ptrace attachments back to baseline.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    DEVICE,
    ROBUST_BIN,
    SECOND_DAEMON,
    Client,
    build_robust,
    daemon_snapshot,
    settle_to,
    start_daemon,
    status_field,
    stop_daemon,
    wait_for,
)

STATS = Path("/run/cuse-ksm/ksm")


def read_stat(name: str) -> int:
    return int((STATS / name).read_text())


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    build_robust()


@pytest.fixture
def scanner():
    """Run the scanner fast for the test; put the old settings back after."""
    saved = {n: (STATS / n).read_text() for n in ("sleep", "pages_to_scan", "run")}
    (STATS / "sleep").write_text("1000")
    (STATS / "pages_to_scan").write_text("1000")
    (STATS / "run").write_text("1")
    yield
    for name in ("run", "pages_to_scan", "sleep"):
        (STATS / name).write_text(saved[name])


@pytest.mark.parametrize("op", ["api", "create", "start", "info", "register", "remove"])
def test_killed_inside_each_ioctl(op, daemon_pid):
    before = daemon_snapshot(daemon_pid)
    rng = random.Random(hash(op) & 0xFFFF)
    for _ in range(6):
        procs = [
            subprocess.Popen([str(ROBUST_BIN / "ksm_loop"), DEVICE, op], stdout=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.01, 0.3))
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
            out = p.stdout.read() if p.stdout else ""
            assert p.returncode == -signal.SIGKILL, out  # it never saw a wrong result
            assert p.stdout is not None
            p.stdout.close()
    settle_to(daemon_pid, before)


def test_killed_in_the_middle_of_the_handout(daemon_pid):
    """SIGKILL exactly while the daemon is attached to the caller (ptrace), many times."""
    before = daemon_snapshot(daemon_pid)
    hits = 0
    for _ in range(40):
        p = subprocess.Popen([str(ROBUST_BIN / "ksm_loop"), DEVICE, "create"], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if status_field(p.pid, "TracerPid") == daemon_pid:
                p.send_signal(signal.SIGKILL)
                hits += 1
                break
        p.kill()
        p.wait(timeout=30)
        assert p.stdout is not None
        p.stdout.close()
        if hits >= 10:
            break
    assert hits >= 1, "never caught a caller during its hand-out"
    settle_to(daemon_pid, before)
    # Still serving hand-outs.
    c = Client()
    assert c("sma").startswith("ok ")
    c.kill()
    settle_to(daemon_pid, before)


def test_exit_with_merged_regions_registered(daemon_pid, scanner):
    before = daemon_snapshot(daemon_pid)
    shared_before = read_stat("pages_shared")
    c = Client()
    assert c("sma").startswith("ok ")
    assert c("reg 32 0x61").startswith("ok ")
    assert c("reg 32 0x61").startswith("ok ")
    merging = STATS / "processes" / str(c.pid) / "ksm_merging_pages"
    wait_for(lambda: merging.exists() and int(merging.read_text()) == 64, what="64 merged pages")
    c.send("exit")
    c.proc.wait(10)
    c.kill()
    wait_for(lambda: not merging.parent.exists(), what="the process to leave the control files")
    wait_for(lambda: read_stat("pages_shared") == shared_before, what="its shared page to go")
    settle_to(daemon_pid, before)


def test_sma_fd_inherited_by_fork_and_used_after_the_parent_exits(daemon_pid):
    before = daemon_snapshot(daemon_pid)
    c = Client()
    assert c("sma").startswith("ok ")
    answer = c("forkreg 8 0x62")
    assert answer.startswith("ok ")
    child = int(answer.split()[1])
    c.send("exit")
    c.proc.wait(10)
    # The child registers through the inherited fd, into its own memory.
    line = c.readline()
    assert line == f"child {child} 0 0", line
    regions = STATS / "processes" / str(child) / "regions"
    wait_for(regions.exists, what="the child's region")
    assert len(regions.read_text().splitlines()) == 2  # header + one region
    assert not (STATS / "processes" / str(c.pid)).exists()
    os.kill(child, signal.SIGKILL)
    c.kill()
    wait_for(lambda: not regions.parent.exists(), what="the child's regions to go")
    settle_to(daemon_pid, before)


def test_region_unmapped_and_remapped_under_the_scanner(daemon_pid, scanner):
    before = daemon_snapshot(daemon_pid)
    c = Client()
    assert c("sma").startswith("ok ")
    assert c("reg 32 0x63").startswith("ok ")
    merging = STATS / "processes" / str(c.pid) / "ksm_merging_pages"

    def merged() -> int:
        return int(merging.read_text()) if merging.exists() else -1

    wait_for(lambda: merged() == 32, what="32 merged pages")
    assert c("unmap") == "ok"
    wait_for(lambda: merged() == 0, what="the unmapped pages to unmerge")
    assert c("remap 0x64") == "ok"  # new memory at the same address, other content
    wait_for(lambda: merged() == 32, what="the remapped pages to merge")
    assert c("api") == "ok 1"
    c.kill()
    wait_for(lambda: not merging.parent.exists(), what="the process to go")
    settle_to(daemon_pid, before)


def test_daemon_stopped_under_its_clients_and_started_again():
    name = "ksmrobust"
    proc = start_daemon(name, *SECOND_DAEMON)
    clients = [Client(f"/dev/{name}") for _ in range(3)]
    for c in clients:
        assert c("sma").startswith("ok ")
        assert c("reg 8 0x65").startswith("ok ")
    err = stop_daemon(proc)
    assert proc.returncode == 0, err
    # Clients holding fds get an error at once: no hang (Client.readline fails on a hang).
    for c in clients:
        assert c("api").startswith("err "), "an ioctl on a dead daemon's device succeeded"
        assert c("again").startswith("err ")
        assert c("close")  # answers: closing does not hang either
    # And it starts again under the same name, serving new clients.
    proc = start_daemon(name, *SECOND_DAEMON)
    try:
        before = daemon_snapshot(proc.pid)
        fresh = Client(f"/dev/{name}")
        assert fresh("api") == "ok 1"
        assert fresh("sma").startswith("ok ")
        assert fresh("reg 8 0x65").startswith("ok ")
        fresh.kill()
        settle_to(proc.pid, before)
    finally:
        for c in clients:
            c.kill()
        err = stop_daemon(proc)
        assert proc.returncode == 0, err
