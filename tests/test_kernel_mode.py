"""``--merge kernel`` without a kernel: what the session asks callers to madvise, and what it shows.

The device and session decide everything here; the host is a
:class:`~cuse_ksm.device.HostView` whose answers each test sets.  The real
madvise, sysfs and /proc reads are tested in tests/host and in the VM
(tests/integration/test_kernel_merge.py).
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Sequence

import pytest

from cuse_ksm import abi, cli
from cuse_ksm import protocol as p
from cuse_ksm.controltree import ControlTree
from cuse_ksm.device import ADVICE_OK, ADVICE_PENDING, Advise, HostView, KsmDevice
from cuse_ksm.engine import Engine, Slot
from cuse_ksm.host.hostksm import HostCounters, HostKsm
from cuse_ksm.host.syscall import MADV_MERGEABLE, MADV_UNMERGEABLE, NR_MADVISE
from cuse_ksm.session import MERGE, UNMERGE, Borrow, CuseSession
from tests.conftest import hand_out
from tests.engine.fakes import FakeSpace

PAGE = abi.PAGE_SIZE
A, B = 100, 200  # two processes: thread A+n belongs to process A
BASE = 0x7F0000000000


class Host:
    """The host as a test sets it: which pages are mergeable, what the kernel merged."""

    def __init__(self) -> None:
        self.mergeable: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.merging = {A: 4096}
        self.asked: list[tuple[int, int, int]] = []
        # A kernel before 6.4 (the VM's 6.1) has no general_profit; before 6.1 no ksm_stat.
        self.general_profit: int | None = None
        self.ksm_stat: dict[int, str] = {}

    def mergeable_pages(self, tgid: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        self.asked += [(tgid, addr, npages) for addr, npages in ranges]
        return [self.mergeable.get((tgid, addr, npages), (npages, npages)) for addr, npages in ranges]

    def view(self) -> HostView:
        return HostView(
            tgid=lambda tid: tid - tid % 100,
            mergeable_pages=self.mergeable_pages,
            merging_pages=self.merging.get,
            counters=lambda: HostCounters(pages_shared=3, pages_sharing=5000, pages_unshared=1, pages_volatile=0,
                                          full_scans=2),
            general_profit=lambda: self.general_profit,
            ksm_stat=self.ksm_stat.get,
        )  # fmt: skip


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def up(host: Host) -> CuseSession:
    device = KsmDevice(Engine(), lambda tid: FakeSpace(tgid=tid - tid % 100), host=host.view())
    session = CuseSession(device, devname="ksmtest", dev_dir="/nonexistent")
    session.receive(p.CuseInit(1, 0, 7, 31, 0))
    return session


_uniques = iter(range(100, 1 << 30, 2))


# The REGISTER of each ABI, with its struct (the January one is 16 bytes).
REGISTERS = {
    abi.KSM_REGISTER_MEMORY_REGION: abi.MemoryRegion,
    abi.KSM_REGISTER_MEMORY_REGION_2009_01: abi.MemoryRegion2009Jan,
}


def register(
    session: CuseSession, fh: int, addr: int, npages: int, tid: int = A + 1, cmd: int = abi.KSM_REGISTER_MEMORY_REGION
) -> bytes | Borrow:
    region = REGISTERS[cmd](npages=npages, addr=addr).pack()
    req = p.Ioctl(next(_uniques), tid, fh, cmd, 0, 0, region, False)
    out = session.receive(req)
    if isinstance(out, bytes):
        return out
    (borrow,) = out
    assert isinstance(borrow, Borrow) and borrow.request is req
    return borrow


def remove(session: CuseSession, fh: int, tid: int = A + 1) -> bytes | Borrow:
    out = session.receive(p.Ioctl(next(_uniques), tid, fh, abi.KSM_REMOVE_MEMORY_REGION, 0, 0, b"", False))
    if isinstance(out, bytes):
        return out
    (borrow,) = out
    assert isinstance(borrow, Borrow)
    return borrow


def madvised(borrow: Borrow) -> list[tuple[int, int, int]]:
    """(addr, length, advice) of each madvise the borrow makes its caller run."""
    assert all(c.nr == NR_MADVISE and c.stack == b"" for c in borrow.errand.calls)
    return [(c.args[0], c.args[1], c.args[2]) for c in borrow.errand.calls]  # type: ignore[misc]


def the_slot(session: CuseSession) -> Slot:
    (slot,) = session.device.engine.slots
    return slot


# -- REGISTER ------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", REGISTERS, ids=abi.ioctl_name)
def test_register_has_the_caller_madvise_its_region_and_returns_0(up: CuseSession, host: Host, cmd: int) -> None:
    fh = hand_out(up, A + 1)[1]
    borrow = register(up, fh, BASE, 16, cmd=cmd)
    assert isinstance(borrow, Borrow)
    assert madvised(borrow) == [(BASE, 16 * PAGE, MADV_MERGEABLE)]
    assert borrow.errand.returns == 0  # the 2009 result, whatever madvise says
    assert borrow.errand.timeout == math.inf  # bounded work, however long: no ETIMEDOUT
    assert borrow.errand.calls[0].purpose == MERGE
    slot = the_slot(up)
    assert (slot.addr, slot.npages, slot.host_advice) == (BASE, 16, ADVICE_PENDING)  # recorded at once, as in 2009
    assert up.complete_ioctl(borrow) == p.reply_ioctl(borrow.request.unique, 0)
    up.borrowed(borrow, (0,))
    assert slot.host_advice == ADVICE_OK
    assert host.asked == [(A, BASE, 16)]  # what the kernel made of it was checked
    assert up.borrows == {}


def test_an_unaligned_region_is_advised_from_the_page_that_holds_it(up: CuseSession) -> None:
    """The 2009 driver scanned from the page holding addr; madvise wants that page's address."""
    borrow = register(up, hand_out(up, A + 1)[1], BASE + 123, 2)
    assert isinstance(borrow, Borrow)
    assert madvised(borrow) == [(BASE, 2 * PAGE, MADV_MERGEABLE)]


