"""The ioctl table of the 2009 driver, quirks included, at the device layer."""

import errno
import subprocess

import pytest

from cuse_ksm import abi
from cuse_ksm.device import Done, Fetch, HandOut, KsmDevice, SmaFile
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory
from tests.engine.fakes import FakeSpace


class Spaces:
    """open_space stand-in: records what was opened; can be told to fail."""

    def __init__(self):
        self.opened: list[FakeSpace] = []
        self.fail: BaseException | None = None
        self.mappings: list[tuple[int, int]] | None = None  # the callers' mappings (None: all mapped)

    def __call__(self, tid):
        if self.fail:
            raise self.fail
        space = FakeSpace(tid)
        space.mappings = self.mappings
        self.opened.append(space)
        return space


@pytest.fixture
def spaces():
    return Spaces()


@pytest.fixture
def dev(spaces):
    return KsmDevice(Engine(), spaces)


def device_fh(dev):
    return dev.open().fh


def new_sma_fh(dev, tid=100):
    """Create an SMA the way the session does: HandOut, then the injected open, bound to it."""
    fh = device_fh(dev)
    out = dev.ioctl(fh, abi.KSM_CREATE_SHARED_MEMORY_AREA, tid, b"")
    assert isinstance(out, HandOut)
    file = dev.open(handed=out.target)
    assert isinstance(file, SmaFile) and file.sma is out.target
    return file.fh, out.target


def region(npages, addr, pad=0, reserved=0):
    return abi.MemoryRegion(npages=npages, addr=addr, pad=pad, reserved_bits=reserved).pack()


def test_api_version_is_1(dev):
    assert dev.ioctl(device_fh(dev), abi.KSM_GET_API_VERSION, 1, b"") == Done(1)


def test_initial_kthread_info_is_idle(dev):
    out = dev.ioctl(device_fh(dev), abi.KSM_GET_INFO_KTHREAD, 1, b"", abi.STRUCT_SIZE)
    assert out.result == 0
    assert abi.KthreadInfo.unpack(out.out) == abi.KthreadInfo(0, 0, 0)


def test_start_then_get_info_round_trip(dev):
    fh = device_fh(dev)
    info = abi.KthreadInfo(sleep=5000, pages_to_scan=256, flags=1, pad=0xFFFF, reserved_bits=99)
    assert dev.ioctl(fh, abi.KSM_START_STOP_KTHREAD, 1, info.pack()) == Done(0)
    got = abi.KthreadInfo.unpack(dev.ioctl(fh, abi.KSM_GET_INFO_KTHREAD, 1, b"", abi.STRUCT_SIZE).out)
    # pad and reserved_bits are not stored: the driver copies out only three fields.
    assert got == abi.KthreadInfo(sleep=5000, pages_to_scan=256, flags=1)


def test_quirk_start_with_run_flag_and_zero_pages_returns_positive_1_and_changes_nothing(dev):
    fh = device_fh(dev)
    dev.ioctl(fh, abi.KSM_START_STOP_KTHREAD, 1, abi.KthreadInfo(10, 20, 0).pack())
    out = dev.ioctl(fh, abi.KSM_START_STOP_KTHREAD, 1, abi.KthreadInfo(99, 0, 1).pack())
    assert out == Done(1)  # EPERM without the minus: ioctl() returns 1, errno untouched
    assert dev.engine.kthread == abi.KthreadInfo(10, 20, 0)


def test_stop_with_zero_pages_is_accepted(dev):
    fh = device_fh(dev)
    assert dev.ioctl(fh, abi.KSM_START_STOP_KTHREAD, 1, abi.KthreadInfo(7, 0, 0).pack()) == Done(0)
    assert dev.engine.kthread == abi.KthreadInfo(7, 0, 0)


@pytest.mark.parametrize("cmd", [0xAB05, 0xAB04, 0x4018AB20, 0xAB21, 0, 0xFFFFFFFF])
def test_unknown_device_command_is_minus_einval(dev, cmd):
    assert dev.ioctl(device_fh(dev), cmd, 1, b"") == Done(-errno.EINVAL)


