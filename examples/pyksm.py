"""Drive /dev/ksm from Python with ctypes, as a C program would.

Importable (``from pyksm import Ksm``) or run as a short demo:

    python3 examples/pyksm.py [/dev/ksm]

It calls libc's ``ioctl`` through ctypes rather than ``fcntl.ioctl`` because
the 2009 driver returns *positive* values where errors were meant (the
quirks), and ``fcntl.ioctl`` hides the return value when it copies a buffer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Self

KSMIO = 0xAB


def _io(nr: int) -> int:
    return (KSMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (KSMIO << 8) | nr


class ksm_memory_region(ctypes.Structure):  # the C name
    _fields_ = [
        ("npages", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("addr", ctypes.c_uint64),
        ("reserved_bits", ctypes.c_uint64),
    ]


class ksm_kthread_info(ctypes.Structure):  # the C name
    _fields_ = [
        ("sleep", ctypes.c_uint32),
        ("pages_to_scan", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("reserved_bits", ctypes.c_uint64),
    ]


KSM_API_VERSION = 1
KSM_CONTROL_FLAGS_RUN = 1
KSM_GET_API_VERSION = _io(0x00)
KSM_CREATE_SHARED_MEMORY_AREA = _io(0x01)
KSM_START_STOP_KTHREAD = _iow(0x02, ctypes.sizeof(ksm_kthread_info))
KSM_GET_INFO_KTHREAD = _iow(0x03, ctypes.sizeof(ksm_kthread_info))
KSM_REGISTER_MEMORY_REGION = _iow(0x20, ctypes.sizeof(ksm_memory_region))
KSM_REMOVE_MEMORY_REGION = _io(0x21)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def raw_ioctl(fd: int, cmd: int, arg: ctypes.Structure | int | None = None) -> int:
    """ioctl() exactly as C sees it: the return value, positive ones included.

    Raises OSError only when ioctl() returns -1.
    """
    if isinstance(arg, ctypes.Structure):
        ptr: int | None = ctypes.addressof(arg)
    else:
        ptr = arg
    ctypes.set_errno(0)
    r: int = _libc.ioctl(fd, cmd, ptr)  # ctypes gives Any; restype above is c_int
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


class _OwnedFd:
    """An fd this object closes, also as a context manager."""

    fd: int

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sma(_OwnedFd):
    """A shared memory area fd: register regions of this process's memory."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def register(self, addr: int, npages: int) -> int:
        return raw_ioctl(self.fd, KSM_REGISTER_MEMORY_REGION, ksm_memory_region(npages=npages, addr=addr))

    def remove(self) -> int:
        """Drop every region registered through this SMA."""
        return raw_ioctl(self.fd, KSM_REMOVE_MEMORY_REGION)


class Ksm(_OwnedFd):
    """An open /dev/ksm."""

    def __init__(self, path: str = "/dev/ksm") -> None:
        self.fd = os.open(path, os.O_RDWR)

    def api_version(self) -> int:
        return raw_ioctl(self.fd, KSM_GET_API_VERSION)

    def create_sma(self) -> Sma:
        return Sma(raw_ioctl(self.fd, KSM_CREATE_SHARED_MEMORY_AREA))

    def start(self, pages_to_scan: int, sleep_us: int) -> int:
        """Run the scanner; returns 1 (not an error!) if pages_to_scan is 0."""
        info = ksm_kthread_info(sleep=sleep_us, pages_to_scan=pages_to_scan, flags=KSM_CONTROL_FLAGS_RUN)
        return raw_ioctl(self.fd, KSM_START_STOP_KTHREAD, info)

    def stop(self) -> int:
        return raw_ioctl(self.fd, KSM_START_STOP_KTHREAD, ksm_kthread_info(flags=0))

    def info(self) -> ksm_kthread_info:
        info = ksm_kthread_info()
        raw_ioctl(self.fd, KSM_GET_INFO_KTHREAD, info)
        return info


def buffer_address(buf: mmap.mmap) -> int:
    """Address of an mmap'ed buffer in this process."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def demo(path: str = "/dev/ksm") -> None:
    npages = 64
    with Ksm(path) as ksm:
        print(f"opened {path}: fd {ksm.fd}, API version {ksm.api_version()}")
        print(f"START with pages_to_scan 0 returns {ksm.start(0, 1000)} (the 2009 quirk: EPERM without the minus)")
        print(f"START 100 pages every 5000 us returns {ksm.start(100, 5000)}")
        info = ksm.info()
        print(f"GET_INFO: flags {info.flags}, pages_to_scan {info.pages_to_scan}, sleep {info.sleep} us")
        buf = mmap.mmap(-1, npages * mmap.PAGESIZE)
        buf.write(b"\x42" * len(buf))  # identical pages: the scanner's food
        with ksm.create_sma() as sma:
            print(f"CREATE_SHARED_MEMORY_AREA returns SMA fd {sma.fd} (a real fd of this process)")
            addr = buffer_address(buf)
            print(f"REGISTER {npages} pages at {addr:#x} returns {sma.register(addr, npages)}")
            print(f"unknown command on the SMA returns {raw_ioctl(sma.fd, KSM_GET_API_VERSION)} (the quirk: +22)")
            print(f"REMOVE returns {sma.remove()}")
        print(f"STOP returns {ksm.stop()}")
        buf.close()


if __name__ == "__main__":
    demo(*sys.argv[1:2])
