"""Random ioctls with real bad pointers on the real /dev/ksm, in the VM.

Hypothesis drives random sequences of ioctls on device and SMA fds - random
command numbers, the six real ones on the wrong kind of fd, and pointers
that are NULL, unmapped, read-only, PROT_NONE, kernel, non-canonical, or
straddle the end of a mapping - and REGISTERs with hostile npages and
addresses.  Each result is compared with a model of the 2009 driver: the
2009 driver's result for known commands (quirks included: +1 for START with
the run flag and no pages, which changes nothing), EFAULT when the kernel
cannot copy the struct in or out, EINVAL (device) or +22 (SMA) for anything
else; CREATE must return exactly the fd an open() would have got, an open
of the device that answers as an SMA.
After every example the daemon is alive, answers, traces nobody, and once
the fds are closed its fds and threads are back to baseline and it shows no
region of ours.  The budget is bounded (max_examples) to keep the VM run short.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from typing import Any

import pyksm
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import DEVICE, daemon_snapshot, settle_to

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.ioctl.restype = ctypes.c_int
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PAGE = 4096
STATS = "/run/cuse-ksm/ksm"

KNOWN = [
    pyksm.KSM_GET_API_VERSION,
    pyksm.KSM_CREATE_SHARED_MEMORY_AREA,
    pyksm.KSM_START_STOP_KTHREAD,
    pyksm.KSM_GET_INFO_KTHREAD,
    pyksm.KSM_REGISTER_MEMORY_REGION,
    pyksm.KSM_REMOVE_MEMORY_REGION,
]
# The January 2009 ABI's own numbers (include/linux/ksm-2009-01.h), answered by the same device.
CREATE_SCAN, JAN_START_STOP, JAN_GET_INFO, JAN_REGISTER, SCAN = 0xAB02, 0x400CAB03, 0x400CAB04, 0x4010AB20, 0x4008AB40
KNOWN += [CREATE_SCAN, JAN_START_STOP, JAN_GET_INFO, JAN_REGISTER, SCAN]
# ioctl types the VFS answers itself for any file (do_vfs_ioctl: FIOCLEX,
# FIONBIO... 'T', FS_IOC_* 'f', FIFREEZE 'X', FICLONE 0x94, FIBMAP/FIGETBSZ
# type 0): those never reach the device, so the model does not apply.
VFS_TYPES = {0x54, 0x66, 0x58, 0x94, 0x00}


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


commands = st.one_of(
    st.sampled_from(KNOWN),
    st.builds(_ioc, st.integers(0, 3), st.just(0xAB), st.integers(0, 255), st.sampled_from([0, 8, 24, 4095])),
    st.integers(0, 2**32 - 1),
).filter(lambda c: c in KNOWN or (c >> 8) & 0xFF not in VFS_TYPES)


def _map(prot: int, npages: int = 1) -> int:
    addr = libc.mmap(None, npages * PAGE, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr and addr != ctypes.c_void_p(-1).value
    return int(addr)


class Memory:
    """Pointers of every kind, in this process."""

    def __init__(self) -> None:
        self.good = _map(mmap.PROT_READ | mmap.PROT_WRITE, 4)
        ctypes.memset(self.good, 0x5A, 4 * PAGE)
        self.readonly = _map(mmap.PROT_READ)
        self.protnone = _map(0)
        self.unmapped = _map(mmap.PROT_READ)
        libc.munmap(self.unmapped, PAGE)
        edge = _map(mmap.PROT_READ | mmap.PROT_WRITE, 2)
        libc.munmap(edge + PAGE, PAGE)
        self.straddle = edge + PAGE - 8  # 8 bytes readable, 16 beyond the mapping

    # (address, readable, writable)
    def pointer(self, kind: str) -> tuple[int, bool, bool]:
        return {
            "good": (self.good + 64, True, True),
            "readonly": (self.readonly, True, False),
            "protnone": (self.protnone, False, False),
            "unmapped": (self.unmapped, False, False),
            "straddle": (self.straddle, False, False),
            "null": (0, False, False),
            "kernel": (0xFFFF_8880_0000_0000, False, False),
            "noncanonical": (0x8000_0000_0000_0000, False, False),
            "minus1": (2**64 - 1, False, False),
        }[kind]


POINTERS = ["good", "good", "good", "readonly", "protnone", "unmapped", "straddle", "null", "kernel", "noncanonical"]
POINTERS += ["minus1"]
# Drawn values: a payload is ("region" | "kthread" | "noise", fields...), an
# operation ("create",) or ("ioctl", sma, cmd, pointer, payload).
Payload = tuple[Any, ...]
Op = tuple[Any, ...]

REGION_ADDRS = ["good", "unaligned", "null", "kernel", "unmapped", "top", "noncanonical"]


@st.composite
def payloads(draw: st.DrawFn) -> Payload:
    """The 24 bytes at a good pointer: a region or kthread info with hostile fields, or noise."""
    kind = draw(st.sampled_from(["region", "kthread", "noise"]))
    if kind == "region":
        npages = draw(st.sampled_from([0, 1, 4, 2**32 - 1, 2**31]) | st.integers(0, 2**32 - 1))
        return (kind, npages, draw(st.sampled_from(REGION_ADDRS)), draw(st.binary(min_size=12, max_size=12)))
    if kind == "kthread":
        sleep = draw(st.sampled_from([0, 1, 1000, 2**32 - 1]))
        pages = draw(st.sampled_from([0, 1, 16, 2**32 - 1]))
        flags = draw(st.sampled_from([0, 1, 2, 3, 2**32 - 1]))
        return (kind, sleep, pages, flags, draw(st.binary(min_size=12, max_size=12)))
    return (kind, draw(st.binary(min_size=24, max_size=24)))


@st.composite
def operations(draw: st.DrawFn) -> list[Op]:
    ops: list[Op] = [("create",)] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["ioctl", "ioctl", "ioctl", "ioctl", "create", "close", "open"]))
        if kind == "ioctl":
            fd, ptr = draw(st.integers(0, 5)), draw(st.sampled_from(POINTERS))
            ops.append((kind, fd, draw(commands), ptr, draw(payloads())))
        elif kind == "close":
            ops.append((kind, draw(st.integers(0, 5))))
        else:
            ops.append((kind,))
    return ops


def encode(payload: Payload, mem: Memory) -> bytes:
    if payload[0] == "region":
        _, npages, where, junk = payload
        addr = {
            "good": mem.good,
            "unaligned": mem.good + 100,
            "null": 0,
            "kernel": 0xFFFF_FFFF_8100_0000,
            "unmapped": mem.unmapped,
            "top": 0x7FFF_FFFF_F000,
            "noncanonical": 0xDEAD_0000_0000_0000,
        }[where]
        return bytes(npages.to_bytes(4, "little") + junk[:4] + addr.to_bytes(8, "little") + junk[4:])
    if payload[0] == "kthread":
        _, sleep, pages, flags, junk = payload
        return bytes(sleep.to_bytes(4, "little") + pages.to_bytes(4, "little") + flags.to_bytes(4, "little") + junk)
    return bytes(payload[1])


def get_info(fd: int) -> tuple[int, int, int]:
    info = pyksm.ksm_kthread_info()
    assert libc.ioctl(fd, pyksm.KSM_GET_INFO_KTHREAD, ctypes.addressof(info)) == 0
    return info.sleep, info.pages_to_scan, info.flags


def set_info(fd: int, sleep: int, pages: int, flags: int) -> int:
    info = pyksm.ksm_kthread_info(sleep=sleep, pages_to_scan=pages, flags=flags)
    return int(libc.ioctl(fd, pyksm.KSM_START_STOP_KTHREAD, ctypes.addressof(info)))


def lowest_free_fd() -> int:
    """The fd an open() would get now: the one the hand-out's injected openat must return."""
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return fd


