"""The two 2009 /dev/ksm ABIs: ioctl numbers and structures.

The March 2009 patch (``include/linux/ksm.h``, the ABI this project is built
around) and the kvm tree's January 2009 out-of-tree module
(``include/linux/ksm-2009-01.h``) share the device, the letter ``KSMIO`` and
three numbers, and differ in the rest: other numbers, smaller structures, and
a scan fd the March patch dropped.  No number means one thing in one ABI and
another in the other, so one device answers both (see device.py).

Everything here is a fact of the x86_64 ABI that programs compiled against
those headers see.  Nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

KSMIO = 0xAB
KSM_API_VERSION = 1  # both ABIs
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

# The two ABIs, by their headers' dates.
MARCH = "2009-03"
JANUARY = "2009-01"

# asm-generic/ioctl.h encoding: dir(2) size(14) type(8) nr(8), dir _IOC_WRITE = 1.
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KSMIO << 8) | nr


def _hex(value: int) -> str:
    """strace's style for flags and addresses: 0 stays 0, the rest in hex."""
    return f"{value:#x}" if value else "0"


class CStruct:
    """A C structure of the ABI: ``FORMAT`` lays out ``C_ORDER``'s fields, little-endian.

    Subclasses are frozen dataclasses whose fields are the C fields (in any
    order: ``C_ORDER`` is the C one).  Construction refuses a value the C
    field cannot hold (ValueError), before anything stores it.
    """

    FORMAT: ClassVar[struct.Struct]
    C_ORDER: ClassVar[tuple[str, ...]]
    HEX: ClassVar[frozenset[str]] = frozenset({"pad", "addr", "flags", "reserved_bits"})

    def __post_init__(self) -> None:
        for name, code in zip(self.C_ORDER, self.FORMAT.format.lstrip("<"), strict=True):
            value = getattr(self, name)
            limit, ctype = (U64_MAX, "__u64") if code == "Q" else (U32_MAX, "__u32")
            if not 0 <= value <= limit:
                raise ValueError(f"{name} {value} does not fit in {ctype}")

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(**dict(zip(cls.C_ORDER, cls.FORMAT.unpack(data), strict=True)))

    def pack(self) -> bytes:
        return self.FORMAT.pack(*(getattr(self, name) for name in self.C_ORDER))

    def describe(self) -> str:
        """The fields in C order, as strace prints a struct (used by ``--trace``)."""
        shown = (
            f"{name}={_hex(getattr(self, name)) if name in self.HEX else getattr(self, name)}" for name in self.C_ORDER
        )
        return "{" + ", ".join(shown) + "}"


# -- The March 2009 ABI (include/linux/ksm.h) ----------------------------------------

STRUCT_SIZE = 24


@dataclass(frozen=True)
class MemoryRegion(CStruct):
    """``struct ksm_memory_region``: {u32 npages; u32 pad; u64 addr; u64 reserved_bits}."""

    npages: int
    addr: int
    pad: int = 0
    reserved_bits: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")
    C_ORDER: ClassVar[tuple[str, ...]] = ("npages", "pad", "addr", "reserved_bits")


@dataclass(frozen=True)
class KthreadInfo(CStruct):
    """``struct ksm_kthread_info``: {u32 sleep; u32 pages_to_scan; u32 flags; u32 pad; u64 reserved_bits}.

    ``sleep`` is in microseconds.  The engine stores the scanner's
    parameters as one of these (pad and reserved_bits 0), whichever ABI or
    control file set them: the range check at construction is the one check
    all of them share, so nothing out of range is ever stored.
    """

    sleep: int = 0
    pages_to_scan: int = 0
    flags: int = 0
    pad: int = 0
    reserved_bits: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIIIQ")
    C_ORDER: ClassVar[tuple[str, ...]] = ("sleep", "pages_to_scan", "flags", "pad", "reserved_bits")

    @property
    def running(self) -> bool:
        return bool(self.flags & KSM_CONTROL_FLAGS_RUN)


KSM_GET_API_VERSION = _ioc(_IOC_NONE, 0x00, 0)
KSM_CREATE_SHARED_MEMORY_AREA = _ioc(_IOC_NONE, 0x01, 0)
KSM_START_STOP_KTHREAD = _ioc(_IOC_WRITE, 0x02, STRUCT_SIZE)
KSM_GET_INFO_KTHREAD = _ioc(_IOC_WRITE, 0x03, STRUCT_SIZE)
KSM_REGISTER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x20, STRUCT_SIZE)
KSM_REMOVE_MEMORY_REGION = _ioc(_IOC_NONE, 0x21, 0)