@pytest.mark.parametrize("cmd", [abi.KSM_GET_API_VERSION, abi.KSM_CREATE_SHARED_MEMORY_AREA, 0x4018AB02, 0xAB22, 7])
def test_quirk_unknown_sma_command_is_positive_22(dev, cmd):
    fh, _ = new_sma_fh(dev)
    assert dev.ioctl(fh, cmd, 100, b"") == Done(22)


def test_register_records_caller_addr_npages_without_validation(dev, spaces):
    fh, sma = new_sma_fh(dev)
    # Unaligned, npages 0 and 2^32-1, garbage pad/reserved (qemu left them uninitialised).
    for n, addr in [(0, 0x1003), (2**32 - 1, 0xFFFF_8000_0000_0000), (4, 0x7F12_3456_7000)]:
        assert dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, 4242, region(n, addr, 0xCCCCCCCC, 2**64 - 1)) == Done(0)
    expected = [(0x1003, 0), (0xFFFF_8000_0000_0000, 2**32 - 1), (0x7F12_3456_7000, 4)]
    assert [(s.addr, s.npages) for s in sma.slots] == expected
    assert [s.space.tgid for s in sma.slots] == [4242, 4242, 4242]
    assert dev.engine.slots == sma.slots


def test_register_of_a_range_mostly_unmapped_returns_0_with_a_note(dev, spaces):
    fh, sma = new_sma_fh(dev)
    page = abi.PAGE_SIZE
    spaces.mappings = [(0x7F00_0000_0000, 0x7F00_0000_0000 + 2 * page)]

    def register(npages, addr):
        return dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, 4242, region(npages, addr))

    assert register(2**32 - 1, 0x1000_0000_0000) == Done(
        0,
        note="the region at 0x100000000000 of 4294967295 pages is mostly unmapped: 0 of its pages are mapped "
        "(REGISTER returns 0 as the 2009 driver did; the scanner passes over the rest)",
    )
    assert register(4, 0x7F00_0000_0000) == Done(0)  # half mapped: not "mostly unmapped"
    assert "mostly unmapped: 2 of its pages" in register(5, 0x7F00_0000_0000).note
    assert register(0, 0x1000) == Done(0)  # nothing registered, nothing to say
    spaces.mappings = None  # all mapped, up to the top of the address space
    assert register(64, 0x7F00_0000_0000) == Done(0)
    wraps = register(32, 2**64 - 16 * page).note
    assert "of 32 pages wraps the address space: 16 of its pages are mapped" in wraps
    assert len(sma.slots) == 6  # all registered, as the 2009 driver did


def test_register_uses_the_calling_thread_not_the_creator(dev, spaces):
    fh, sma = new_sma_fh(dev, tid=100)
    dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, 555, region(1, 0x1000))  # e.g. a forked child
    assert sma.slots[0].space.tgid == 555


def test_register_when_caller_has_no_memory_is_minus_eperm(dev, spaces):
    fh, sma = new_sma_fh(dev)
    spaces.fail = ProcessLookupError("gone")
    assert dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, 1, region(1, 0x1000)) == Done(-errno.EPERM)
    spaces.fail = MemoryError()
    assert dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, 1, region(1, 0x1000)) == Done(-errno.ENOMEM)
    assert sma.slots == []


def test_register_from_a_process_that_is_gone_is_minus_eperm():
    """The same through the real memory reader: nothing answers to the pid any more."""
    dev = KsmDevice(Engine(), ProcessMemory.open)
    fh, sma = new_sma_fh(dev)
    dead = subprocess.Popen(["true"])
    dead.wait()  # exited and reaped
    assert dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, dead.pid, region(1, 0x1000)) == Done(-errno.EPERM)
    assert sma.slots == []


