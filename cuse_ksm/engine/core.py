"""The engine's face: what the ioctls and control files steer, over the registry and the scanner.

:class:`Engine` holds the kthread parameters (START_STOP_KTHREAD /
GET_INFO_KTHREAD) and wires the :class:`Registry` (what is registered) to
the :class:`Scanner` (what has been found in it).  It runs nothing by
itself and never waits: whoever drives the scanner (the daemon's kksmd
task, cuse_ksm/kksmd.py) calls :meth:`Engine.scan_step` and learns of
changes through :meth:`Engine.watch`.
"""

from __future__ import annotations

from collections.abc import Callable

from cuse_ksm.abi import KSM_CONTROL_FLAGS_RUN, KthreadInfo
from cuse_ksm.engine.counters import Counters, ProcessStat
from cuse_ksm.engine.memory import EngineMemory, measure
from cuse_ksm.engine.pages import PageSurvey
from cuse_ksm.engine.registry import AddressSpace, Registry, Slot, Sma
from cuse_ksm.engine.scanner import Scanner, _never
from cuse_ksm.engine.trees import RmapItem, StableTree, UnstableTree

# Told of every change that may give an idle scanner work: True when the
# kthread parameters changed, False when slots did.
Watcher = Callable[[bool], None]


class Engine:
    """The state the ioctls steer, and the scanner that acts on it."""

    def __init__(self) -> None:
        # Initial values of the 2009 driver: scanner idle until START_STOP.
        self._kthread = KthreadInfo(sleep=0, pages_to_scan=0, flags=0)
        self.registry = Registry()
        self.scanner = Scanner(self.registry)
        self._watchers: list[Watcher] = []

    # -- who is told of changes ---------------------------------------------------

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` after every change of parameters or slots; returns the undo."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    def _changed(self, params: bool) -> None:
        for watcher in self._watchers:
            watcher(params)

    # -- kthread parameters (START_STOP_KTHREAD / GET_INFO_KTHREAD) ----------

    @property
    def kthread(self) -> KthreadInfo:
        """sleep (µs), pages_to_scan and flags as GET_INFO_KTHREAD reports them."""
        return self._kthread

    def set_kthread(self, sleep: int, pages_to_scan: int, flags: int) -> None:
        """Store new parameters and tell the scanner's driver, so they take effect now."""
        self._kthread = KthreadInfo(sleep=sleep, pages_to_scan=pages_to_scan, flags=flags)
        self._changed(True)

    def running(self) -> bool:
        """The scanner should scan: the run flag is set, with pages to scan, and there are pages."""
        k = self._kthread
        return bool(k.flags & KSM_CONTROL_FLAGS_RUN) and k.pages_to_scan > 0 and self.registry.live_pages > 0

    @property
    def max_kernel_pages(self) -> int:
        """Limit on shared pages (the v4 patch's max_kernel_pages); 0 = none."""
        return self.scanner.max_kernel_pages

    @max_kernel_pages.setter
    def max_kernel_pages(self, value: int) -> None:
        self.scanner.max_kernel_pages = value

    # -- shared memory areas and their slots ---------------------------------

    @property
    def smas(self) -> dict[int, Sma]:
        return self.registry.smas

    @property
    def slots(self) -> list[Slot]:
        """Every slot, in registration order."""
        return self.registry.slots

    def new_sma(self) -> Sma:
        return self.registry.new_sma()

    def register(self, sma: Sma, space: AddressSpace, addr: int, npages: int) -> Slot:
        """REGISTER: record the slot (:meth:`Registry.add`), number it for the scanner, wake its driver."""
        slot = self.registry.add(sma, space, addr, npages)
        self.scanner.number(slot)
        self._changed(False)
        return slot

    def remove_regions(self, sma: Sma) -> int:
        """Drop every slot of ``sma`` (REMOVE_MEMORY_REGION); returns how many."""
        gone = self.registry.remove_regions(sma)
        self.scanner.forget(gone)
        if gone:
            self._changed(False)
        return len(gone)

    def release_sma(self, sma: Sma) -> None:
        """The last close of the SMA's fd: as REMOVE, then the area is gone."""
        self.remove_regions(sma)
        self.registry.release_sma(sma)

    # -- what the scanner found ----------------------------------------------------

    @property
    def stable(self) -> StableTree:
        return self.scanner.stable

    @property
    def unstable(self) -> UnstableTree:
        return self.scanner.unstable

    @property
    def errors(self) -> int:
        """Unexpected exceptions the scanner caught (each skipped one batch)."""
        return self.scanner.tally.errors

    def counters(self) -> Counters:
        return self.scanner.tally.counters(len(self.scanner.stable), self.scanner.max_kernel_pages)

    def merged_pages_by_tgid(self) -> dict[int, int]:
        """Pages of each registered process that currently map a shared page."""
        out: dict[int, int] = {}
        for slot in self.registry.slots:
            out[slot.space.tgid] = out.get(slot.space.tgid, 0) + slot.pages_merged
        return out

    def process_stat(self, tgid: int) -> ProcessStat:
        """The /proc/PID/ksm_stat figures of process ``tgid``, over every region it registered."""
        items = merging = 0
        for slot in self.registry.slots:
            if slot.space.tgid == tgid:
                items += self.scanner.rmap_items(slot)
                merging += slot.pages_merged
        return ProcessStat(rmap_items=items, merging_pages=merging)

    def memory(self) -> EngineMemory:
        """What the engine spends on memory, part by part, and its profit net of that (engine/memory.py)."""
        return measure(self.scanner)

    def rmap_item(self, slot: Slot, index: int) -> RmapItem:
        """The reverse-map item of page ``index`` of ``slot`` (a view, for inspection)."""
        return self.scanner.rmap_item(slot, index)

    def mapped_pages(self, slot: Slot) -> int | None:
        """Pages of ``slot`` inside a mapping of its process now; None once the process is gone.

        For REGISTER's warning about a range mostly unmapped, and ``processes/PID/regions``.
        """
        return self.scanner.mapped_pages(slot)

    def survey(self, slot: Slot, *, runs: bool = False) -> PageSurvey:
        """The states of ``slot``'s pages, to be gathered by iterating its ``steps()`` (engine/pages.py)."""
        return PageSurvey(self.scanner.stable, slot, want_runs=runs)

    # -- scanning --------------------------------------------------------------------

    def interrupt_when(self, pending: Callable[[], bool] | None) -> None:
        """Let ``pending()`` end a batch early, between two pages, when it says something else should run.

        The driver (kksmd) passes the daemon's "is a request waiting on the
        CUSE channel?"; the engine only calls it, and knows nothing of what
        it asks.  None: batches run to their end (or their time budget).
        """
        self.scanner.interrupt_when(pending if pending is not None else _never)

    def interrupted(self) -> bool:
        """Ask the driver's ``pending()`` as the scanner does between pages (see :meth:`interrupt_when`).

        For the driver's own check between two steps: a yes counts as one
        the scanner met (it pauses the read-ahead, Scanner.interrupted).
        """
        return self.scanner.interrupted()

    def scan_step(self, budget: int) -> int:
        """Scan one batch (at most ``budget`` pages, about 0.5 ms of work); returns the pages stepped over."""
        return self.scanner.step(budget)

    def scan_now(self, npages: int, *, stop_at_wrap: bool = False) -> int:
        """Synchronously scan up to ``npages`` pages (tests, benchmarks); returns how many were stepped over.

        With ``stop_at_wrap``, stop as soon as a full scan completes.
        """
        done = 0
        tally = self.scanner.tally
        scans = tally.full_scans
        while done < npages and self.registry.live_pages > 0:
            done += self.scanner.step(npages - done)
            if stop_at_wrap and tally.full_scans != scans:
                break
        return done
