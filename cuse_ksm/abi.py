"""The 2009 /dev/ksm ABI: ioctl numbers and the two 24-byte structures.

Everything here is a fact of the x86_64 ABI that programs compiled against
``include/linux/ksm.h`` see.  Nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

KSMIO = 0xAB
KSM_API_VERSION = 1
KSM_CONTROL_FLAGS_RUN = 1  # ksm_control_flags_run: bit 0 of ksm_kthread_info.flags

PAGE_SIZE = 4096

# asm-generic/ioctl.h encoding: dir(2) size(14) type(8) nr(8), dir _IOC_WRITE = 1.
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KSMIO << 8) | nr


STRUCT_SIZE = 24

KSM_GET_API_VERSION = _ioc(_IOC_NONE, 0x00, 0)
KSM_CREATE_SHARED_MEMORY_AREA = _ioc(_IOC_NONE, 0x01, 0)
KSM_START_STOP_KTHREAD = _ioc(_IOC_WRITE, 0x02, STRUCT_SIZE)
KSM_GET_INFO_KTHREAD = _ioc(_IOC_WRITE, 0x03, STRUCT_SIZE)
KSM_REGISTER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x20, STRUCT_SIZE)
KSM_REMOVE_MEMORY_REGION = _ioc(_IOC_NONE, 0x21, 0)

IOCTL_NAMES: dict[int, str] = {
    KSM_GET_API_VERSION: "KSM_GET_API_VERSION",
    KSM_CREATE_SHARED_MEMORY_AREA: "KSM_CREATE_SHARED_MEMORY_AREA",
    KSM_START_STOP_KTHREAD: "KSM_START_STOP_KTHREAD",
    KSM_GET_INFO_KTHREAD: "KSM_GET_INFO_KTHREAD",
    KSM_REGISTER_MEMORY_REGION: "KSM_REGISTER_MEMORY_REGION",
    KSM_REMOVE_MEMORY_REGION: "KSM_REMOVE_MEMORY_REGION",
}


def ioctl_name(cmd: int) -> str:
    """The header's name of ``cmd``, or its hex value for an unknown command."""
    return IOCTL_NAMES.get(cmd, f"{cmd:#x}")


@dataclass(frozen=True)
class MemoryRegion:
    """``struct ksm_memory_region``: {u32 npages; u32 pad; u64 addr; u64 reserved_bits}."""

    npages: int
    addr: int
    pad: int = 0
    reserved_bits: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    @classmethod
    def unpack(cls, data: bytes) -> MemoryRegion:
        npages, pad, addr, reserved = cls.FORMAT.unpack(data)
        return cls(npages=npages, addr=addr, pad=pad, reserved_bits=reserved)

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.npages, self.pad, self.addr, self.reserved_bits)


@dataclass(frozen=True)
class KthreadInfo:
    """``struct ksm_kthread_info``: {u32 sleep; u32 pages_to_scan; u32 flags; u32 pad; u64 reserved_bits}.

    ``sleep`` is in microseconds.
    """

    sleep: int = 0
    pages_to_scan: int = 0
    flags: int = 0
    pad: int = 0
    reserved_bits: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIIIQ")

    @classmethod
    def unpack(cls, data: bytes) -> KthreadInfo:
        return cls(*cls.FORMAT.unpack(data))

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.sleep, self.pages_to_scan, self.flags, self.pad, self.reserved_bits)

    @property
    def running(self) -> bool:
        return bool(self.flags & KSM_CONTROL_FLAGS_RUN)


assert MemoryRegion.FORMAT.size == STRUCT_SIZE
assert KthreadInfo.FORMAT.size == STRUCT_SIZE
