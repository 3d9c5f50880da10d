"""The January 2009 kvm-tree ABI on the same device as the March one: device layer, session, --trace.

What that driver did (read in ../shared/reference/kvm-2009-01/ksm_main.c):
12-byte ksm_kthread_info and 16-byte ksm_memory_region; START_STOP with the
run flag and no pages returns +1 (EPERM without its minus) as in March; a
scan fd whose every ioctl returns +22 because KSM_SCAN is commented out.
"""

from __future__ import annotations

import errno
import logging
import os
import re

import pytest

from cuse_ksm import abi
from cuse_ksm import protocol as p
from cuse_ksm.device import Done, Fetch, HandOut, KsmDevice, Scan, ScanFile, SmaFile
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory
from cuse_ksm.host.syscall import NR_OPENAT
from cuse_ksm.session import HAND_OUT_SCAN, Borrow, CuseSession
from tests.engine.fakes import FakeSpace, full_scans, page
from tests.test_trace import TIME, Caller, trace_lines

JAN_INFO = abi.KthreadInfo2009Jan
JAN_REGION = abi.MemoryRegion2009Jan

# Every command that exists in either ABI, and some that exist in neither.
EVERY_COMMAND = [*abi.CALLS, 0, 0xAB05, 0x4018AB40, 0xFFFFFFFF]


@pytest.fixture
def spaces() -> dict[int, FakeSpace]:
    return {}


@pytest.fixture
def dev(spaces: dict[int, FakeSpace]) -> KsmDevice:
    def open_space(tid: int) -> FakeSpace:
        return spaces.setdefault(tid, FakeSpace(tid))

    return KsmDevice(Engine(), open_space)


def call(dev: KsmDevice, fh: int, cmd: int, data: bytes = b"", tid: int = 1) -> Done | HandOut:
    """One ioctl as the session makes it: a first call, then the retry with the bytes the device asked for."""
    out = dev.ioctl(fh, cmd, tid, b"", 0)
    if isinstance(out, Fetch):
        out = dev.ioctl(fh, cmd, tid, data[: out.copy_in], out.copy_out)
    assert isinstance(out, Done | HandOut), out
    return out


def handed(dev: KsmDevice, cmd: int) -> int:
    """CREATE_SHARED_MEMORY_AREA or KSM_CREATE_SCAN, then the injected open bound to what it made: its fh."""
    out = call(dev, dev.open().fh, cmd)
    assert isinstance(out, HandOut)
    return dev.open(handed=out.target).fh


# -- the device fd ----------------------------------------------------------------------


def test_january_kthread_calls_copy_twelve_bytes(dev: KsmDevice) -> None:
    fh = dev.open().fh
    assert dev.ioctl(fh, abi.KSM_START_STOP_KTHREAD_2009_01, 1, b"") == Fetch(copy_in=12)
    assert dev.ioctl(fh, abi.KSM_GET_INFO_KTHREAD_2009_01, 1, b"") == Fetch(copy_out=12)
    assert dev.ioctl(fh, abi.KSM_GET_INFO_KTHREAD_2009_01, 1, b"", 12) == Done(0, bytes(12))  # idle at start


def test_one_scanner_whichever_abi_sets_or_reads_it(dev: KsmDevice) -> None:
    fh = dev.open().fh
    assert call(dev, fh, abi.KSM_START_STOP_KTHREAD_2009_01, JAN_INFO(5000, 256, 1).pack()) == Done(0)
    march = call(dev, fh, abi.KSM_GET_INFO_KTHREAD)
    assert march == Done(0, abi.KthreadInfo(5000, 256, 1).pack())
    assert call(dev, fh, abi.KSM_START_STOP_KTHREAD, abi.KthreadInfo(7, 9, 0, pad=3, reserved_bits=4).pack()) == Done(0)
    january = call(dev, fh, abi.KSM_GET_INFO_KTHREAD_2009_01)
    assert january == Done(0, JAN_INFO(7, 9, 0).pack())
    assert dev.engine.kthread == abi.KthreadInfo(7, 9, 0)