def test_remove_drops_every_region_of_that_sma_only(dev, spaces):
    fh_a, sma_a = new_sma_fh(dev, tid=1)
    fh_b, sma_b = new_sma_fh(dev, tid=2)
    for i in range(3):
        dev.ioctl(fh_a, abi.KSM_REGISTER_MEMORY_REGION, 1, region(1, 0x1000 * (i + 1)))
    dev.ioctl(fh_b, abi.KSM_REGISTER_MEMORY_REGION, 2, region(1, 0x9000))
    assert dev.ioctl(fh_a, abi.KSM_REMOVE_MEMORY_REGION, 1, b"") == Done(0)
    assert sma_a.slots == [] and len(sma_b.slots) == 1
    assert dev.engine.slots == sma_b.slots
    assert sum(s.closes for s in spaces.opened) == 3  # the removed regions' handles are closed
    # REMOVE on an empty SMA is fine, and the SMA stays usable.
    assert dev.ioctl(fh_a, abi.KSM_REMOVE_MEMORY_REGION, 1, b"") == Done(0)
    assert dev.ioctl(fh_a, abi.KSM_REGISTER_MEMORY_REGION, 1, region(1, 0x1000)) == Done(0)


def test_release_of_sma_file_acts_as_remove(dev, spaces):
    fh, sma = new_sma_fh(dev)
    dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, 1, region(8, 0x1000))
    dev.release(fh)
    assert dev.engine.slots == [] and sma.id not in dev.engine.smas
    assert spaces.opened[0].closed


def test_release_of_device_file_keeps_smas(dev):
    dev_fh = device_fh(dev)
    fh, _sma = new_sma_fh(dev, tid=3)
    dev.release(dev_fh)
    assert dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, 3, region(1, 0x1000)) == Done(0)


def test_failed_hand_out_forgets_the_sma(dev):
    out = dev.ioctl(device_fh(dev), abi.KSM_CREATE_SHARED_MEMORY_AREA, 9, b"")
    assert out.target.id in dev.engine.smas
    dev.hand_out_failed(out.target)
    assert out.target.id not in dev.engine.smas


def test_open_that_arrived_before_the_hand_out_failed_gives_ebadf(dev):
    out = dev.ioctl(device_fh(dev), abi.KSM_CREATE_SHARED_MEMORY_AREA, 9, b"")
    sma_fh = dev.open(handed=out.target).fh
    dev.hand_out_failed(out.target)
    assert dev.ioctl(sma_fh, abi.KSM_REGISTER_MEMORY_REGION, 9, region(1, 0x1000)) == Done(-errno.EBADF)
    dev.release(sma_fh)  # the kernel's later RELEASE is harmless


def test_32bit_callers_get_enotty(dev):
    assert dev.ioctl(device_fh(dev), abi.KSM_GET_API_VERSION, 1, b"", compat=True) == Done(-errno.ENOTTY)


def test_unknown_file_handle_is_ebadf(dev):
    assert dev.ioctl(12345, abi.KSM_GET_API_VERSION, 1, b"") == Done(-errno.EBADF)


def test_commands_that_touch_the_callers_memory_fetch_it_first(dev):
    fh = device_fh(dev)
    sma_fh, sma = new_sma_fh(dev)
    assert dev.ioctl(fh, abi.KSM_START_STOP_KTHREAD, 1, b"") == Fetch(copy_in=24)
    assert dev.ioctl(fh, abi.KSM_GET_INFO_KTHREAD, 1, b"") == Fetch(copy_out=24)  # _IOW, yet copied out
    assert dev.ioctl(sma_fh, abi.KSM_REGISTER_MEMORY_REGION, 1, b"\0" * 23) == Fetch(copy_in=24)
    # Unknown on that kind of file: nothing to fetch, the unknown-command answer at once.
    assert dev.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, 1, b"") == Done(-errno.EINVAL)
    assert dev.ioctl(sma_fh, abi.KSM_START_STOP_KTHREAD, 1, b"") == Done(22)
    # Nothing is carried out before the bytes are there.
    assert dev.engine.kthread == abi.KthreadInfo(0, 0, 0)
    assert not sma.slots


def test_32bit_callers_get_enotty_before_any_fetch(dev):
    assert dev.ioctl(device_fh(dev), abi.KSM_GET_INFO_KTHREAD, 1, b"", compat=True) == Done(-errno.ENOTTY)