def check_sma(fd: int) -> None:
    """``fd`` is an open of the device that answers as an SMA (+22 for a device-only command)."""
    assert os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(DEVICE)
    assert libc.ioctl(fd, pyksm.KSM_GET_API_VERSION, None) == 22


def check_scan(fd: int) -> None:
    """``fd`` is an open of the device that answers as a January scan fd (+22 to anything)."""
    assert os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(DEVICE)
    assert libc.ioctl(fd, pyksm.KSM_GET_API_VERSION, None) == 22
    assert libc.ioctl(fd, SCAN, None) == 22


def create(dev: int, ptr: int | None) -> int:
    """CREATE_SHARED_MEMORY_AREA: exactly the fd an open() would have got, bound to a new SMA."""
    lowest = lowest_free_fd()
    ctypes.set_errno(0)
    sma = libc.ioctl(dev, pyksm.KSM_CREATE_SHARED_MEMORY_AREA, ptr)
    assert sma == lowest, (sma, lowest, os.strerror(ctypes.get_errno()))
    check_sma(sma)
    return int(sma)


def run_example(ops: list[Op], mem: Memory) -> None:
    dev = os.open(DEVICE, os.O_RDWR)
    saved = get_info(dev)
    model = list(saved)
    fds: list[tuple[int, str]] = [(dev, "dev")]
    try:
        for op in ops:
            if op[0] == "open":
                fds.append((os.open(DEVICE, os.O_RDWR), "dev"))
            elif op[0] == "create":
                fds.append((create(dev, None), "sma"))
            elif op[0] == "close":
                if 0 < op[1] < len(fds):
                    os.close(fds.pop(op[1])[0])
            else:
                _, index, cmd, ptr_kind, payload = op
                fd, what = fds[index % len(fds)]
                ptr, readable, writable = mem.pointer(ptr_kind)
                data = encode(payload, mem)
                if ptr_kind == "good":
                    ctypes.memmove(ptr, data, 24)
                elif readable:
                    data = ctypes.string_at(ptr, 24)  # what is there (a read-only page of zeros)
                ctypes.set_errno(0)
                lowest = lowest_free_fd()
                got = libc.ioctl(fd, cmd, ptr)
                err = ctypes.get_errno() if got == -1 else 0
                outcome = (got, err)
                if what == "dev":
                    if cmd == pyksm.KSM_GET_API_VERSION:
                        want = (1, 0)
                    elif cmd == pyksm.KSM_CREATE_SHARED_MEMORY_AREA:
                        assert got == lowest, (ptr_kind, outcome, lowest)  # whatever the pointer: it is not read
                        check_sma(got)
                        fds.append((got, "sma"))
                        continue
                    elif cmd == CREATE_SCAN:
                        assert got == lowest, (ptr_kind, outcome, lowest)
                        check_scan(got)
                        fds.append((got, "scan"))
                        continue
                    elif cmd in (pyksm.KSM_START_STOP_KTHREAD, JAN_START_STOP):
                        if not readable:
                            want = (-1, errno.EFAULT)
                        else:
                            sleep, pages, flags = (int.from_bytes(data[i : i + 4], "little") for i in (0, 4, 8))
                            if flags & 1 and pages == 0:
                                want = (1, 0)  # the 2009 driver's positive EPERM: nothing changes
                            else:
                                want = (0, 0)
                                model[:] = [sleep, pages, flags]
                    elif cmd in (pyksm.KSM_GET_INFO_KTHREAD, JAN_GET_INFO):
                        want = (0, 0) if writable else (-1, errno.EFAULT)
                        if writable:
                            got_info = ctypes.string_at(ptr, 24)
                            # March copies out 24 bytes (pad and reserved_bits 0), January 12: the rest is untouched.
                            rest = bytes(12) if cmd == pyksm.KSM_GET_INFO_KTHREAD else data[12:24]
                            assert got_info == b"".join(v.to_bytes(4, "little") for v in model) + rest
                    else:
                        want = (-1, errno.EINVAL)
                elif what == "scan":
                    want = (22, 0)  # January's scan fd: every command, whatever the pointer (KSM_SCAN included)
                else:
                    if cmd in (pyksm.KSM_REGISTER_MEMORY_REGION, JAN_REGISTER):
                        want = (0, 0) if readable else (-1, errno.EFAULT)
                    elif cmd == pyksm.KSM_REMOVE_MEMORY_REGION:
                        want = (0, 0)
                    else:
                        want = (22, 0)  # the 2009 driver's positive EINVAL on an SMA
                assert outcome == want, (what, hex(cmd), ptr_kind, payload, outcome, want)
        assert get_info(dev) == tuple(model)
    finally:
        # Stop a scanner the example may have started on huge bogus regions.
        set_info(dev, *saved)
        for fd, _ in reversed(fds):
            os.close(fd)


@pytest.fixture(scope="module")
def memory() -> Memory:
    return Memory()


BUDGET = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@BUDGET
@given(ops=operations())
def test_random_ioctls_with_bad_pointers(ops, memory, daemon_pid):
    run_example(ops, memory)
    assert os.path.exists(f"/proc/{daemon_pid}")


def test_the_daemon_is_back_to_baseline_after_the_fuzzing(daemon_pid, memory):
    """Run a fixed batch of the worst cases, then: same fds and threads, no region of ours, nobody traced."""
    before = daemon_snapshot(daemon_pid)
    for ptr in POINTERS:
        for cmd in KNOWN:
            ops: list[Op] = [("create",), ("ioctl", 1, cmd, ptr, ("region", 2**32 - 1, "kernel", bytes(12)))]
            ops.append(("ioctl", 0, cmd, ptr, ("kthread", 0, 1, 1, bytes(12))))
            run_example(ops, memory)
    settle_to(daemon_pid, before)
    deadline = time.monotonic() + 10
    while os.path.exists(f"{STATS}/processes/{os.getpid()}") and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.isdir(STATS):
        assert not os.path.exists(f"{STATS}/processes/{os.getpid()}")