def test_a_region_of_no_pages_needs_no_madvise(up: CuseSession) -> None:
    out = register(up, hand_out(up, A + 1)[1], BASE, 0)
    assert isinstance(out, bytes) and p.IOCTL_OUT.unpack_from(out, p.OUT_HEADER.size)[0] == 0
    assert the_slot(up).host_advice == ""


def test_a_region_that_wraps_is_clipped_to_the_address_space(up: CuseSession) -> None:
    top = (1 << 64) - 4 * PAGE
    borrow = register(up, hand_out(up, A + 1)[1], top, 0xFFFFFFFF)
    assert isinstance(borrow, Borrow)
    assert madvised(borrow) == [(top, 4 * PAGE, MADV_MERGEABLE)]


def test_a_failing_madvise_is_logged_and_shown_and_the_ioctl_still_returns_0(up: CuseSession, caplog) -> None:
    borrow = register(up, hand_out(up, A + 1)[1], BASE, 16)
    assert isinstance(borrow, Borrow)
    up.complete_ioctl(borrow)
    up.borrowed(borrow, (-errno.ENOMEM,))
    assert the_slot(up).host_advice == "ENOMEM"
    assert (
        f"KSM_REGISTER_MEMORY_REGION[2009-03] from tid {A + 1}: madvise({BASE:#x}, {16 * PAGE:#x}) failed with ENOMEM "
        "(part of the range is not mapped; the mapped parts were advised)"
    ) in caplog.messages


def test_a_shared_mapping_is_reported_although_madvise_returned_0(up: CuseSession, host: Host, caplog) -> None:
    host.mergeable[(A, BASE, 16)] = (16, 0)  # MAP_SHARED: the kernel ignores the advice
    borrow = register(up, hand_out(up, A + 1)[1], BASE, 16)
    assert isinstance(borrow, Borrow)
    up.complete_ioctl(borrow)
    up.borrowed(borrow, (0,))
    assert the_slot(up).host_advice == ADVICE_OK
    (message,) = [m for m in caplog.messages if "mergeable" in m]
    assert "only 0 of the region's 16 pages are mergeable (16 mapped)" in message
    assert "MAP_SHARED" in message


