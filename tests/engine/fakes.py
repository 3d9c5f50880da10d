"""In-memory address spaces for the engine's unit tests."""

from __future__ import annotations

import mmap

from cuse_ksm.abi import PAGE_COPIED, PAGE_SIZE, PAGE_UNREADABLE, PAGE_ZERO
from cuse_ksm.engine import Engine


def page(fill: int, tail: bytes = b"") -> bytes:
    """A page of ``fill`` bytes whose last len(tail) bytes are ``tail``."""
    body = bytes([fill & 0xFF]) * (PAGE_SIZE - len(tail))
    return body + tail


def unique_page(n: int) -> bytes:
    """A page no other call returns (n at the start and the end)."""
    stamp = n.to_bytes(8, "little")
    return stamp + bytes(PAGE_SIZE - 16) + stamp


class FakeSpace:
    """An address space made of a dict {page address: content}; absent pages are not present.

    Pages in ``zero`` read as mapping the kernel's zero page, those in
    ``unreadable`` as present but failing to read (PAGE_ZERO, PAGE_UNREADABLE).
    """

    def __init__(self, tgid: int = 1000) -> None:
        self.tgid = tgid
        self.pages: dict[int, bytes] = {}
        self.zero: set[int] = set()
        self.unreadable: set[int] = set()
        self.gone = False
        self.closes = 0  # how many times close() was called: an engine closes a space once
        self.reads = 0
        self.fail: BaseException | None = None

    def map(self, addr: int, contents: list[bytes]) -> None:
        for i, data in enumerate(contents):
            assert len(data) == PAGE_SIZE
            self.pages[addr + i * PAGE_SIZE] = data

    def write(self, addr: int, data: bytes) -> None:
        self.pages[addr] = data

    def unmap(self, addr: int, npages: int) -> None:
        for i in range(npages):
            self.pages.pop(addr + i * PAGE_SIZE, None)

    def close(self) -> None:
        self.closes += 1

    @property
    def closed(self) -> bool:
        return self.closes > 0

    def read_pages(self, addr: int, npages: int, into: mmap.mmap) -> bytes | None:
        if self.fail is not None:
            raise self.fail
        if self.gone:
            return None
        self.reads += 1
        present = bytearray(npages)
        for i in range(npages):
            at = addr + i * PAGE_SIZE
            data = self.pages.get(at)
            if at in self.zero:
                present[i] = PAGE_ZERO
            elif at in self.unreadable:
                present[i] = PAGE_UNREADABLE
            elif data is not None:
                into[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = data
                present[i] = PAGE_COPIED
        return bytes(present)

    def read_page(self, addr: int) -> bytes | None:
        if self.gone or addr in self.zero or addr in self.unreadable:
            return None
        return self.pages.get(addr)


def full_scans(engine: Engine, n: int) -> None:
    """Run the scanner synchronously until ``n`` more full scans have completed."""
    target = engine.counters().full_scans + n
    while engine.counters().full_scans < target:
        if not any(not s.gone and s.npages for s in engine.slots):
            break
        engine.scan_now(1 << 40, stop_at_wrap=True)
