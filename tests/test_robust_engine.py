"""Fuzz the engine over real memory, with a full state walk after every step.

Random sequences of SMA creation, REGISTER with hostile arguments (npages 0
and 2**32-1, unaligned, NULL, kernel, unmapped and overlapping addresses,
the same region twice), REMOVE, release, writes that make and break
duplicates, unmapping, remapping and mprotect under the scanner, a
registered process exiting, and max_kernel_pages changes - while kksmd runs
for real (``kksmd.run`` in a trio nursery) and synchronously
(``scan_now``).  The memory is real: this process's own pages and a
child's, read through :class:`ProcessMemory` exactly as the daemon reads
them.  After every step :func:`cuse_ksm.engine.check.check_engine` recounts
trees and counters and compares; at the end every pinned fd is closed and
the counters are back to zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cuse_ksm import kksmd
from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine import Engine, KsmPage, RmapChunk, Slot
from cuse_ksm.engine.check import EngineInconsistent, check_engine, problems
from cuse_ksm.engine.trees import MERGED
from cuse_ksm.host.procmem import ProcessMemory
from tests.host.child import Child

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' memory: needs root")

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NPAGES = 48  # pages in each memory (ours and the child's)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FIXED = 0x10


def _unmapped_address() -> int:
    """An address that was mapped a moment ago and is not any more."""
    addr = _libc.mmap(None, 16 * PAGE_SIZE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    _libc.munmap(addr, 16 * PAGE_SIZE)
    return int(addr)


class OwnMemory:
    """NPAGES pages of this process, rewritten, remapped and protected by the ops."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, NPAGES * PAGE_SIZE)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.pid = os.getpid()
        self.alive = True

    def fill(self, first: int, count: int, byte: int) -> None:
        self._writable(first, count)
        self.map[first * PAGE_SIZE : (first + count) * PAGE_SIZE] = bytes([byte]) * (count * PAGE_SIZE)

    def _writable(self, first: int, count: int) -> None:
        _libc.mprotect(self.addr + first * PAGE_SIZE, count * PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE)

    def remap(self, first: int, count: int) -> None:
        """A fresh anonymous mapping over the pages: they read as not present again."""
        got = _libc.mmap(
            self.addr + first * PAGE_SIZE,
            count * PAGE_SIZE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED,
            -1,
            0,
        )
        assert got == self.addr + first * PAGE_SIZE

    def protect(self, first: int, count: int) -> None:
        _libc.mprotect(self.addr + first * PAGE_SIZE, count * PAGE_SIZE, 0)  # PROT_NONE

    def close(self) -> None:
        self._writable(0, NPAGES)
        self.map.close()


class ChildMemory:
    def __init__(self) -> None:
        self.child = Child.start(NPAGES)
        self.addr = self.child.addr
        self.pid = self.child.pid
        self.alive = True
        self.unmapped: set[int] = set()
        self.protected: set[int] = set()

    def _usable(self, first: int, count: int) -> bool:
        pages = set(range(first, first + count))
        return self.alive and not pages & (self.unmapped | self.protected)

    def fill(self, first: int, count: int, byte: int) -> None:
        if self._usable(first, count):
            self.child.fill(first, count, byte)

    def remap(self, first: int, count: int) -> None:
        if self._usable(first, count):
            self.child.unmap(first, count)
            self.unmapped.update(range(first, first + count))

    def protect(self, first: int, count: int) -> None:
        if self._usable(first, count):
            self.child.protect(first, count)
            self.protected.update(range(first, first + count))

    def exit(self) -> None:
        if self.alive:
            self.alive = False
            self.child.exit()

    def close(self) -> None:
        self.child.kill()
        for pipe in (self.child.proc.stdin, self.child.proc.stdout):
            if pipe is not None:
                pipe.close()


# One step of a fuzzed run: its kind, then its arguments (see operations()).
Op = tuple[Any, ...]

ADDRESSES = ["base", "inside", "unaligned", "null", "kernel", "top", "unmapped", "noncanonical"]
npages_st = st.one_of(st.sampled_from([0, 1, NPAGES, NPAGES, NPAGES, 2**32 - 1, 2**31]), st.integers(0, 2 * NPAGES))
# Half the registrations name the memory itself, so that pages do merge.
address_st = st.one_of(st.sampled_from(["base", "inside"]), st.sampled_from(ADDRESSES))


