"""The host KSM adapter of --merge kernel: on directories of plain files, on real processes, on the real /sys."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.kernel import LOCK
from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.host import procfs
from cuse_ksm.host.hostksm import (
    KSM_DIR,
    HostCounters,
    HostKsm,
    NoHostKsm,
    ksm_stat,
    mergeable_pages,
    merging_pages,
    sleep_millisecs,
)
from tests.conftest import ROOT, mount_dir, needs_root, python
from tests.host.child import Child

# A file that reads as a number and that the kernel refuses to write, even
# for root: a read-only sysctl.  A knob linked to it fails the test the
# moment the code under test writes that knob.
READ_ONLY = "/proc/sys/kernel/ngroups_max"
REFUSED = int(Path(READ_ONLY).read_text())

SAVED = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20}
COUNTERS = {"pages_shared": 1, "pages_sharing": 2, "pages_unshared": 3, "pages_volatile": 4, "full_scans": 5}


def fake_ksm(directory: Path, **values: int) -> Path:
    """A KSM directory of plain files: the knobs as in SAVED unless given, and COUNTERS."""
    directory.mkdir(exist_ok=True)
    for name, value in {**SAVED, **COUNTERS, **values}.items():
        (directory / name).write_text(f"{value}\n")
    return directory


def contents(directory: Path) -> dict[str, int]:
    return {name: int((directory / name).read_text()) for name in SAVED}


def refuse_writes(directory: Path, name: str) -> None:
    (directory / name).unlink()
    (directory / name).symlink_to(READ_ONLY)


@pytest.mark.parametrize(("sleep_us", "ms"), [(0, 0), (1, 1), (999, 1), (1000, 1), (1001, 2), (2_000_000, 2000)])
def test_sleep_rounds_up_to_whole_milliseconds(sleep_us: int, ms: int) -> None:
    assert sleep_millisecs(sleep_us) == ms


# -- HostKsm on plain files -------------------------------------------------------------------


def test_apply_saves_the_knobs_once_and_restore_puts_exactly_those_back(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path / "ksm")
    host = HostKsm(str(ksm))
    assert host.settings() == SAVED
    host.apply(run=True, pages_to_scan=500, sleep_us=1500)
    assert contents(ksm) == {"run": 1, "pages_to_scan": 500, "sleep_millisecs": 2}
    host.apply(run=False, pages_to_scan=7, sleep_us=0)  # saves nothing more: SAVED is what goes back
    assert contents(ksm) == {"run": 0, "pages_to_scan": 7, "sleep_millisecs": 0}
    assert host.restore() == SAVED
    assert contents(ksm) == SAVED
    (ksm / "pages_to_scan").write_text("9\n")
    assert host.restore() == {}  # a second call writes nothing
    assert contents(ksm) == {**SAVED, "pages_to_scan": 9}


def test_stop_writes_run_only_and_is_restored(tmp_path: Path) -> None:
    """A 2009 STOP's zeros never reach the host's pace: writing either would fail here."""
    ksm = fake_ksm(tmp_path / "ksm", run=1)
    refuse_writes(ksm, "pages_to_scan")
    refuse_writes(ksm, "sleep_millisecs")
    host = HostKsm(str(ksm))
    before = host.settings()
    host.stop()
    assert host.settings() == {**before, "run": 0}
    host.stop()  # stopped already: nothing written
    assert host.restore() == {"run": 1} | {k: v for k, v in before.items() if k != "run"}
    assert host.read("run") == 1


def test_what_was_saved_at_start_goes_back_not_what_others_wrote_later(tmp_path: Path) -> None:
    """Two kernel-mode daemons, or a program writing the knobs itself: each daemon restores what it found."""
    ksm = fake_ksm(tmp_path / "ksm")
    host = HostKsm(str(ksm))
    assert host.save() == SAVED
    assert host.restore() == {}  # saved, but never written: nothing to put back
    host.save()
    (ksm / "pages_to_scan").write_text("100000\n")  # someone else, after our start
    host.apply(run=True, pages_to_scan=500, sleep_us=0)
    assert host.restore() == SAVED
    assert contents(ksm) == SAVED


def test_restore_without_apply_restores_nothing(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path / "ksm", pages_to_scan=9)
    assert HostKsm(str(ksm)).restore() == {}
    assert contents(ksm) == {**SAVED, "pages_to_scan": 9}


def test_apply_writes_run_last_and_a_refused_write_names_file_and_value(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path / "ksm")
    refuse_writes(ksm, "run")
    host = HostKsm(str(ksm))
    with pytest.raises(OSError, match=f"cannot write 1 to {ksm}/run: "):
        host.apply(run=True, pages_to_scan=500, sleep_us=1500)
    # The rate was set before the switch was tried.
    assert contents(ksm) == {"run": REFUSED, "pages_to_scan": 500, "sleep_millisecs": 2}
    assert host.restore() == {**SAVED, "run": REFUSED}


def test_apply_writes_only_what_changes(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path / "ksm", pages_to_scan=REFUSED, sleep_millisecs=REFUSED)
    for name in ("pages_to_scan", "sleep_millisecs"):
        refuse_writes(ksm, name)
    host = HostKsm(str(ksm))
    host.apply(run=True, pages_to_scan=REFUSED, sleep_us=REFUSED * 1000 - 999)
    assert contents(ksm) == {"run": 1, "pages_to_scan": REFUSED, "sleep_millisecs": REFUSED}
    assert host.restore() == {"run": 0, "pages_to_scan": REFUSED, "sleep_millisecs": REFUSED}
    assert contents(ksm)["run"] == 0


def test_a_saved_unmerge_is_restored_as_stopped(tmp_path: Path) -> None:
    """run=2 would unmerge every page on the host again; what it left behind is a stopped ksmd."""
    ksm = fake_ksm(tmp_path / "ksm", run=2)
    host = HostKsm(str(ksm))
    host.apply(run=True, pages_to_scan=100, sleep_us=20_000)
    assert contents(ksm)["run"] == 1
    assert host.restore() == {**SAVED, "run": 0}
    assert contents(ksm)["run"] == 0


def test_restore_goes_on_past_a_knob_it_cannot_write_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ksm = fake_ksm(tmp_path / "ksm")
    host = HostKsm(str(ksm))
    host.apply(run=True, pages_to_scan=500, sleep_us=1500)
    (ksm / "pages_to_scan").unlink()
    (ksm / "pages_to_scan").mkdir()
    with caplog.at_level(logging.ERROR, logger="cuse_ksm.host.hostksm"):
        assert host.restore() == {"sleep_millisecs": 20, "run": 0}
    assert int((ksm / "sleep_millisecs").read_text()) == 20
    assert int((ksm / "run").read_text()) == 0  # restored after the knob that failed
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"could not restore {ksm}/pages_to_scan to 100"]


def test_counters(tmp_path: Path) -> None:
    assert HostKsm(str(fake_ksm(tmp_path / "ksm"))).counters() == HostCounters(**COUNTERS)


def test_general_profit_is_none_on_a_kernel_without_it(tmp_path: Path) -> None:
    host = HostKsm(str(fake_ksm(tmp_path / "ksm")))
    assert host.general_profit() is None  # before 6.4, as the VM's 6.1
    (tmp_path / "ksm" / "general_profit").write_text("-1048576\n")  # signed: items may cost more than merging saves
    assert host.general_profit() == -1048576


# -- HostKsm.open ------------------------------------------------------------------------------


def test_open_a_missing_directory_says_the_kernel_has_no_ksm(tmp_path: Path) -> None:
    missing = tmp_path / "ksm"
    with pytest.raises(NoHostKsm) as raised:
        HostKsm.open(str(missing))
    assert str(raised.value) == (
        f"{missing} does not exist: this kernel has no KSM (CONFIG_KSM); "
        "--merge kernel needs it (the default, --merge emulate, does not)"
    )


def test_open_a_directory_without_run(tmp_path: Path) -> None:
    with pytest.raises(NoHostKsm, match=f"^{tmp_path}/run does not exist: "):
        HostKsm.open(str(tmp_path))


def test_open_a_writable_directory(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path / "ksm")
    assert HostKsm.open(str(ksm)).directory == str(ksm)


# Opens its argv[1] and prints NoHostKsm's message, as the user argv[2] if given.
OPEN = """
import os, sys
from cuse_ksm.host.hostksm import HostKsm, NoHostKsm
if len(sys.argv) > 2:
    os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))