def test_january_start_without_pages_is_the_same_positive_1(dev: KsmDevice) -> None:
    fh = dev.open().fh
    call(dev, fh, abi.KSM_START_STOP_KTHREAD_2009_01, JAN_INFO(10, 20, 0).pack())
    assert call(dev, fh, abi.KSM_START_STOP_KTHREAD_2009_01, JAN_INFO(99, 0, 1).pack()) == Done(1)
    assert dev.engine.kthread == abi.KthreadInfo(10, 20, 0)
    # A stop stores every field it carries, other flag bits too, as the driver's ksmd_flags = info->flags did.
    assert call(dev, fh, abi.KSM_START_STOP_KTHREAD_2009_01, JAN_INFO(0, 0, 0xF0).pack()) == Done(0)
    assert call(dev, fh, abi.KSM_GET_INFO_KTHREAD_2009_01) == Done(0, JAN_INFO(0, 0, 0xF0).pack())


def test_create_scan_hands_out_a_scan_fd_each_its_own(dev: KsmDevice) -> None:
    fh = dev.open().fh
    first, second = call(dev, fh, abi.KSM_CREATE_SCAN), call(dev, fh, abi.KSM_CREATE_SCAN)
    assert first == HandOut(Scan(1)) and second == HandOut(Scan(2))
    assert isinstance(dev.open(handed=Scan(1)), ScanFile)
    assert dev.engine.smas == {}  # a scan is no SMA


@pytest.mark.parametrize("cmd", EVERY_COMMAND, ids=hex)
def test_every_command_on_a_scan_fd_is_positive_22_and_reads_nothing(dev: KsmDevice, cmd: int) -> None:
    fh = handed(dev, abi.KSM_CREATE_SCAN)
    # No Fetch first: the driver never looked at the pointer, so a bad one gives 22, not EFAULT.
    assert dev.ioctl(fh, cmd, 1, b"", 0) == Done(22)
    assert dev.engine.kthread == abi.KthreadInfo() and dev.engine.slots == []
    dev.release(fh)
    assert fh not in dev.files


def test_january_register_reads_sixteen_bytes_and_validates_nothing(
    dev: KsmDevice, spaces: dict[int, FakeSpace]
) -> None:
    fh = handed(dev, abi.KSM_CREATE_SHARED_MEMORY_AREA)
    assert dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION_2009_01, 1, b"") == Fetch(copy_in=16)
    for npages, addr in [(0, 0x1003), (2**32 - 1, 0xFFFF_8000_0000_0000), (4, 0x7F12_3456_7000)]:
        region = JAN_REGION(npages=npages, addr=addr, pad=0xCCCCCCCC).pack()
        assert call(dev, fh, abi.KSM_REGISTER_MEMORY_REGION_2009_01, region, tid=42) == Done(0)
    file = dev.files[fh]
    assert isinstance(file, SmaFile)
    assert [(s.addr, s.npages, s.space.tgid) for s in file.sma.slots] == [
        (0x1003, 0, 42),
        (0xFFFF_8000_0000_0000, 2**32 - 1, 42),
        (0x7F12_3456_7000, 4, 42),
    ]
    # REMOVE is the same call in both ABIs: every region of the SMA goes.
    assert call(dev, fh, abi.KSM_REMOVE_MEMORY_REGION) == Done(0)
    assert dev.engine.slots == []