@st.composite
def operations(draw: st.DrawFn) -> list[Op]:
    ops: list[Op] = []
    if draw(st.booleans()):
        # Duplicates in both memories, registered: the ops then act on merged state.
        ops += [("fill", "own", 0, 16, 0x11), ("fill", "child", 8, 16, 0x11)]
        ops += [("register", "own", 0, "base", 0, NPAGES), ("register", "child", 0, "base", 0, NPAGES)]
        ops += [("scan", 4 * NPAGES)]
    kinds = ["sma", "register", "register", "register", "again", "remove", "release", "fill", "fill", "fill"]
    kinds += ["remap", "protect", "scan", "scan", "scan", "run", "run", "exit", "limit"]
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(kinds))
        who = draw(st.sampled_from(["own", "child"]))
        first = draw(st.integers(0, NPAGES - 1))
        count = draw(st.integers(1, NPAGES - first))
        if kind == "register":
            ops.append((kind, who, draw(st.integers(0, 4)), draw(address_st), first, draw(npages_st)))
        elif kind in ("again", "remove", "release"):
            ops.append((kind, draw(st.integers(0, 4))))
        elif kind == "fill":
            ops.append((kind, who, first, count, draw(st.sampled_from([0, 0x11, 0x22, 0x33, 0xFF]))))
        elif kind in ("remap", "protect"):
            ops.append((kind, who, first, count))
        elif kind == "scan":
            ops.append((kind, draw(st.one_of(st.integers(1, 4 * NPAGES), st.integers(1, 5000)))))
        elif kind == "run":
            ops.append((kind, draw(st.integers(1, 2000)), draw(st.integers(0, 3))))
        elif kind == "limit":
            ops.append((kind, draw(st.integers(0, 4))))
        else:
            ops.append((kind,))
    return ops


def address(kind: str, mem: OwnMemory | ChildMemory, first: int, unmapped: int) -> int:
    return {
        "base": mem.addr,
        "inside": mem.addr + first * PAGE_SIZE,
        "unaligned": mem.addr + first * PAGE_SIZE + 123,
        "null": 0,
        "kernel": 0xFFFF_8880_0000_0000,
        "top": 0x7FFF_FFFF_F000,
        "unmapped": unmapped,
        "noncanonical": 0x8000_0000_0000_0000,
    }[kind]


