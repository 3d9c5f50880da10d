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

# What a read of a registered process's pages found, one byte per page (the
# bytes AddressSpace.read_pages returns; host/procmem.py produces them, the
# scanner consumes them).  Only PAGE_COPIED pages were copied.
PAGE_ABSENT = 0  # not present in RAM: never touched, swapped out, or unmapped
PAGE_COPIED = 1  # present, and copied into the caller's buffer
PAGE_ZERO = 2  # maps the kernel's shared zero page (only ever read): no memory of its own
PAGE_UNREADABLE = 3  # present, but the read of it failed

# Ranges of the header's field types: a value outside them cannot reach the
# driver through the structs, so the control files refuse it too.
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

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


def _check_fields(obj: object, widths: dict[str, int]) -> None:
    """Refuse field values the C struct cannot hold (ValueError), before anything stores them."""
    for name, limit in widths.items():
        value = getattr(obj, name)
        if not 0 <= value <= limit:
            ctype = "__u32" if limit == U32_MAX else "__u64"
            raise ValueError(f"{name} {value} does not fit in {ctype}")


_REGION_WIDTHS = {"npages": U32_MAX, "pad": U32_MAX, "addr": U64_MAX, "reserved_bits": U64_MAX}
_KTHREAD_WIDTHS = {
    "sleep": U32_MAX,
    "pages_to_scan": U32_MAX,
    "flags": U32_MAX,
    "pad": U32_MAX,
    "reserved_bits": U64_MAX,
}


def _hex(value: int) -> str:
    """strace's style for flags and addresses: 0 stays 0, the rest in hex."""
    return f"{value:#x}" if value else "0"


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

    def __post_init__(self) -> None:
        _check_fields(self, _REGION_WIDTHS)

    @classmethod
    def unpack(cls, data: bytes) -> MemoryRegion:
        npages, pad, addr, reserved = cls.FORMAT.unpack(data)
        return cls(npages=npages, addr=addr, pad=pad, reserved_bits=reserved)

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.npages, self.pad, self.addr, self.reserved_bits)

    def describe(self) -> str:
        """The fields in C order, as strace prints a struct (used by ``--trace``)."""
        return (
            f"{{npages={self.npages}, pad={_hex(self.pad)}, addr={_hex(self.addr)}, "
            f"reserved_bits={_hex(self.reserved_bits)}}}"
        )


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

    def __post_init__(self) -> None:
        # The one range check shared by START_STOP_KTHREAD (whose bytes always
        # fit) and the control files' writes (whose text may not): the engine
        # stores parameters only as a KthreadInfo, so nothing out of range is
        # ever stored, whichever way it came in.
        _check_fields(self, _KTHREAD_WIDTHS)

    @classmethod
    def unpack(cls, data: bytes) -> KthreadInfo:
        return cls(*cls.FORMAT.unpack(data))

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.sleep, self.pages_to_scan, self.flags, self.pad, self.reserved_bits)

    def describe(self) -> str:
        """The fields in C order, as strace prints a struct (used by ``--trace``)."""
        return (
            f"{{sleep={self.sleep}, pages_to_scan={self.pages_to_scan}, flags={_hex(self.flags)}, "
            f"pad={_hex(self.pad)}, reserved_bits={_hex(self.reserved_bits)}}}"
        )

    @property
    def running(self) -> bool:
        return bool(self.flags & KSM_CONTROL_FLAGS_RUN)


assert MemoryRegion.FORMAT.size == STRUCT_SIZE
assert KthreadInfo.FORMAT.size == STRUCT_SIZE