def test_both_registers_on_one_sma_and_the_others_files_refuse_them(dev: KsmDevice) -> None:
    sma_fh = handed(dev, abi.KSM_CREATE_SHARED_MEMORY_AREA)
    assert call(dev, sma_fh, abi.KSM_REGISTER_MEMORY_REGION, abi.MemoryRegion(1, 0x1000).pack()) == Done(0)
    assert call(dev, sma_fh, abi.KSM_REGISTER_MEMORY_REGION_2009_01, JAN_REGION(2, 0x9000).pack()) == Done(0)
    assert [(s.addr, s.npages) for s in dev.engine.slots] == [(0x1000, 1), (0x9000, 2)]
    # January's device calls on an SMA fd: its unknown command, +22, in both drivers.
    for cmd in (abi.KSM_CREATE_SCAN, abi.KSM_START_STOP_KTHREAD_2009_01, abi.KSM_GET_INFO_KTHREAD_2009_01):
        assert dev.ioctl(sma_fh, cmd, 1, b"") == Done(22)
    # An SMA call on the device fd: -EINVAL, in both.
    device_fh = dev.open().fh
    assert dev.ioctl(device_fh, abi.KSM_REGISTER_MEMORY_REGION_2009_01, 1, b"") == Done(-errno.EINVAL)
    assert dev.ioctl(device_fh, abi.KSM_SCAN, 1, b"") == Done(-errno.EINVAL)


@pytest.mark.parametrize("cmd", [c for c, call in abi.CALLS.items() if abi.JANUARY in call.abis], ids=hex)
def test_32bit_callers_get_enotty_for_january_calls_too(dev: KsmDevice, cmd: int) -> None:
    for fh in (dev.open().fh, handed(dev, abi.KSM_CREATE_SHARED_MEMORY_AREA), handed(dev, abi.KSM_CREATE_SCAN)):
        assert dev.ioctl(fh, cmd, 1, b"", 0, compat=True) == Done(-errno.ENOTTY)


def test_two_abis_share_one_scanner_and_one_set_of_counters(dev: KsmDevice, spaces: dict[int, FakeSpace]) -> None:
    """A March program and a January program register identical pages: they merge with each other."""
    fh = dev.open().fh
    march_sma, january_sma = (
        handed(dev, abi.KSM_CREATE_SHARED_MEMORY_AREA),
        handed(dev, abi.KSM_CREATE_SHARED_MEMORY_AREA),
    )
    call(dev, march_sma, abi.KSM_REGISTER_MEMORY_REGION, abi.MemoryRegion(8, 0x10000).pack(), tid=100)
    call(dev, january_sma, abi.KSM_REGISTER_MEMORY_REGION_2009_01, JAN_REGION(8, 0x80000).pack(), tid=200)
    spaces[100].map(0x10000, [page(7)] * 8)
    spaces[200].map(0x80000, [page(7)] * 4 + [page(9)] * 4)
    # Started through one ABI, read back through the other.
    assert call(dev, fh, abi.KSM_START_STOP_KTHREAD_2009_01, JAN_INFO(100, 64, 1).pack()) == Done(0)
    assert abi.KthreadInfo.unpack(call(dev, fh, abi.KSM_GET_INFO_KTHREAD).out).running  # type: ignore[union-attr]
    full_scans(dev.engine, 2)
    c = dev.engine.counters()
    # page(7): 12 sites, one shared page; page(9): 4 sites, another.
    assert (c.pages_shared, c.pages_sharing) == (2, 12 + 4 - 2)
    assert [s.pages_merged for s in dev.engine.slots] == [8, 8]


# -- the session: the scan fd's hand-out -------------------------------------------------


@pytest.fixture
def traced(caplog: pytest.LogCaptureFixture) -> CuseSession:
    caplog.set_level(logging.DEBUG)
    device = KsmDevice(Engine(), ProcessMemory.open)
    session = CuseSession(device, devname="ksmtest", dev_dir="/nonexistent", trace=True)
    session.receive(p.CuseInit(1, 0, 7, 31, 0))
    return session