def test_a_region_unmapped_before_we_look_is_no_shared_mapping(up: CuseSession, host: Host, caplog) -> None:
    """The caller's ioctl returns before the daemon reads smaps: what it unmapped meanwhile is not reported."""
    host.mergeable[(A, BASE, 16)] = (4, 4)  # 12 pages unmapped since madvise marked them
    borrow = register(up, hand_out(up, A + 1)[1], BASE, 16)
    assert isinstance(borrow, Borrow)
    up.complete_ioctl(borrow)
    up.borrowed(borrow, (0,))
    assert the_slot(up).host_advice == ADVICE_OK
    assert caplog.messages == []


@pytest.mark.parametrize("replied", [False, True])
def test_a_caller_that_cannot_be_borrowed_still_gets_0(up: CuseSession, caplog, replied: bool) -> None:
    """A traced caller (EBUSY), before or after its ioctl was completed: one answer, 0, and a log line."""
    borrow = register(up, hand_out(up, A + 1)[1], BASE, 16)
    assert isinstance(borrow, Borrow)
    if replied:
        up.complete_ioctl(borrow)
    reply = up.borrow_failed(borrow, errno.EBUSY, "thread 101 is already being traced by pid 9 (a debugger?)")
    assert reply == (None if replied else p.reply_ioctl(borrow.request.unique, 0))
    assert the_slot(up).host_advice == "EBUSY"
    (record,) = [r for r in caplog.records if r.name == "cuse_ksm.session"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().endswith("failed with EBUSY: thread 101 is already being traced by pid 9 (a debugger?)")
    assert up.borrows == {}


def test_a_caller_killed_in_its_madvise_is_no_warning(up: CuseSession, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cuse_ksm.session")
    borrow = register(up, hand_out(up, A + 1)[1], BASE, 16)
    assert isinstance(borrow, Borrow)
    up.complete_ioctl(borrow)
    assert up.borrow_failed(borrow, errno.ESRCH, "thread 101 was killed while borrowed") is None
    assert [r.levelno for r in caplog.records if r.name == "cuse_ksm.session"] == [logging.INFO]


def test_stopping_the_daemon_mid_madvise_answers_0(up: CuseSession) -> None:
    borrow = register(up, hand_out(up, A + 1)[1], BASE, 16)
    assert isinstance(borrow, Borrow)
    assert up.borrow_cancelled(borrow) == p.reply_ioctl(borrow.request.unique, 0)


def test_a_region_removed_while_its_madvise_runs_is_reported(up: CuseSession, caplog) -> None:
    """Thread 1 is on its way to MADV_MERGEABLE when thread 2 REMOVEs: the advice outlives the region."""
    fh = hand_out(up, A + 1)[1]
    borrow = register(up, fh, BASE, 16)
    assert isinstance(borrow, Borrow)
    up.complete_ioctl(borrow)
    unmerge = remove(up, fh, tid=A + 2)
    assert isinstance(unmerge, Borrow)
    up.borrowed(borrow, (0,))  # the MERGEABLE ran after REMOVE's answer
    assert f"the region at {BASE:#x} was removed while its madvise ran" in caplog.text


# -- REMOVE ----------------------------------------------------------------------------


def finish(session: CuseSession, out: bytes | Borrow) -> None:
    if isinstance(out, Borrow):
        session.complete_ioctl(out)
        session.borrowed(out, (0,) * len(out.errand.calls))


def test_remove_unmerges_what_the_process_no_longer_registers(up: CuseSession) -> None:
    """Only the caller's process, and never a range another of its regions still covers."""
    first, second = hand_out(up, A + 1)[1], hand_out(up, A + 1)[1]
    finish(up, register(up, first, BASE, 16))  # [0, 16)
    finish(up, register(up, first, BASE + 32 * PAGE, 8))  # [32, 40)
    finish(up, register(up, first, BASE + 100 * PAGE, 4, tid=B + 1))  # another process's region on the same SMA
    finish(up, register(up, second, BASE + 4 * PAGE, 2))  # [4, 6): still registered after the REMOVE
    borrow = remove(up, first)
    assert isinstance(borrow, Borrow)
    assert madvised(borrow) == [
        (BASE, 4 * PAGE, MADV_UNMERGEABLE),
        (BASE + 6 * PAGE, 10 * PAGE, MADV_UNMERGEABLE),
        (BASE + 32 * PAGE, 8 * PAGE, MADV_UNMERGEABLE),
    ]
    assert borrow.errand.returns == 0 and borrow.errand.calls[0].purpose == UNMERGE
    # The 2009 REMOVE dropped every region of the SMA, the other process's too.
    assert [(s.space.tgid, s.addr) for s in up.device.engine.slots] == [(A, BASE + 4 * PAGE)]
    up.complete_ioctl(borrow)
    up.borrowed(borrow, (0, 0, 0))


def test_remove_of_ranges_still_registered_needs_no_madvise(up: CuseSession) -> None:
    first, second = hand_out(up, A + 1)[1], hand_out(up, A + 1)[1]
    finish(up, register(up, first, BASE, 4))
    finish(up, register(up, second, BASE, 16))
    out = remove(up, first)
    assert out == p.reply_ioctl(next(_uniques) - 2, 0)


def test_a_failing_unmerge_is_logged(up: CuseSession, caplog) -> None:
    fh = hand_out(up, A + 1)[1]
    finish(up, register(up, fh, BASE, 4))
    borrow = remove(up, fh)
    assert isinstance(borrow, Borrow)
    up.complete_ioctl(borrow)
    up.borrowed(borrow, (-errno.ENOMEM,))
    assert any(f"madvise({BASE:#x}, {4 * PAGE:#x}) failed with ENOMEM" in m for m in caplog.messages)


def test_emulation_never_borrows_for_register_or_remove() -> None:
    device = KsmDevice(Engine(), FakeSpace)
    fh = device.open(handed=device.engine.new_sma()).fh
    region = abi.MemoryRegion(npages=16, addr=BASE).pack()
    assert device.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, A, region) == device.ioctl(
        fh, abi.KSM_REMOVE_MEMORY_REGION, A, b""
    )
    assert not isinstance(device.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, A, region), Advise)
    assert device.engine.slots[0].host_advice == ""


