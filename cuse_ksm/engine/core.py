"""Registered memory, scanner parameters and the scanner itself (kksmd).

The 2009 driver keeps one global list of slots (``ksm_mem_slot``), each
{mm, addr, npages}, in registration order, and every SMA keeps the list of
the slots registered through it.  The scanner walks the global list; REMOVE
and the last close of an SMA drop every slot of that SMA.  This module keeps
the same two views: :attr:`Engine.slots` in registration order and
:attr:`Sma.slots` per area.

The scanner
-----------

While the run flag is set and ``pages_to_scan`` is not 0, :meth:`Engine.run`
scans ``pages_to_scan`` pages, sleeps ``sleep`` microseconds, and again;
otherwise it waits until woken.  Each page goes through
:meth:`Engine._scan_batch`, which is the emulator's cmp_and_merge_page:

1. a page that maps a shared page and still equals it is left alone; one
   that no longer equals it was written to (the kernel would have taken a
   COW fault): its item is dropped and it starts over on a later pass;
2. the stable tree is searched first: a page equal to a shared page joins
   it at once;
3. the checksum gate: a page whose digest moved since the last pass is
   volatile and goes no further;
4. a page unchanged for a full pass goes into the unstable tree, unless an
   identical page is already there, in which case both become sharers of a
   new shared page, which enters the stable tree;
5. a page seen for the first time only gets its digest remembered: merging
   needs two passes.

The emulator never writes the scanned process's memory.  "Merging" records
that the page maps a :class:`KsmPage` (one copy kept by the engine); the
figures are those the kernel would show.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from sortedcontainers import SortedDict
from xxhash import xxh3_64_intdigest

from cuse_ksm.abi import KSM_CONTROL_FLAGS_RUN, KthreadInfo
from cuse_ksm.engine.trees import (
    CHUNK_MASK,
    CHUNK_PAGES,
    CHUNK_SHIFT,
    ITEM,
    MERGED,
    NO_ITEM,
    PAGE_SHIFT,
    PAGE_SIZE,
    UNSTABLE,
    RmapChunk,
    RmapItem,
    StableTree,
    UnstableTree,
)

log = logging.getLogger(__name__)

# Maps a state byte to 1 if it is MERGED, else 0 (for bytes.translate).
_IS_MERGED = bytes(1 if b == MERGED else 0 for b in range(256))

# Work done between two trio checkpoints is at most one batch: one read of
# up to BATCH_PAGES pages (512 KiB) and their processing, about 0.5 ms, so
# an ioctl never waits much longer than that for the scanner to yield.
BATCH_PAGES = CHUNK_PAGES // 2
# ... and a batch stops early when it runs longer than this (merges re-read
# pages one at a time, which is slower than the common path).
BATCH_SECONDS = 0.0005
# The scanner yields to trio (lets the device answer ioctls) as soon as it
# has worked this long since it last yielded: with BATCH_SECONDS, no request
# waits for much more than 1 ms of scanning.
YIELD_SECONDS = 0.0005


class AddressSpace(Protocol):
    """The memory of one registered process, pinned at registration.

    Implementations hold handles bound to the process's address space (not
    to its pid), so that a later read can never reach another process that
    reuses the pid.  ``tgid`` is for display and grouping only.

    The scanner needs the two reading methods; the device layer only opens
    and closes spaces.
    """

    tgid: int

    def close(self) -> None: ...

    def read_pages(self, addr: int, npages: int, into: mmap.mmap) -> bytes | None:
        """Copy the present pages of [addr, addr + npages pages) into ``into``.

        Returns one byte per page, 1 where the page was present and copied to
        ``into[i * PAGE_SIZE:]``, 0 where it was not (nothing is faulted in);
        None once the address space is gone for good.
        """
        ...

    def read_page(self, addr: int) -> bytes | None:
        """The page at ``addr`` if it is present, else None."""
        ...


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
    # Set when the slot left the engine, or its address space died.
    gone: bool = False

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


@dataclass(frozen=True)
class Counters:
    """What later kernels show under /sys/kernel/mm/ksm (see SPEC section 4)."""

    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    full_scans: int
    pages_scanned: int
    max_kernel_pages: int

    @property
    def kernel_pages_allocated(self) -> int:
        """The 2009 v4 name of pages_shared."""
        return self.pages_shared


class Engine:
    """The state the ioctls steer, and the scanner that acts on it."""

    def __init__(self) -> None:
        # Initial values of the 2009 driver: scanner idle until START_STOP.
        self._kthread = KthreadInfo(sleep=0, pages_to_scan=0, flags=0)
        self.slots: list[Slot] = []
        self.smas: dict[int, Sma] = {}
        self._sma_ids = itertools.count(1)
        self._slot_seqs = itertools.count(1)
        # Limit on shared pages (the v4 patch's max_kernel_pages); 0 = none.
        self.max_kernel_pages = 0

        # The scan ring: slots by registration sequence number.  The cursor
        # remembers the sequence number of the slot it is in, and a sorted
        # map finds "the first slot after it" even when that slot has been
        # removed meanwhile, or new ones were appended: the cursor survives
        # both without a rescan from the start.
        self._ring: SortedDict = SortedDict()
        self._cursor_seq = 0  # 0: before the first slot
        self._cursor_idx = 0
        # Unstable-tree slot numbers (Slot.no): index -> slot.
        self._numbered: list[Slot | None] = [None]
        self._live_pages = 0

        self.stable = StableTree()
        self.unstable = UnstableTree()
        self._items = 0  # reverse-map items (pages seen present)
        self._unshared = 0  # items in state UNSTABLE
        self._sharers = 0  # items in state MERGED
        self._full_scans = 0
        self._pages_scanned = 0
        self.errors = 0  # unexpected exceptions caught in the scanner
        # The page being scanned, for the unstable tree's match check.
        self._candidate_page: memoryview = memoryview(b"")
        self._candidate_checksum = 0

        # One page-aligned buffer for all batch reads, and a view of each of
        # its pages, made once (slicing a memoryview copies nothing).
        self._buf = mmap.mmap(-1, BATCH_PAGES * PAGE_SIZE)
        view = memoryview(self._buf)
        self._pages = [view[o : o + PAGE_SIZE] for o in range(0, BATCH_PAGES * PAGE_SIZE, PAGE_SIZE)]
        # Wake-ups: the idle wait ends on any change; the sleep between two
        # rounds ends on a change of parameters only (START_STOP).
        self._idle_event = trio.Event()
        self._params_event = trio.Event()

    # -- kthread parameters (START_STOP_KTHREAD / GET_INFO_KTHREAD) ----------

    @property
    def kthread(self) -> KthreadInfo:
        """sleep (µs), pages_to_scan and flags as GET_INFO_KTHREAD reports them."""
        return self._kthread

    def set_kthread(self, sleep: int, pages_to_scan: int, flags: int) -> None:
        """Store new parameters and wake the scanner so they take effect now."""
        self._kthread = KthreadInfo(sleep=sleep, pages_to_scan=pages_to_scan, flags=flags)
        self._params_event.set()
        self._wake()

    def _wake(self) -> None:
        """Called whenever parameters or slots change: an idle scanner looks again."""
        self._idle_event.set()

    # -- shared memory areas and their slots ---------------------------------

    def new_sma(self) -> Sma:
        sma = Sma(next(self._sma_ids))
        self.smas[sma.id] = sma
        return sma

    def register(self, sma: Sma, space: AddressSpace, addr: int, npages: int) -> Slot:
        """Record a slot; the seed validates neither addr nor npages, nor do we."""
        if sma.id not in self.smas:
            raise LookupError(f"SMA {sma.id} was released")
        slot = Slot(sma=sma, space=space, addr=addr, npages=npages, seq=next(self._slot_seqs))
        self.slots.append(slot)
        sma.slots.append(slot)
        self._ring[slot.seq] = slot
        slot.no = len(self._numbered)
        self._numbered.append(slot)
        self._live_pages += npages
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
        self._ring.pop(slot.seq, None)
        self._drop_slot_items(slot)
        # As the 2009 driver does on removal, drop the whole unstable tree
        # rather than hunt for this slot's entries in it: its entries point
        # at items that no longer exist, and the tree is only a cache of one
        # pass's observations, rebuilt by the next pass.  The price is that
        # pages elsewhere wait one more pass for a merge.
        self._reset_unstable()
        slot.space.close()

    def _drop_slot_items(self, slot: Slot) -> None:
        """Take every page of ``slot`` out of both trees; shared pages lose a sharer."""
        if not slot.gone:
            slot.gone = True
            self._live_pages -= slot.npages
        stable = self.stable
        by_id = stable.by_id
        for chunk in slot.chunks.values():
            state = chunk.state
            nmerged = state.count(MERGED)
            self._items -= CHUNK_PAGES - state.count(NO_ITEM)
            self._unshared -= state.count(UNSTABLE)
            if nmerged:
                self._sharers -= nmerged
                word = chunk.word
                # Count sharers per shared page in C (no Python loop over
                # the pages), then one update per shared page.
                ids = Counter(itertools.compress(word, state.tobytes().translate(_IS_MERGED)))
                for kid, n in ids.items():
                    kpage = by_id[kid]
                    kpage.sharers -= n
                    if kpage.sharers == 0:
                        stable.remove(kpage)
        slot.chunks = {}
        slot.pages_merged = 0

    def _space_gone(self, space: AddressSpace) -> None:
        """The process exited (or exec'd): its pages leave the trees; its slots stay registered."""
        for slot in self._ring.values():
            if slot.space is space and not slot.gone:
                self._drop_slot_items(slot)

    def _reset_unstable(self) -> None:
        # Expect roughly as many entries as there are items not merged.
        self.unstable.reset(self._items - self._sharers)
        self._numbered = [None]
        for slot in self._ring.values():
            slot.no = len(self._numbered)
            self._numbered.append(slot)

    # -- counters ---------------------------------------------------------------

    def counters(self) -> Counters:
        shared = len(self.stable)
        return Counters(
            pages_shared=shared,
            pages_sharing=self._sharers - shared,
            pages_unshared=self._unshared,
            pages_volatile=self._items - self._sharers - self._unshared,
            full_scans=self._full_scans,
            pages_scanned=self._pages_scanned,
            max_kernel_pages=self.max_kernel_pages,
        )

    def merged_pages_by_tgid(self) -> dict[int, int]:
        """Pages of each registered process that currently map a shared page."""
        out: dict[int, int] = {}
        for slot in self.slots:
            out[slot.space.tgid] = out.get(slot.space.tgid, 0) + slot.pages_merged
        return out

    def rmap_item(self, slot: Slot, index: int) -> RmapItem:
        """The reverse-map item of page ``index`` of ``slot`` (a view, for inspection)."""
        chunk = slot.chunks.get(index >> CHUNK_SHIFT)
        k = index & CHUNK_MASK
        state = chunk.state[k] if chunk is not None else NO_ITEM
        if state == NO_ITEM:
            return RmapItem(slot, index, NO_ITEM, None, None)
        assert chunk is not None
        if state == MERGED:
            kpage = self.stable.by_id[chunk.word[k]]
            return RmapItem(slot, index, state, kpage.checksum, kpage)
        return RmapItem(slot, index, state, chunk.word[k], None)

    # -- the scan loop ----------------------------------------------------------

    def _running(self) -> bool:
        k = self._kthread
        return bool(k.flags & KSM_CONTROL_FLAGS_RUN) and k.pages_to_scan > 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """kksmd: scan while told to run, idle otherwise.  Never returns; cancel it to stop."""
        task_status.started()
        while True:
            if not self._running() or self._live_pages <= 0:
                # No await between the test above and creating the event:
                # a wake-up cannot slip in between and be lost.
                self._idle_event = trio.Event()
                await self._idle_event.wait()
                continue
            k = self._kthread
            await self.scan(k.pages_to_scan)
            if self._kthread is not k:
                continue  # new parameters: act on them now
            if k.sleep:
                self._params_event = trio.Event()
                with trio.move_on_after(k.sleep / 1e6):
                    await self._params_event.wait()
            else:
                await trio.lowlevel.checkpoint()

    async def scan(self, npages: int) -> None:
        """One round: scan up to ``npages`` pages, yielding to trio after every batch.

        A stop (or any change of parameters) takes effect at the next batch.
        """
        params = self._kthread
        left = npages
        clock = time.perf_counter
        next_yield = clock() + YIELD_SECONDS
        while left > 0 and self._live_pages > 0:
            left -= self._scan_step(left)
            # A checkpoint costs ~15 us; yielding after every batch would add
            # 5-10 % to a pass.  Yield once the work since the last yield
            # reaches YIELD_SECONDS (a batch is at most BATCH_SECONDS more).
            if clock() >= next_yield:
                await trio.lowlevel.checkpoint()
                next_yield = clock() + YIELD_SECONDS
                if self._kthread is not params:
                    return
        await trio.lowlevel.checkpoint()

    def scan_now(self, npages: int, *, stop_at_wrap: bool = False) -> int:
        """Synchronously scan up to ``npages`` pages (tests, benchmarks); returns how many were stepped over.

        With ``stop_at_wrap``, stop as soon as a full scan completes.
        """
        done = 0
        scans = self._full_scans
        while done < npages and self._live_pages > 0:
            done += self._scan_step(npages - done)
            if stop_at_wrap and self._full_scans != scans:
                break
        return done

    def _scan_step(self, budget: int) -> int:
        """Scan one batch at the cursor (at most ``budget`` pages); returns the pages stepped over.

        Pages count against the budget whether present or not, as the
        driver's loop counted addresses.  Slots whose process is gone, and
        empty slots, cost nothing.
        """
        slot = self._ring.get(self._cursor_seq)
        if slot is None or slot.gone or self._cursor_idx >= slot.npages:
            slot = self._advance()
            if slot is None:
                return 0
        idx = self._cursor_idx
        # BATCH_PAGES divides CHUNK_PAGES: a batch never straddles two chunks.
        n = min(budget, slot.npages - idx, BATCH_PAGES - (idx & (BATCH_PAGES - 1)))
        try:
            n = self._scan_batch(slot, idx, n)
        except Exception:
            # The scanner must outlive anything a scanned process does to it;
            # a bug here skips the batch and is counted, not fatal.
            self.errors += 1
            log.exception("scanner: batch at slot %d page %d failed; skipped", slot.seq, idx)
        self._cursor_idx = idx + n
        if self._cursor_idx >= slot.npages:
            self._advance()
        return n

    def _advance(self) -> Slot | None:
        """Move the cursor to the start of the next live slot, wrapping at the end.

        A wrap completes a full scan: the unstable tree is emptied, as the
        driver does, so no entry in it is older than one pass.
        """
        ring = self._ring
        if not ring:
            return None
        i = ring.bisect_right(self._cursor_seq)
        wrapped = False
        while True:
            if i >= len(ring):
                if wrapped:
                    return None  # no live slot with pages
                wrapped = True
                i = 0
                if self._cursor_seq:
                    self._full_scans += 1
                    self._reset_unstable()
                self._cursor_seq = 0
            seq = ring.keys()[i]
            slot: Slot = ring[seq]
            if not slot.gone and slot.npages > 0:
                self._cursor_seq = seq
                self._cursor_idx = 0
                return slot
            i += 1

    # -- cmp_and_merge_page, one batch at a time ---------------------------------

    def _scan_batch(self, slot: Slot, idx: int, n: int) -> int:
        """Read pages [idx, idx + n) of ``slot`` and run each present one through the algorithm.

        Returns how many pages were handled (n, unless the time budget cut
        the batch short).  This is the emulator's hot loop: counters are kept
        in locals and folded in at the end, and the unstable tree's probe is
        inlined (UnstableTree.search_insert is the same code, documented).
        """
        space = slot.space
        present = space.read_pages(slot.base + (idx << PAGE_SHIFT), n, self._buf)
        if present is None:
            self._space_gone(space)
            return n
        ci = idx >> CHUNK_SHIFT
        k0 = idx & CHUNK_MASK
        chunk = slot.chunks.get(ci)
        if chunk is None:
            if 1 not in present:
                return n
            chunk = slot.chunks[ci] = RmapChunk()
        state = chunk.state
        word = chunk.word
        pages = self._pages
        stable = self.stable
        stable_get = stable.by_checksum.get
        by_id = stable.by_id
        ut = self.unstable
        tags, locs, mask = ut.arrays()
        # The table grows once more than half full: after `room` more inserts.
        room = (mask + 1) // 2 - len(ut)
        hash64 = xxh3_64_intdigest
        clock = time.perf_counter
        deadline = clock() + BATCH_SECONDS
        loc0 = (slot.no << 32) | idx
        d_items = d_unshared = d_sharers = d_merged = scanned = inserted = 0

        for j in range(n):
            if j and not j & 31 and clock() > deadline:
                n = j
                break
            k = k0 + j
            st = state[k]
            if not present[j]:
                # Not present (never touched, swapped, or unmapped): skipped,
                # and an item it had leaves the trees, as if the page were new.
                if st != NO_ITEM:
                    self._drop_item(slot, chunk, k)
                continue
            scanned += 1
            page = pages[j]
            h = hash64(page)

            if st == MERGED:
                kpage = by_id[word[k]]
                if h == kpage.checksum and page.tobytes() == kpage.data:
                    continue  # still maps its shared page
                # It was written to: the kernel would have taken a COW fault
                # and given it a private copy.  Drop the item and let the page
                # start over next pass, as the driver does after a COW.
                self._drop_item(slot, chunk, k)
                continue

            if st == UNSTABLE:
                # Its entry went with the unstable tree at the last wrap.
                d_unshared -= 1
                state[k] = st = ITEM

            kpage = stable_get(h)
            if kpage is not None:
                # Stable tree first: its pages cannot change, so a match on
                # the full content is a merge that stays valid.
                data = page.tobytes()
                while kpage is not None and kpage.data != data:
                    kpage = kpage.next
                if kpage is not None:
                    if st == NO_ITEM:
                        d_items += 1
                    state[k] = MERGED
                    word[k] = kpage.id
                    kpage.sharers += 1
                    d_sharers += 1
                    d_merged += 1
                    continue

            if st == NO_ITEM:
                # First sight: remember its digest; it may enter the unstable
                # tree next pass if it has not changed by then.
                state[k] = ITEM
                word[k] = h
                d_items += 1
                continue
            if word[k] != h:
                # Checksum gate: changed since last pass, too volatile to be
                # worth a place in the unstable tree.
                word[k] = h
                continue

            # The unstable tree: search, and insert if nothing matches.
            tag = h >> 32
            i = tag & mask
            cand = locs[i]
            while cand:
                if tags[i] == tag:
                    self._candidate_page = page
                    self._candidate_checksum = h
                    if self._same_as_candidate(cand):
                        break
                i = (i + 1) & mask
                cand = locs[i]
            if not cand:
                tags[i] = tag
                locs[i] = loc0 + j
                inserted += 1
                state[k] = UNSTABLE
                d_unshared += 1
                if inserted > room:
                    ut.add_count(inserted)
                    inserted = 0
                    ut.grow()
                    tags, locs, mask = ut.arrays()
                    room = (mask + 1) // 2 - len(ut)
            else:
                # Fold the local counters in first: _merge_pair updates them too.
                self._unshared += d_unshared
                d_unshared = 0
                self._merge_pair(slot, chunk, k, h, page.tobytes(), cand)
        ut.add_count(inserted)
        self._items += d_items
        self._unshared += d_unshared
        self._sharers += d_sharers
        slot.pages_merged += d_merged
        self._pages_scanned += scanned
        return n

    def _drop_item(self, slot: Slot, chunk: RmapChunk, k: int) -> None:
        """Remove the item of page k of ``chunk`` from whatever tree holds it."""
        st = chunk.state[k]
        if st == MERGED:
            kpage = self.stable.by_id[chunk.word[k]]
            self._sharers -= 1
            slot.pages_merged -= 1
            kpage.sharers -= 1
            if kpage.sharers == 0:
                # Its last sharer left: the shared page is freed.
                self.stable.remove(kpage)
        elif st == UNSTABLE:
            # Its entry in the unstable tree, if still there, turns stale: the
            # state check in _same_as_candidate ignores it.
            self._unshared -= 1
        if st != NO_ITEM:
            self._items -= 1
        chunk.state[k] = NO_ITEM
        chunk.word[k] = 0

    def _locate(self, loc: int) -> tuple[Slot, RmapChunk, int] | None:
        slot = self._numbered[loc >> 32] if (loc >> 32) < len(self._numbered) else None
        if slot is None or slot.gone:
            return None
        idx = loc & 0xFFFFFFFF
        chunk = slot.chunks.get(idx >> CHUNK_SHIFT)
        if chunk is None:
            return None
        return slot, chunk, idx & CHUNK_MASK

    def _same_as_candidate(self, loc: int) -> bool:
        """Unstable-tree match check: is the page at ``loc`` still there and identical?

        The entry only says the page had this digest when it went in.  Its
        process may have written it since, so we read it again and compare
        every byte with the page being scanned; only then may they merge.
        """
        found = self._locate(loc)
        if found is None:
            return False
        slot, chunk, k = found
        if chunk.state[k] != UNSTABLE or chunk.word[k] != self._candidate_checksum:
            return False
        data = slot.space.read_page(slot.base + ((loc & 0xFFFFFFFF) << PAGE_SHIFT))
        return data is not None and data == self._candidate_page.tobytes()

    def _merge_pair(self, slot: Slot, chunk: RmapChunk, k: int, h: int, data: bytes, other: int) -> None:
        """Two identical pages met in the unstable tree: make them sharers of a new shared page."""
        limit = self.max_kernel_pages
        if limit and len(self.stable) >= limit:
            # At the limit no new shared page is made; the page stays out of
            # both trees this pass (the driver's failed merge does the same).
            return
        found = self._locate(other)
        assert found is not None  # _same_as_candidate just confirmed it
        slot2, chunk2, k2 = found
        kpage = self.stable.insert(h, data)
        # The other page leaves the unstable tree (its entry turns stale).
        self._unshared -= 1
        chunk2.state[k2] = MERGED
        chunk2.word[k2] = kpage.id
        slot2.pages_merged += 1
        chunk.state[k] = MERGED
        chunk.word[k] = kpage.id
        slot.pages_merged += 1
        kpage.sharers = 2
        self._sharers += 2