def open_fds() -> dict[int, str]:
    """This process's open fds, each with what it names.

    Garbage left by earlier tests (a pipe's file object in a reference
    cycle) can hold an fd that the collector closes at any moment, during
    the run as well: collect it first, and compare fds by what they are,
    not by their number, so that an fd closing meanwhile cannot hide - or
    fake - one that the run leaked.
    """
    gc.collect()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        # FileNotFoundError: the fd listdir() read the directory through, closed by now.
        with contextlib.suppress(FileNotFoundError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def sole(group: BaseExceptionGroup) -> BaseException:
    """The one exception in a (nested) group, else the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def run_ops(ops: list[Op]) -> None:
    fds_before = open_fds()
    engine = Engine()
    own, child = OwnMemory(), ChildMemory()
    mems: dict[str, OwnMemory | ChildMemory] = {"own": own, "child": child}
    unmapped = _unmapped_address()
    smas = [engine.new_sma()]
    registered: list[Op] = []
    merged = False
    try:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(kksmd.run, engine)
                for op in ops:
                    kind = op[0]
                    if kind == "sma":
                        smas.append(engine.new_sma())
                    elif kind in ("register", "again"):
                        if kind == "again":
                            if not registered:
                                continue
                            op = registered[op[1] % len(registered)]
                        _, who, i, addr_kind, first, npages = op
                        mem = mems[who]
                        sma = smas[i % len(smas)]
                        try:
                            space = ProcessMemory.open(mem.pid)
                        except ProcessLookupError:
                            assert not mem.alive
                            continue
                        if sma.id not in engine.smas:
                            with pytest.raises(LookupError):
                                engine.register(sma, space, address(addr_kind, mem, first, unmapped), npages)
                            space.close()
                            continue
                        engine.register(sma, space, address(addr_kind, mem, first, unmapped), npages)
                        registered.append(op)
                    elif kind == "remove":
                        engine.remove_regions(smas[op[1] % len(smas)])
                    elif kind == "release":
                        engine.release_sma(smas[op[1] % len(smas)])
                    elif kind == "fill":
                        mems[op[1]].fill(*op[2:])
                    elif kind in ("remap", "protect"):
                        getattr(mems[op[1]], kind)(*op[2:])
                    elif kind == "scan":
                        engine.scan_now(op[1])
                    elif kind == "run":
                        # kksmd for real: the trio task scans between our steps.
                        engine.set_kthread(sleep=0, pages_to_scan=op[1], flags=1)
                        for _ in range(op[2] + 1):
                            await trio.sleep(0)
                        engine.set_kthread(sleep=0, pages_to_scan=op[1], flags=0)
                    elif kind == "exit":
                        child.exit()
                    elif kind == "limit":
                        engine.max_kernel_pages = op[1]
                    check_engine(engine)
                    if engine.counters().pages_sharing:
                        merged = True
                event(f"merged: {merged}; slots at the end: {min(len(engine.slots), 3)}")
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Newer trio wraps what a step raised in an ExceptionGroup: give
            # hypothesis the failure itself, so that it tells failures apart.
            raise sole(group) from None
        for sma in smas:
            engine.release_sma(sma)
        check_engine(engine)
        c = engine.counters()
        assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (0, 0, 0, 0)
        assert engine.slots == [] and len(engine.stable) == 0
    finally:
        own.close()
        child.close()
    leaked = {fd: what for fd, what in open_fds().items() if fds_before.get(fd) != what}
    assert not leaked, f"fds opened during the run are still open (a pinned address space?): {leaked}"


@FUZZ
@given(operations())
def test_engine_stays_consistent_over_real_memory(ops: list[Op]) -> None:
    trio.run(run_ops, ops)


def test_duplicates_merge_under_the_fuzzer_setup() -> None:
    """The setup can merge at all (else the fuzzer would prove little): fill, scan, merged."""

    async def main() -> None:
        engine = Engine()
        own = OwnMemory()
        try:
            own.fill(0, 8, 0x5A)
            sma = engine.new_sma()
            engine.register(sma, ProcessMemory.open(os.getpid()), own.addr, 8)
            engine.scan_now(8 * 3)
            check_engine(engine)
            assert engine.counters().pages_sharing == 7
            engine.release_sma(sma)
            check_engine(engine)
        finally:
            own.close()

    trio.run(main)


def test_the_checker_catches_each_kind_of_corruption() -> None:
    """Every invariant the checker guards can fail: corrupt a healthy engine one way at a time."""
    own = OwnMemory()
    own.fill(0, 8, 0x5A)
    own.fill(8, 4, 0x6B)

    def merged_engine() -> Engine:
        engine = Engine()
        engine.register(engine.new_sma(), ProcessMemory.open(os.getpid()), own.addr, 12)
        engine.scan_now(12 * 3)
        assert engine.counters().pages_shared == 2
        check_engine(engine)
        return engine

    def first_merged(engine: Engine) -> tuple[Slot, RmapChunk, int]:
        slot = engine.slots[0]
        chunk = slot.chunks[0]
        return slot, chunk, list(chunk.state).index(MERGED)

    def dangling(e: Engine) -> None:
        _, chunk, k = first_merged(e)
        chunk.word[k] = 999

    def sharers_off(e: Engine) -> None:
        next(iter(e.stable)).sharers += 1

    def counter_off(e: Engine) -> None:
        e.scanner.tally.sharers += 1

    def pages_merged_off(e: Engine) -> None:
        e.slots[0].pages_merged -= 1

    def orphan_kpage(e: Engine) -> None:
        e.stable.by_id[77] = KsmPage(77, 0, bytes(PAGE_SIZE))

    def content_changed(e: Engine) -> None:
        kpage = next(iter(e.stable))
        kpage.data = bytes(PAGE_SIZE)

    def ring_lost(e: Engine) -> None:
        e.registry.ring.clear()

    def slot_without_sma(e: Engine) -> None:
        e.smas.clear()

    def item_past_end(e: Engine) -> None:
        e.slots[0].chunks[0].state[200] = 1
        e.scanner.tally.items += 1

    def live_pages_off(e: Engine) -> None:
        e.registry.live_pages += 1

    def scanner_error(e: Engine) -> None:
        e.scanner.tally.errors += 1

    try:
        for corrupt in (
            dangling,
            sharers_off,
            counter_off,
            pages_merged_off,
            orphan_kpage,
            content_changed,
            ring_lost,
            slot_without_sma,
            item_past_end,
            live_pages_off,
            scanner_error,
        ):
            engine = merged_engine()
            corrupt(engine)
            assert problems(engine), corrupt.__name__
            with pytest.raises(EngineInconsistent):
                check_engine(engine)
            for slot in list(engine.slots):
                slot.space.close()
    finally:
        own.close()
