"""The historic programs (examples/*.c: ksmctl, qemu_register, ksmpages) against the real device."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import DEVICE, ROOT

BIN = ROOT / "examples" / "bin"
STATS = Path(os.environ.get("CUSE_KSM_STATS_DIR", "/run/cuse-ksm/ksm"))
TIMEOUT = 120  # the VM is software-emulated


def value(name: str) -> int:
    return int((STATS / name).read_text())


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def built() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT), "examples"], check=True)
    return BIN


def ksmctl(built: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(built / "ksmctl"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "KSM_DEVICE": DEVICE},
    )


def test_ksmctl_start_info_stop(built: Path, scanner_restored: None) -> None:
    r = ksmctl(built, "start", "100", "5000")
    assert (r.returncode, r.stderr) == (0, "")
    assert ksmctl(built, "info").stdout == "flags 1, pages_to_scan 100, sleep 5000\n"
    assert (value("run"), value("pages_to_scan"), value("sleep")) == (1, 100, 5000)
    # pages_to_scan 0 with the run flag: the driver's positive 1, nothing changed.
    r = ksmctl(built, "start", "0", "7")
    assert r.returncode == 0 and "returned 1" in r.stderr, r.stderr
    assert ksmctl(built, "info").stdout == "flags 1, pages_to_scan 100, sleep 5000\n"
    # stop: only flags is set; the rest is whatever the stack held, stored as is.
    r = ksmctl(built, "stop")
    assert (r.returncode, r.stderr) == (0, "")
    info = ksmctl(built, "info").stdout
    assert re.fullmatch(r"flags 0, pages_to_scan \d+, sleep \d+\n", info), info
    assert value("run") == 0
    assert ksmctl(built, "bogus").returncode == 2


def test_qemu_register_guest_ram_merges_and_goes_with_the_process(built: Path, scanner_restored: None) -> None:
    wait_until(lambda: value("pages_shared") == 0 and not any((STATS / "processes").iterdir()), TIMEOUT, "idle")
    proc = subprocess.Popen(
        [str(built / "qemu_register"), "-m", "2", "-d", "50"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "KSM_DEVICE": DEVICE},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.match(
            r"qemu_register: pid (\d+): 2 MiB of guest RAM \(512 pages at (0x[0-9a-f]+)\) registered, "
            r"(\d+) identical, pad 0xa5a5a5a5 reserved_bits 0xa5a5a5a5a5a5a5a5$",
            line,
        )
        assert m, line
        pid, addr, ndup = int(m.group(1)), int(m.group(2), 16), int(m.group(3))
        assert ndup == 5 * 50 + 12  # i % 100 < 50 for i < 512
        # qemu never started the scanner: ksmctl does, as an administrator would.
        assert ksmctl(built, "start", "512", "10000").returncode == 0
        wait_until(
            lambda: (value("pages_shared"), value("pages_sharing")) == (1, ndup - 1),
            TIMEOUT,
            f"pages_shared 1, pages_sharing {ndup - 1}",
        )
        procdir = STATS / "processes" / str(pid)
        assert int((procdir / "ksm_merging_pages").read_text()) == ndup
        regions = (procdir / "regions").read_text().splitlines()
        assert regions[1].split()[1:3] == [f"{addr:#x}", "512"], regions  # garbage pad/reserved_bits ignored
        assert len(regions) == 2
        proc.send_signal(signal.SIGTERM)  # a killed qemu: exit closes both fds
        assert proc.wait(timeout=30) == -signal.SIGTERM
        wait_until(lambda: not procdir.exists(), 30, f"{procdir} to go")
        assert (value("pages_shared"), value("pages_sharing")) == (0, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # -s: a guest that shuts down by itself.
    r = subprocess.run(
        [str(built / "qemu_register"), "-m", "1", "-s", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KSM_DEVICE": DEVICE},
    )
    assert r.returncode == 0 and "registered" in r.stdout, r.stdout + r.stderr


def test_ksmpages_times_full_scans_and_merges(built: Path, scanner_restored: None) -> None:
    wait_until(lambda: value("pages_shared") == 0, TIMEOUT, "no shared pages left")
    r = subprocess.run(
        [str(built / "ksmpages"), "-s", "4", "-n", "2", "-p", "1024", "-t", "1000", "-m", "-T", str(TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
        env={**os.environ, "KSM_DEVICE": DEVICE, "CUSE_KSM_STATS_DIR": str(STATS)},
    )
    out_dir = ROOT / "tests" / "vm" / "out"
    if out_dir.is_dir():
        (out_dir / "ksmpages.txt").write_text(r.stdout + r.stderr)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    scans = re.findall(r"^full scan \d: [\d.]+ s, [\d.]+ MiB/s \(pages_shared 0, ", r.stdout, re.M)
    assert len(scans) == 2, r.stdout  # tail-different pages never merge
    assert "1024 pages" in r.stdout
    assert "merged in" in r.stdout and "pages_shared 1, pages_sharing 1023" in r.stdout, r.stdout
    # It put the scanner back as it found it, and its region went with its SMA.
    wait_until(lambda: value("pages_shared") == 0, 30, "its region to go")