# -- the control files -------------------------------------------------------------------


def test_the_control_files_show_the_host_beside_the_emulation(up: CuseSession, host: Host) -> None:
    fh = hand_out(up, A + 1)[1]
    finish(up, register(up, fh, BASE, 16))
    failed = register(up, fh, BASE + 64 * PAGE, 8)
    assert isinstance(failed, Borrow)
    up.complete_ioctl(failed)
    up.borrowed(failed, (-errno.ENOMEM,))
    host.mergeable[(A, BASE + 64 * PAGE, 8)] = (3, 3)
    tree = ControlTree(up.device.engine, up.device.host)
    names = [name for name, _ in tree.entries(1)]
    host_files = ["host_pages_shared", "host_pages_sharing", "host_ksm_merging_pages", "cross_check"]
    assert names[-5:] == [*host_files, "processes"]
    read = lambda path: tree.read(tree.path(path) or 0)  # noqa: E731
    assert read("cross_check") == b"0\n"  # the emulated scanner is paused by default in kernel mode
    assert ControlTree(up.device.engine, up.device.host, cross_check=True).read(tree.path("cross_check") or 0) == b"1\n"
    assert read("host_pages_shared") == b"3\n"
    assert read("host_pages_sharing") == b"5000\n"
    assert read("host_ksm_merging_pages") == b"4096\n"  # the registered processes' only
    assert [name for name, _ in tree.entries(tree.path(f"processes/{A}") or 0)] == [
        "ksm_merging_pages",
        "regions",
        "ksm_stat",
        "pages",
        "page_runs",
        "host_ksm_merging_pages",
    ]
    assert read(f"processes/{A}/host_ksm_merging_pages") == b"4096\n"
    assert read(f"processes/{A}/regions").decode().splitlines() == [
        "sma addr npages merged mapped madvise mergeable",
        f"1 {BASE:#x} 16 0 16 ok 16",
        f"1 {BASE + 64 * PAGE:#x} 8 0 8 ENOMEM 3",
    ]