try:
    HostKsm.open(sys.argv[1])
except NoHostKsm as e:
    print(e)
"""


@pytest.fixture
def public_ksm() -> Iterator[Path]:
    """A fake KSM directory that other users can reach (tmp_path cannot be)."""
    with mount_dir() as path:
        yield fake_ksm(Path(path))


@needs_root
def test_open_as_another_user_says_run_is_not_writable(public_ksm: Path) -> None:
    out = python("-c", OPEN, str(public_ksm), "65534")
    assert out.stdout.startswith(f"{public_ksm}/run is not writable (not root, "), out.stderr


@needs_root
def test_open_on_a_read_only_mount_says_run_is_not_writable(public_ksm: Path) -> None:
    """Root, but the directory is mounted read-only: as /sys in many containers.  In a mount namespace of its own."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -c "$3" "$1"'
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", str(public_ksm), sys.executable, OPEN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.startswith(f"{public_ksm}/run is not writable (not root, or a read-only /sys"), out.stderr


# -- /proc of a real process -------------------------------------------------------------------


@pytest.fixture
def child() -> Iterator[Child]:
    started = Child.start(64)
    yield started
    started.kill()


def test_mergeable_pages_tells_what_madvise_really_marked(child: Child) -> None:
    child.merge(0, 32)
    child.unmap(40, 8)
    shared = child.share(16)
    assert mergeable_pages(child.pid, [(child.addr, 64)]) == [(56, 32)]
    assert mergeable_pages(child.pid, [(child.addr, 32)]) == [(32, 32)]
    assert mergeable_pages(child.pid, [(child.page_addr(28), 16)]) == [(12, 4)]  # 4 marked, 8 unmarked, then the hole
    assert mergeable_pages(child.pid, [(shared, 16)]) == [(16, 0)]  # madvise said 0, and marked nothing
    # Four billion pages: arithmetic on the mappings, not a page at a time.
    assert mergeable_pages(child.pid, [(2**47, 2**32 - 1)]) == [(0, 0)]
    assert mergeable_pages(child.pid, [(2**64 - PAGE_SIZE, 2**32 - 1)]) == [(0, 0)]
    # A process's regions file asks for all its ranges at once: each gets its own figures.
    ranges = [(child.addr, 64), (shared, 16), (child.addr, 32)]
    assert mergeable_pages(child.pid, ranges) == [(56, 32), (16, 0), (32, 32)]
    child.exit()
    assert mergeable_pages(child.pid, [(child.addr, 64), (shared, 16)]) == [(0, 0), (0, 0)]


def test_merging_pages_of_a_process_until_it_is_gone(child: Child) -> None:
    pages = merging_pages(child.pid)
    assert isinstance(pages, int) and pages >= 0
    os.kill(child.pid, signal.SIGKILL)
    for _ in range(500):  # a zombie until reaped: its file is there, but empty
        if (procfs.status(child.pid) or {}).get("State", "").startswith("Z"):
            break
        time.sleep(0.01)
    else:
        raise AssertionError("child did not become a zombie")
    assert merging_pages(child.pid) is None
    child.kill()
    assert merging_pages(child.pid) is None
    assert merging_pages(2**22 + 1) is None  # above PID_MAX_LIMIT: never a process


def test_ksm_stat_of_a_process_as_the_host_kernel_writes_it(child: Child) -> None:
    if not os.path.exists("/proc/self/ksm_stat"):
        assert ksm_stat(child.pid) is None  # a kernel before 6.1
    else:
        text = ksm_stat(child.pid)
        assert text is not None and text.startswith("ksm_rmap_items ")
    assert ksm_stat(2**22 + 1) is None  # above PID_MAX_LIMIT: never a process


# -- the real /sys/kernel/mm/ksm -------------------------------------------------------------


@needs_root
def test_the_real_host_settings_are_changed_and_put_back() -> None:
    """Holds the benchmarks' lock, and puts the settings back itself whatever happens."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        host = HostKsm.open()
        before = host.settings()
        running = before["run"] == 1
        want = {**before, "run": int(running)}  # a run=2 (unmerge) goes back as 0, as restore() does
        try:
            sleep_us = before["sleep_millisecs"] * 1000
            host.apply(run=running, pages_to_scan=before["pages_to_scan"] + 1, sleep_us=sleep_us)
            assert host.read("pages_to_scan") == before["pages_to_scan"] + 1
            assert host.restore() == want
            assert host.settings() == want
        finally:
            for name in ("sleep_millisecs", "pages_to_scan", "run"):
                path = Path(KSM_DIR, name)
                if int(path.read_text()) != want[name]:
                    path.write_text(f"{want[name]}\n")
