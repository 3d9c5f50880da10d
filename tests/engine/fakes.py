"""In-memory address spaces for the engine's unit tests."""

from __future__ import annotations

import mmap
import random

from cuse_ksm.abi import PAGE_COPIED, PAGE_SIZE, PAGE_UNREADABLE, PAGE_ZERO
from cuse_ksm.engine import Engine, ReadDone, Slot
from cuse_ksm.engine.check import check_engine


def page(fill: int, tail: bytes = b"") -> bytes:
    """A page of ``fill`` bytes whose last len(tail) bytes are ``tail``."""
    body = bytes([fill & 0xFF]) * (PAGE_SIZE - len(tail))
    return body + tail


def unique_page(n: int) -> bytes:
    """A page no other call returns (n at the start and the end)."""
    stamp = n.to_bytes(8, "little")
    return stamp + bytes(PAGE_SIZE - 16) + stamp


# The layouts of `make bench` (bench/workload.py) and of the cross-check
# against the kernel's KSM (tests/c/ksm_crosscheck.c), small enough for unit tests.
WORKLOADS = ("dup50", "tail8", "equal", "half", "volatile", "tail", "tailgroup", "zeroread")


def workload(layout: str, npages: int) -> list[bytes | None]:
    """The pages of ``layout`` (one of WORKLOADS), page for page; None: a page only read (zeroread's odd pages)."""
    if layout == "dup50":
        # bench's dup50 with 64 duplicate contents, so that a small region repeats them.
        rng = random.Random(2009)
        dups = [rng.randbytes(PAGE_SIZE) for _ in range(64)]
        return [dups[(i // 2) % 64] if i % 2 == 0 else rng.randbytes(PAGE_SIZE) for i in range(npages)]
    if layout == "tail8":
        # The worst case: equal but for the page index in the last 8 bytes.
        return [page(0, i.to_bytes(8, "little")) for i in range(npages)]
    assert layout in WORKLOADS, layout
    out: list[bytes | None] = []
    for i in range(npages):
        if layout == "zeroread" and i % 2:
            out.append(None)
            continue
        p = bytearray(page(0x6B))
        if layout == "half":
            p[:8] = (1000 + i if i % 2 else (i // 2) % 4).to_bytes(8, "little")
        elif layout == "volatile" and i % 4 == 3:
            p[:8] = i.to_bytes(8, "little")
        elif layout == "tail":
            p[-8:] = i.to_bytes(8, "little")
        elif layout == "tailgroup":
            p[-8:] = (i // 8).to_bytes(8, "little")
        out.append(bytes(p))
    return out


def rewrite_volatile(space: FakeSpace, addr: int, npages: int, n: int) -> None:
    """The volatile layout's writer (ksm_crosscheck's writer thread): bytes 8-15 of every page 3 mod 4 become ``n``."""
    for i in range(3, npages, 4):
        at = addr + i * PAGE_SIZE
        data = space.pages[at]
        space.pages[at] = data[:8] + n.to_bytes(8, "little") + data[16:]


class FakeSpace:
    """An address space made of a dict {page address: content}; absent pages are not present.

    Pages in ``zero`` read as mapping the kernel's zero page, those in
    ``unreadable`` as present but failing to read (PAGE_ZERO, PAGE_UNREADABLE).
    Mappings: every address is mapped until :meth:`add_mapping` declares one;
    from then on only the declared ranges are (:meth:`mapped`), and
    :meth:`munmap` takes ranges and their pages away again.
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
        self.mappings: list[tuple[int, int]] | None = None  # [start, end) addresses; None: all mapped
        self.mapped_calls = 0

    def add_mapping(self, addr: int, npages: int) -> None:
        """Declare [addr, addr + npages pages) mapped (its pages stay not present until written)."""
        self.mappings = sorted([*(self.mappings or []), (addr, addr + npages * PAGE_SIZE)])

    def munmap(self, addr: int, npages: int) -> None:
        """Unmap [addr, addr + npages pages): the range leaves the mappings, its pages go."""
        end = addr + npages * PAGE_SIZE
        kept: list[tuple[int, int]] = []
        for start, stop in self.mappings or [(0, 1 << 64)]:
            kept += [r for r in ((start, min(stop, addr)), (max(start, end), stop)) if r[0] < r[1]]
        self.mappings = kept
        self.unmap(addr, npages)
        gone = {addr + i * PAGE_SIZE for i in range(npages)}
        self.zero -= gone
        self.unreadable -= gone

    def map(self, addr: int, contents: list[bytes] | list[bytes | None]) -> None:
        """Pages from ``addr`` on; a None is a page only read, which maps the zero page."""
        for i, data in enumerate(contents):
            if data is None:
                self.zero.add(addr + i * PAGE_SIZE)
                continue
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

    def start_read(self, addr: int, npages: int, into: mmap.mmap) -> ReadDone:
        """Synchronous: the read is made now (the scanner's read-ahead then sees the pages as they are now)."""
        return ReadDone(self.read_pages(addr, npages, into))

    def mapped(self, addr: int, npages: int) -> list[tuple[int, int]] | None:
        if self.gone:
            return None
        self.mapped_calls += 1
        end = min(addr + npages * PAGE_SIZE, 1 << 64)
        out = []
        for start, stop in self.mappings if self.mappings is not None else [(0, 1 << 64)]:
            lo, hi = max(start, addr), min(stop, end)
            if lo < hi:
                out.append((lo, hi))
        return out

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


MIXED_ADDR = 0x7F00_0000_0000
MIXED_PAGES = 700  # three chunks: 0-255, 256-511 (only a zero page in it), 512-699


def mixed(tgid: int = 77) -> tuple[Engine, FakeSpace, Slot]:
    """Four passes over one region that leave pages in every state but not_scanned (tests/engine/test_pages.py)."""
    A = MIXED_ADDR

    def at(i: int) -> int:
        return A + i * PAGE_SIZE

    engine = Engine()
    space = FakeSpace(tgid)
    space.map(A, [page(1)] * 10)  # 0-9: identical, merge
    space.map(at(10), [unique_page(100 + i) for i in range(5)])  # 10-14: unique
    space.map(at(15), [unique_page(200 + i) for i in range(5)])  # 15-19: rewritten before every pass
    space.map(at(20), [page(2)] * 2)  # 20-21: merge, then 21 is written
    space.zero |= {at(22), at(23), at(300)}  # only read: 300 alone in its chunk
    space.pages[at(24)] = page(9)
    space.unreadable.add(at(24))
    space.map(at(512), [unique_page(300 + i) for i in range(4)])  # 512-515: unique, third chunk
    slot = engine.register(engine.new_sma(), space, A, MIXED_PAGES)

    def rewrite_volatile(n: int) -> None:
        space.map(at(15), [unique_page(1000 * n + i) for i in range(5)])

    full_scans(engine, 1)
    rewrite_volatile(2)
    full_scans(engine, 1)
    rewrite_volatile(3)
    engine.max_kernel_pages = 2  # the two shared pages there are: no third
    space.map(at(30), [page(3)] * 2)  # 30-31: a new pair, first seen in pass 3
    full_scans(engine, 1)
    check_engine(engine)
    rewrite_volatile(4)
    space.write(at(21), unique_page(500))  # a merged page written: COW
    space.write(at(32), unique_page(600))  # first seen in the last pass
    full_scans(engine, 1)
    check_engine(engine)
    return engine, space, slot