def test_the_hosts_profit_files_appear_where_the_host_kernel_has_them(up: CuseSession, host: Host) -> None:
    finish(up, register(up, hand_out(up, A + 1)[1], BASE, 16))
    # A 6.1 kernel: no general_profit, and the test's host has no ksm_stat either.
    tree = ControlTree(up.device.engine, up.device.host)
    assert tree.path("host_general_profit") is None
    assert tree.path(f"processes/{A}/host_ksm_stat") is None
    # A 6.18 kernel: both, read from the host at every read, its text passed on as it is.
    host.general_profit = -1048576
    stat = "ksm_rmap_items 16\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit -1024\n"
    host.ksm_stat[A] = host.ksm_stat[os.getpid()] = stat
    tree = ControlTree(up.device.engine, up.device.host)
    read = lambda path: tree.read(tree.path(path) or 0)  # noqa: E731
    assert read("host_general_profit") == b"-1048576\n"
    host.general_profit = 4096
    assert read("host_general_profit") == b"4096\n"
    assert read(f"processes/{A}/host_ksm_stat") == stat.encode()
    assert [name for name, _ in tree.entries(tree.path(f"processes/{A}") or 0)][-2:] == [
        "host_ksm_merging_pages",
        "host_ksm_stat",
    ]


def test_emulate_mode_has_no_host_files(up: CuseSession) -> None:
    finish(up, register(up, hand_out(up, A + 1)[1], BASE, 16))
    tree = ControlTree(up.device.engine)
    assert not any(name.startswith("host_") or name == "cross_check" for name, _ in tree.entries(1))
    assert tree.path("host_pages_sharing") is None
    assert tree.path(f"processes/{A}/host_ksm_merging_pages") is None
    assert tree.read(tree.path(f"processes/{A}/regions") or 0).splitlines()[0] == b"sma addr npages merged mapped"


# -- the knobs -------------------------------------------------------------------------------


def test_the_scanners_settings_follow_on_the_host(tmp_path) -> None:
    """START_STOP_KTHREAD's values reach the host's ksmd, sleep rounded up to whole ms; restore puts it back."""
    for name, value in {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20}.items():
        (tmp_path / name).write_text(f"{value}\n")
    engine = Engine()
    host_ksm = HostKsm(str(tmp_path))
    undo = cli.follow_on_host(engine, host_ksm)
    engine.set_kthread(sleep=1500, pages_to_scan=5000, flags=abi.KSM_CONTROL_FLAGS_RUN)
    assert host_ksm.settings() == {"run": 1, "pages_to_scan": 5000, "sleep_millisecs": 2}
    engine.set_kthread(sleep=0, pages_to_scan=0, flags=0)  # a 2009 STOP: zeros but for the flag
    assert host_ksm.settings() == {"run": 0, "pages_to_scan": 5000, "sleep_millisecs": 2}  # only run changes
    undo()
    engine.set_kthread(sleep=0, pages_to_scan=1, flags=abi.KSM_CONTROL_FLAGS_RUN)
    assert host_ksm.read("run") == 0  # no longer followed
    assert host_ksm.restore() == {"sleep_millisecs": 20, "pages_to_scan": 100, "run": 0}
    assert host_ksm.settings() == {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20}


def test_a_setting_the_host_refuses_is_logged_and_the_ioctl_is_unaffected(tmp_path, caplog) -> None:
    for name, value in {"run": 0, "pages_to_scan": 100}.items():  # no sleep_millisecs: writing it fails
        (tmp_path / name).write_text(f"{value}\n")
    (tmp_path / "sleep_millisecs").mkdir()
    engine = Engine()
    cli.follow_on_host(engine, HostKsm(str(tmp_path)))
    engine.set_kthread(sleep=1000, pages_to_scan=10, flags=abi.KSM_CONTROL_FLAGS_RUN)
    assert engine.kthread.pages_to_scan == 10
    assert any(m.startswith("could not pass the new scanner settings to the host kernel") for m in caplog.messages)
