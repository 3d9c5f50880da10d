"""Registered memory: shared memory areas, their slots, and the address spaces they pin.

The 2009 driver keeps one global list of slots (``ksm_mem_slot``), each
{mm, addr, npages}, in registration order, and every SMA keeps the list of
the slots registered through it.  REMOVE and the last close of an SMA drop
every slot of that SMA.  :class:`Registry` keeps the same two views -
:attr:`Registry.slots` in registration order and :attr:`Sma.slots` per
area - plus the scan ring, the same slots keyed by registration number,
which the scanner's cursor walks (see scanner.py).

A slot's address space is pinned when it is registered and closed when the
slot leaves the registry; this module is the one place that does both.
"""

from __future__ import annotations

import itertools
import mmap
from dataclasses import dataclass, field
from typing import Protocol

from sortedcontainers import SortedDict

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine.trees import RmapChunk


class AddressSpace(Protocol):
    """The memory of one registered process, pinned at registration.

    Implementations hold handles bound to the process's address space (not
    to its pid), so that a later read can never reach another process that
    reuses the pid.  ``tgid`` is for display and grouping only.

    The scanner needs the reading methods and :meth:`mapped`; the device
    layer opens and closes spaces, and asks :meth:`mapped` at REGISTER.
    """

    tgid: int

    def close(self) -> None: ...

    def read_pages(self, addr: int, npages: int, into: mmap.mmap) -> bytes | None:
        """Copy the present pages of [addr, addr + npages pages) into ``into``.

        Returns one byte per page: PAGE_COPIED (1) where the page was present
        and copied to ``into[i * PAGE_SIZE:]``; else PAGE_ABSENT (0, not
        present: nothing is faulted in), PAGE_ZERO (it maps the kernel's
        shared zero page) or PAGE_UNREADABLE (present, but the read failed),
        all from :mod:`cuse_ksm.abi`.  None once the address space is gone
        for good.
        """
        ...

    def start_read(self, addr: int, npages: int, into: mmap.mmap) -> PendingRead:
        """Start what :meth:`read_pages` does; its :meth:`PendingRead.result` is what that returns.

        The copy may go on after the call returns (the scanner reads the
        next window of pages while it works on this one): until
        ``result()`` has been called, nothing may read or write ``into``,
        nor start another read into it.
        """
        ...

    def read_page(self, addr: int) -> bytes | None:
        """The page at ``addr`` if it is present, else None."""
        ...

    def mapped(self, addr: int, npages: int) -> list[tuple[int, int]] | None:
        """The parts of [addr, addr + npages pages) inside the process's mappings, now.

        (start, end) addresses, page-aligned, in address order, clipped to
        the range; nothing beyond the top of the 64-bit address space.  What
        the scanner needs to pass over holes at once, as today's kernel
        walks VMAs; read afresh on each call.  None once the address space
        is gone for good.
        """
        ...


class PendingRead(Protocol):
    """A read started by :meth:`AddressSpace.start_read`."""

    def ready(self, timeout: float = 0.0) -> bool:
        """True once :meth:`result` would return without waiting for the copy; waits up to ``timeout`` s for that."""
        ...

    def result(self) -> bytes | None:
        """What :meth:`AddressSpace.read_pages` would have returned, once the copy is done (it waits for it).

        Called once, by whoever started the read.
        """
        ...


@dataclass(frozen=True)
class ReadDone:
    """A :class:`PendingRead` whose copy was made at once: for reads that were synchronous."""

    found: bytes | None

    def ready(self, timeout: float = 0.0) -> bool:
        return True

    def result(self) -> bytes | None:
        return self.found


@dataclass(eq=False)
class Slot:
    """One registered region: ``npages`` pages from ``addr`` in ``space``.

    The scanner's state for the slot rides along: ``chunks`` holds the
    reverse-map items (see :class:`RmapChunk`), ``pages_merged`` how many of
    its pages currently map a shared page.
    """

    sma: Sma
    space: AddressSpace
    addr: int
    npages: int
    seq: int = 0
    chunks: dict[int, RmapChunk] = field(default_factory=dict, repr=False)
    pages_merged: int = 0
    # Number of this slot in the current unstable tree's ``loc`` values.
    no: int = 0
    # Pages [0, visited) have been looked at since registration (the cursor
    # walks a slot from its first page): the others are not scanned yet.
    visited: int = 0
    # Set when the slot left the registry, or its address space died.
    gone: bool = False
    # --merge kernel: what the caller's madvise(MADV_MERGEABLE) of the region
    # achieved ("pending", "ok" or an errno's name); "" in emulation.
    host_advice: str = ""

    @property
    def base(self) -> int:
        # The driver looked pages up by address with no alignment check: an
        # unaligned addr names the page that contains it.
        return self.addr & ~(PAGE_SIZE - 1)


@dataclass(eq=False)
class Sma:
    """A shared memory area: the owner of the slots registered through its fd."""

    id: int
    slots: list[Slot] = field(default_factory=list)


class Registry:
    """The SMAs and slots that exist, and the pages the scanner still has to visit."""

    def __init__(self) -> None:
        self.smas: dict[int, Sma] = {}
        self.slots: list[Slot] = []
        # The scan ring: slots by registration sequence number.  The cursor
        # remembers the sequence number of the slot it is in, and a sorted
        # map finds "the first slot after it" even when that slot has been
        # removed meanwhile, or new ones were appended: the cursor survives
        # both without a rescan from the start.
        self.ring: SortedDict[int, Slot] = SortedDict()
        # Pages of the slots not gone: 0 means there is nothing to scan.
        self.live_pages = 0
        self._sma_ids = itertools.count(1)
        self._slot_seqs = itertools.count(1)

    def new_sma(self) -> Sma:
        sma = Sma(next(self._sma_ids))
        self.smas[sma.id] = sma
        return sma

    def add(self, sma: Sma, space: AddressSpace, addr: int, npages: int) -> Slot:
        """Record a slot; the 2009 driver validates neither addr nor npages, nor do we."""
        if sma.id not in self.smas:
            raise LookupError(f"SMA {sma.id} was released")
        slot = Slot(sma=sma, space=space, addr=addr, npages=npages, seq=next(self._slot_seqs))
        self.slots.append(slot)
        sma.slots.append(slot)
        self.ring[slot.seq] = slot
        self.live_pages += npages
        return slot

    def retire(self, slot: Slot) -> None:
        """``slot`` will not be scanned again (it left, or its process died)."""
        if not slot.gone:
            slot.gone = True
            self.live_pages -= slot.npages

    def remove_regions(self, sma: Sma) -> list[Slot]:
        """Take every slot of ``sma`` out and close its space; returns them.

        The caller must drop the slots' scanner state (their items are
        still in the trees).
        """
        gone = sma.slots
        sma.slots = []
        for slot in gone:
            self.slots.remove(slot)
            self.ring.pop(slot.seq, None)
            self.retire(slot)
            slot.space.close()
        return gone

    def release_sma(self, sma: Sma) -> None:
        """The area itself is gone (its slots must have been removed first)."""
        assert not sma.slots
        self.smas.pop(sma.id, None)