def test_create_scan_borrows_its_caller_to_open_the_device(traced: CuseSession) -> None:
    c = Caller(traced, 77)
    out = c.ioctl(c.open(), abi.KSM_CREATE_SCAN, arg=0)
    assert isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], Borrow)
    borrow = out[0]
    (opening,) = borrow.errand.calls
    assert (opening.name, opening.nr, opening.purpose) == ("openat", NR_OPENAT, HAND_OUT_SCAN)
    assert opening.stack == b"/nonexistent/ksmtest\0"
    traced.complete_ioctl(borrow)
    fh = c.open()  # the thread's injected open
    traced.borrowed(borrow, (11,))
    assert isinstance(traced.device.files[fh], ScanFile)
    assert traced.device.engine.smas == {}


def test_a_failed_scan_hand_out_touches_no_sma(traced: CuseSession) -> None:
    c = Caller(traced, 77)
    sma_borrow = c.create(c.open())
    traced.complete_ioctl(sma_borrow)
    c.open()
    traced.borrowed(sma_borrow, (5,))
    out = c.ioctl(c.open(), abi.KSM_CREATE_SCAN, arg=0)
    assert isinstance(out, tuple) and isinstance(out[0], Borrow)
    reply = traced.borrow_failed(out[0], errno.EPERM, "not allowed")
    assert reply == p.reply_ioctl(out[0].request.unique, -errno.EPERM)
    assert list(traced.device.engine.smas) == [1]  # the SMA handed out before is still there


def test_trace_names_each_call_with_its_abi(traced: CuseSession, caplog: pytest.LogCaptureFixture) -> None:
    pid = os.getpid()  # REGISTER records the caller's memory: this process stands in for it
    c = Caller(traced, pid)
    fh = c.open()
    c.ioctl(fh, abi.KSM_START_STOP_KTHREAD_2009_01, data=JAN_INFO(200, 64, 1).pack())
    c.ioctl(fh, abi.KSM_GET_INFO_KTHREAD_2009_01)
    sma_borrow = c.create(fh)
    traced.complete_ioctl(sma_borrow)
    sma_fh = c.open()
    traced.borrowed(sma_borrow, (9,))
    buf = bytearray(2 * abi.PAGE_SIZE)
    c.ioctl(sma_fh, abi.KSM_REGISTER_MEMORY_REGION_2009_01, data=JAN_REGION(npages=2, addr=id(buf), pad=7).pack())
    out = c.ioctl(fh, abi.KSM_CREATE_SCAN, arg=0)
    assert isinstance(out, tuple) and isinstance(out[0], Borrow)
    traced.complete_ioctl(out[0])
    scan_fh = c.open()
    traced.borrowed(out[0], (10,))
    c.ioctl(scan_fh, abi.KSM_SCAN, data=abi.UserScan(100, 1).pack())
    lines = trace_lines(caplog)
    dev = "/nonexistent/ksmtest"
    sma = f"sma#{sma_borrow.outcome.target.id}"  # type: ignore[union-attr]
    expected = [
        rf"trace: pid {pid} {dev} KSM_START_STOP_KTHREAD\[2009-01\] \{{sleep=200, pages_to_scan=64, flags=0x1\}} = 0",
        rf"trace: pid {pid} {dev} KSM_GET_INFO_KTHREAD\[2009-01\] \{{sleep=200, pages_to_scan=64, flags=0x1\}} = 0",
        rf"trace: pid {pid} {dev} KSM_CREATE_SHARED_MEMORY_AREA 0 = 9 \({sma}\)",
        rf"trace: pid {pid} {sma} KSM_REGISTER_MEMORY_REGION\[2009-01\] \{{npages=2, pad=0x7, addr={id(buf):#x}\}} = 0",
        rf"trace: pid {pid} {dev} KSM_CREATE_SCAN\[2009-01\] 0 = 10 \(scan#1\)",
        # the struct was never copied in: the raw pointer, and the +22 the caller gets
        rf"trace: pid {pid} scan#1 KSM_SCAN\[2009-01\] 0x7fff0000 = 22",
    ]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern + TIME, line), line
    assert any(f"scan#1 handed to tid {pid} as fd 10" in m for m in caplog.messages)