# -- The January 2009 ABI (include/linux/ksm-2009-01.h) ----------------------------------


@dataclass(frozen=True)
class MemoryRegion2009Jan(CStruct):
    """January's ``struct ksm_memory_region``: {u32 npages; u32 pad; u64 addr}, 16 bytes."""

    npages: int
    addr: int
    pad: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIQ")
    C_ORDER: ClassVar[tuple[str, ...]] = ("npages", "pad", "addr")


@dataclass(frozen=True)
class KthreadInfo2009Jan(CStruct):
    """January's ``struct ksm_kthread_info``: {u32 sleep; u32 pages_to_scan; u32 flags}, 12 bytes."""

    sleep: int = 0
    pages_to_scan: int = 0
    flags: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<III")
    C_ORDER: ClassVar[tuple[str, ...]] = ("sleep", "pages_to_scan", "flags")

    @property
    def running(self) -> bool:
        return bool(self.flags & KSM_CONTROL_FLAGS_RUN)


@dataclass(frozen=True)
class UserScan(CStruct):
    """``struct ksm_user_scan``: {u32 pages_to_scan; u32 flags}, 8 bytes (KSM_SCAN's argument)."""

    pages_to_scan: int = 0
    flags: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<II")
    C_ORDER: ClassVar[tuple[str, ...]] = ("pages_to_scan", "flags")


KSM_CREATE_SCAN = _ioc(_IOC_NONE, 0x02, 0)
KSM_START_STOP_KTHREAD_2009_01 = _ioc(_IOC_WRITE, 0x03, KthreadInfo2009Jan.FORMAT.size)
KSM_GET_INFO_KTHREAD_2009_01 = _ioc(_IOC_WRITE, 0x04, KthreadInfo2009Jan.FORMAT.size)
KSM_REGISTER_MEMORY_REGION_2009_01 = _ioc(_IOC_WRITE, 0x20, MemoryRegion2009Jan.FORMAT.size)
KSM_SCAN = _ioc(_IOC_WRITE, 0x40, UserScan.FORMAT.size)


# -- Both, as one table -------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One ioctl number: its name in its header(s), which ABIs have it, and the struct its pointer names."""

    name: str
    abis: tuple[str, ...]
    struct: type[CStruct] | None = None

    @property
    def label(self) -> str:
        """The name as ``--trace`` and the log show it: tagged with its ABI unless both have it."""
        return self.name if len(self.abis) > 1 else f"{self.name}[{self.abis[0]}]"


_BOTH = (MARCH, JANUARY)
CALLS: dict[int, Call] = {
    KSM_GET_API_VERSION: Call("KSM_GET_API_VERSION", _BOTH),
    KSM_CREATE_SHARED_MEMORY_AREA: Call("KSM_CREATE_SHARED_MEMORY_AREA", _BOTH),
    KSM_REMOVE_MEMORY_REGION: Call("KSM_REMOVE_MEMORY_REGION", _BOTH),
    KSM_START_STOP_KTHREAD: Call("KSM_START_STOP_KTHREAD", (MARCH,), KthreadInfo),
    KSM_GET_INFO_KTHREAD: Call("KSM_GET_INFO_KTHREAD", (MARCH,), KthreadInfo),
    KSM_REGISTER_MEMORY_REGION: Call("KSM_REGISTER_MEMORY_REGION", (MARCH,), MemoryRegion),
    KSM_CREATE_SCAN: Call("KSM_CREATE_SCAN", (JANUARY,)),
    KSM_START_STOP_KTHREAD_2009_01: Call("KSM_START_STOP_KTHREAD", (JANUARY,), KthreadInfo2009Jan),
    KSM_GET_INFO_KTHREAD_2009_01: Call("KSM_GET_INFO_KTHREAD", (JANUARY,), KthreadInfo2009Jan),
    KSM_REGISTER_MEMORY_REGION_2009_01: Call("KSM_REGISTER_MEMORY_REGION", (JANUARY,), MemoryRegion2009Jan),
    KSM_SCAN: Call("KSM_SCAN", (JANUARY,), UserScan),
}


def header_names(abi: str) -> dict[int, str]:
    """Every ioctl number of one ABI, with its name in that ABI's header."""
    return {number: call.name for number, call in CALLS.items() if abi in call.abis}


def ioctl_name(cmd: int) -> str:
    """The name of ``cmd`` tagged with its ABI (:attr:`Call.label`), or its hex value for an unknown command."""
    call = CALLS.get(cmd)
    return call.label if call is not None else f"{cmd:#x}"


assert MemoryRegion.FORMAT.size == KthreadInfo.FORMAT.size == STRUCT_SIZE
