"""Registered memory and scanner parameters: what the ioctls change.

The 2009 driver keeps one global list of slots (``ksm_mem_slot``), each
{mm, addr, npages}, in registration order, and every SMA keeps the list of
the slots registered through it.  The scanner walks the global list; REMOVE
and the last close of an SMA drop every slot of that SMA.  This module keeps
the same two views: :attr:`Engine.slots` in registration order and
:attr:`Sma.slots` per area.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

from cuse_ksm.abi import KthreadInfo


class AddressSpace(Protocol):
    """The memory of one registered process, pinned at registration.

    Implementations hold handles bound to the process's address space (not
    to its pid), so that a later read can never reach another process that
    reuses the pid.  ``tgid`` is for display and grouping only.
    """

    tgid: int

    def close(self) -> None: ...


@dataclass(eq=False)
class Slot:
    """One registered region: ``npages`` pages from ``addr`` in ``space``."""

    sma: Sma
    space: AddressSpace
    addr: int
    npages: int


@dataclass(eq=False)
class Sma:
    """A shared memory area: the owner of the slots registered through its fd."""

    id: int
    slots: list[Slot] = field(default_factory=list)


class Engine:
    """The state the ioctls steer: kthread parameters and registered slots."""

    def __init__(self) -> None:
        # Initial values of the 2009 driver: scanner idle until START_STOP.
        self._kthread = KthreadInfo(sleep=0, pages_to_scan=0, flags=0)
        self.slots: list[Slot] = []
        self.smas: dict[int, Sma] = {}
        self._sma_ids = itertools.count(1)

    # -- kthread parameters (START_STOP_KTHREAD / GET_INFO_KTHREAD) ----------

    @property
    def kthread(self) -> KthreadInfo:
        """sleep (µs), pages_to_scan and flags as GET_INFO_KTHREAD reports them."""
        return self._kthread

    def set_kthread(self, sleep: int, pages_to_scan: int, flags: int) -> None:
        """Store new parameters and wake the scanner so they take effect now."""
        self._kthread = KthreadInfo(sleep=sleep, pages_to_scan=pages_to_scan, flags=flags)
        self._wake()

    def _wake(self) -> None:
        """Hook for the scanner: called whenever parameters or slots change."""

    # -- shared memory areas and their slots ---------------------------------

    def new_sma(self) -> Sma:
        sma = Sma(next(self._sma_ids))
        self.smas[sma.id] = sma
        return sma

    def register(self, sma: Sma, space: AddressSpace, addr: int, npages: int) -> Slot:
        """Record a slot; the seed validates neither addr nor npages, nor do we."""
        if sma.id not in self.smas:
            raise LookupError(f"SMA {sma.id} was released")
        slot = Slot(sma=sma, space=space, addr=addr, npages=npages)
        self.slots.append(slot)
        sma.slots.append(slot)
        self._wake()
        return slot

    def remove_regions(self, sma: Sma) -> int:
        """Drop every slot of ``sma`` (REMOVE_MEMORY_REGION); returns how many."""
        gone = sma.slots
        sma.slots = []
        for slot in gone:
            self._forget_slot(slot)
        if gone:
            self._wake()
        return len(gone)

    def release_sma(self, sma: Sma) -> None:
        """The last close of the SMA's fd: as REMOVE, then the area is gone."""
        self.remove_regions(sma)
        self.smas.pop(sma.id, None)

    def _forget_slot(self, slot: Slot) -> None:
        self.slots.remove(slot)
        slot.space.close()
