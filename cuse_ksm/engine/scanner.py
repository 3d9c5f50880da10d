"""The scanner (the 2009 driver's kksmd without its thread): the scan cursor and the per-page algorithm.

:meth:`Scanner.step` scans one batch of pages at the cursor; whoever drives
the scanner decides how many pages a round holds and when it runs (the
daemon's trio task, cuse_ksm/kksmd.py, or :meth:`Engine.scan_now`).  Each
page goes through :meth:`Scanner._scan_batch`, the emulator's
cmp_and_merge_page:

1. a page that maps a shared page and still equals it is left alone; one
   that no longer equals it was written to (the kernel would have taken a
   COW fault): its item is dropped and it starts over on a later pass;
2. the stable tree is searched first (:meth:`StableTree.find`): a page
   equal to a shared page joins it at once;
3. the checksum gate: a page whose digest moved since the last pass is
   volatile and goes no further;
4. a page unchanged for a full pass goes into the unstable tree, unless an
   identical page is already there (:meth:`UnstableTree.search_insert`), in
   which case both become sharers of a new shared page, which enters the
   stable tree;
5. a page seen for the first time only gets its digest remembered: merging
   needs two passes.

The emulator never writes the scanned process's memory.  "Merging" records
that the page maps a :class:`KsmPage` (one copy kept by the engine); the
figures are those the kernel would show.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import mmap
import re
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable

from xxhash import xxh3_64_intdigest

from cuse_ksm.abi import PAGE_COPIED, PAGE_SIZE, PAGE_UNREADABLE, PAGE_ZERO
from cuse_ksm.engine.counters import Tally
from cuse_ksm.engine.registry import AddressSpace, PendingRead, Registry, Slot
from cuse_ksm.engine.trees import (
    CHUNK_MASK,
    CHUNK_PAGES,
    CHUNK_SHIFT,
    ITEM,
    ITEM_MASK,
    LIMITED,
    MERGED,
    NO_ITEM,
    PAGE_SHIFT,
    UNREADABLE,
    UNSTABLE,
    VOLATILE,
    WRITTEN,
    ZERO_PAGE,
    RmapChunk,
    RmapItem,
    StableTree,
    UnstableTree,
    count_items,
)

log = logging.getLogger(__name__)

# Maps a state byte to 1 if it is MERGED, else 0 (for bytes.translate).
_IS_MERGED = bytes(1 if b == MERGED else 0 for b in range(256))
# What a read found (cuse_ksm.abi.PAGE_*), as bytes.translate tables: the
# pages it copied (1) and the others (0), as the hot loop takes them; and
# the state a page with no item keeps for it (zero page, unreadable), else 0.
_IS_COPIED = bytes(1 if b == PAGE_COPIED else 0 for b in range(256))
_ABSENT_STATE = bytes({PAGE_ZERO: ZERO_PAGE, PAGE_UNREADABLE: UNREADABLE}.get(b, 0) for b in range(256))
_PLAIN_READ = bytes((0, PAGE_COPIED))  # what a read without zero or unreadable pages holds
_MARKS = re.compile(rb"[^\x00]+")
_NO_ITEMS = array("B", bytes(CHUNK_PAGES))
_ITEMS = array("B", bytes((ITEM,)) * CHUNK_PAGES)
_UNSTABLES = array("B", bytes((UNSTABLE,)) * CHUNK_PAGES)
_GATE_STATES = bytes((ITEM, UNSTABLE))  # a page in one of these states, unchanged, goes to the unstable tree

# A batch is up to BATCH_PAGES pages (512 KiB) of a window read and their
# processing, about 0.5 ms: the unit of work between two chances for the
# daemon to answer a request (see kksmd.py).
BATCH_PAGES = CHUNK_PAGES // 2
# ... and a batch stops early when it runs longer than this (merges re-read
# pages one at a time, which is slower than the common path).
BATCH_SECONDS = 0.0005
# ... or when the scanner's driver says something else is waiting to run
# (Scanner.interrupt_when: in the daemon, a request on the CUSE channel).  It is
# asked every INTERRUPT_PAGES pages, and not before that many pages of the
# batch are done, so that a driver that always has something waiting (a
# client calling ioctls back to back) still lets the scan move on.
INTERRUPT_PAGES = 16
# Pages are read a window at a time, the next window while the scanner
# works on this one (Scanner._window): 2 MiB, which still stays in the
# CPU's cache until its batches are done.
WINDOW_PAGES = 4 * BATCH_PAGES
# No page is taken from a read made longer ago than this: a round cut short
# (the scanner stopped, new parameters) leaves a window behind, and what is
# scanned after a pause must be what the memory holds then.
WINDOW_SECONDS = 0.01
# ... and none is started for this long after a request interrupted the
# scanner: the copy runs on the other CPU, where the clients that call us
# run (on 2 CPUs, reading ahead while a client calls ioctls back to back
# made the p99 of its round trips 3x worse, docs/benchmarks.md row 10).
AHEAD_PAUSE = 0.01
# ... and meanwhile a batch's pages are read this many at a time: no read
# ahead, so the scanner copies them itself, and a request that arrives
# during a copy waits for all of it (128 pages: 150-250 us here).
ASKED_READ_PAGES = 2 * INTERRUPT_PAGES
# A copy still being made when the scanner needs it is waited for in slices
# of this long, the driver asked between two: the copy usually takes well
# under a millisecond, but one whose kernel worker is not running can take
# 10 ms, and a request waiting meanwhile must not (docs/benchmarks.md row 13).
COPY_WAIT_SLICE = 0.00005


def _never() -> bool:
    return False


class _Window:
    """Pages [lo, hi) of ``slot`` read into buffer ``buf`` (0 or 1) at ``t``, while the scanner's epoch was ``epoch``.

    ``read`` is the read of the window ahead (its copy may be in flight),
    ``found`` what the current window's read returned.
    """

    __slots__ = ("buf", "epoch", "found", "hi", "lo", "read", "slot", "t")

    def __init__(self, slot: Slot, lo: int, hi: int, buf: int, epoch: int, t: float, read: PendingRead | None) -> None:
        self.slot = slot
        self.lo = lo
        self.hi = hi
        self.buf = buf
        self.epoch = epoch
        self.t = t
        self.read = read
        self.found: bytes | None = None

    def fresh(self, slot: Slot, epoch: int, now: float) -> bool:
        """May the cursor in ``slot`` at ``epoch`` use this window at ``now``?  (Its pages are the caller's test.)"""
        return self.slot is slot and self.epoch == epoch and now - self.t < WINDOW_SECONDS


class Scanner:
    """The two trees, the reverse-map items' tally, and the cursor that walks the registry's ring."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.stable = StableTree()
        self.unstable = UnstableTree(self._entry_digest)
        self.tally = Tally()
        # Limit on shared pages (the v4 patch's max_kernel_pages); 0 = none.
        self.max_kernel_pages = 0
        # Asked between pages of a batch: True ends the batch early, at the
        # page it has reached (see INTERRUPT_PAGES).  Set by the driver
        # (interrupt_when); a True also pauses the read-ahead.
        self._pending: Callable[[], bool] = _never
        self._ahead_from = 0.0  # no read ahead starts before this (AHEAD_PAUSE)
        # The cursor: the ring key of the slot it is in, and the page index.
        self._cursor_seq = 0  # 0: before the first slot
        self._cursor_idx = 0
        # Unstable-tree slot numbers (Slot.no): index -> slot.
        self.numbered: list[Slot | None] = [None]
        # The mapped runs of the cursor's slot, as page indexes (lows, highs),
        # read when the cursor enters it (see _at_mapped); None: not read yet.
        self._spans: tuple[list[int], list[int]] | None = None
        # The pass under way has scanned a batch (met a page inside a mapping).
        self._pass_met_mapped = False
        # Two page-aligned buffers of a window each, the current window's and
        # the one read ahead, and a view of each of their pages, made once
        # (slicing a memoryview copies nothing).
        self._bufs = (mmap.mmap(-1, WINDOW_PAGES * PAGE_SIZE), mmap.mmap(-1, WINDOW_PAGES * PAGE_SIZE))
        views = [memoryview(buf) for buf in self._bufs]  # one each: its pages' views share it
        self._views = tuple(
            [view[o : o + PAGE_SIZE] for o in range(0, WINDOW_PAGES * PAGE_SIZE, PAGE_SIZE)] for view in views
        )
        # The window the batches are carved from, and the read of the next.
        self._win: _Window | None = None
        self._ahead: _Window | None = None
        # Bumped whenever pages or slot numbers may have changed under a
        # window (a slot numbered, forgotten, or its process gone): a window
        # read before is not used after.
        self._epoch = 0

    def interrupt_when(self, pending: Callable[[], bool]) -> None:
        """Have the scanner ask ``pending()`` between pages: True ends the batch (see INTERRUPT_PAGES)."""
        self._pending = pending

    def interrupted(self) -> bool:
        """Ask the driver's ``pending()``; a yes also pauses the read-ahead for AHEAD_PAUSE."""
        if self._pending():
            self._ahead_from = time.perf_counter() + AHEAD_PAUSE
            return True
        return False

    # -- slots coming and going ------------------------------------------------------

    def number(self, slot: Slot) -> None:
        """Give a new slot its number for the unstable tree's ``loc`` values."""
        self._epoch += 1
        slot.no = len(self.numbered)
        self.numbered.append(slot)

    def forget(self, slots: list[Slot]) -> None:
        """``slots`` left the registry: their pages leave both trees."""
        if not slots:
            return
        self._epoch += 1
        for slot in slots:
            self._drop_slot_items(slot)
        # As the 2009 driver does on removal, drop the whole unstable tree
        # rather than hunt for these slots' entries in it: its entries point
        # at items that no longer exist, and the tree is only a cache of one
        # pass's observations, rebuilt by the next pass.  The price is that
        # pages elsewhere wait one more pass for a merge.
        self._reset_unstable()

    def _drop_slot_items(self, slot: Slot) -> None:
        """Take every page of ``slot`` out of both trees; shared pages lose a sharer."""
        self.registry.retire(slot)
        tally = self.tally
        stable = self.stable
        by_id = stable.by_id
        for chunk in slot.chunks.values():
            state = chunk.state
            nmerged = state.count(MERGED)
            tally.items -= count_items(state)
            tally.unshared -= state.count(UNSTABLE)
            if nmerged:
                tally.sharers -= nmerged
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
        self._epoch += 1
        for slot in self.registry.ring.values():
            if slot.space is space and not slot.gone:
                self._drop_slot_items(slot)

    def _reset_unstable(self) -> None:
        # Expect roughly as many entries as there are items not merged.
        self.unstable.reset(self.tally.items - self.tally.sharers)
        self.numbered = [None]
        for slot in self.registry.ring.values():
            self.number(slot)

    def rmap_item(self, slot: Slot, index: int) -> RmapItem:
        """The reverse-map item of page ``index`` of ``slot`` (a view, for inspection)."""
        chunk = slot.chunks.get(index >> CHUNK_SHIFT)
        k = index & CHUNK_MASK
        state = chunk.state[k] if chunk is not None else NO_ITEM
        if not state & ITEM_MASK:
            return RmapItem(slot, index, state, None, None)
        assert chunk is not None
        if state == MERGED:
            kpage = self.stable.by_id[chunk.word[k]]
            return RmapItem(slot, index, state, kpage.checksum, kpage)
        return RmapItem(slot, index, state, chunk.word[k], None)

    def buffer_bytes(self) -> int:
        """The two read buffers and their page views: the scanner's fixed cost, whatever is registered."""
        return sum(len(buf) for buf in self._bufs) + sum(
            sys.getsizeof(pages) + sum(map(sys.getsizeof, pages)) for pages in self._views
        )

    def rmap_items(self, slot: Slot) -> int:
        """How many reverse-map items ``slot`` holds (its pages seen present), for per-process figures.

        Counted from the state bytes at C speed, one join and one count,
        so that the hot loop keeps no per-slot tally.
        """
        return count_items(b"".join(chunk.state for chunk in slot.chunks.values()))

    # -- the cursor -----------------------------------------------------------------

    def step(self, budget: int) -> int:
        """Scan one batch at the cursor (at most ``budget`` pages); returns the pages it counts against the budget.

        Pages inside a mapping count whether present or not, as the
        driver's loop counted addresses.  Holes - pages of a region in no
        mapping of its process - are passed over at once and cost nothing,
        as today's kernel skips them walking VMAs (:meth:`_at_mapped`).
        Slots whose process is gone, and empty slots, cost nothing.  A
        step that passes a hole up to the end of the last region stops at
        the wrap, as a batch there would: it returns 0, or ``budget`` if
        the pass just ended met no mapped page at all (nothing to scan
        anywhere: the round ends, as the kernel's scan ends with an empty
        pass, rather than spin).
        """
        met, scans = self._pass_met_mapped, self.tally.full_scans
        at = self._settle()
        if at is None:
            # At the wrap (or nothing is registered that can be scanned).
            return 0 if met or self.tally.full_scans == scans else budget
        slot, end = at
        self._pass_met_mapped = True
        idx = self._cursor_idx
        # BATCH_PAGES divides CHUNK_PAGES: a batch never straddles two chunks.
        n = min(budget, end - idx, BATCH_PAGES - (idx & (BATCH_PAGES - 1)))
        try:
            n = self._scan_batch(slot, idx, n, end, budget)
            if idx + n > slot.visited:
                slot.visited = idx + n
        except Exception:
            # The scanner must outlive anything a scanned process does to it;
            # a bug here skips the batch and is counted, not fatal.
            self.tally.errors += 1
            log.exception("scanner: batch at slot %d page %d failed; skipped", slot.seq, idx)
        self._cursor_idx = idx + n
        if self._cursor_idx >= end:
            self._settle()
        return n

    def _settle(self) -> tuple[Slot, int] | None:
        """Move the cursor on to the next mapped page; returns its slot and the end of its mapped run.

        None when it stopped at the wrap, or nothing is live.  Called at the
        start of a step and after a batch that ended a mapped run, so a pass
        ends with the step that scans its last mapped page, as the 2009
        loop's ended with its last address, even when holes or the regions
        of an exited process follow that page (they cost nothing): a round
        of exactly a pass's pages is one pass, and ``full_scans`` moves when
        that round ends, not at the start of the next.  It stops at the
        wrap: no mapping of the next pass is read before its first step.
        """
        scans = self.tally.full_scans
        while True:
            slot = self.registry.ring.get(self._cursor_seq)
            if slot is None or slot.gone or self._cursor_idx >= slot.npages:
                slot = self._advance()
                if slot is None or self.tally.full_scans != scans:
                    return None
            end = self._at_mapped(slot)
            if end:
                return slot, end

    def _advance(self) -> Slot | None:
        """Move the cursor to the start of the next live slot, wrapping at the end.

        A wrap completes a full scan: the unstable tree is emptied, as the
        driver does, so no entry in it is older than one pass.
        """
        ring = self.registry.ring
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
                    self.tally.full_scans += 1
                    self._reset_unstable()
                    self._pass_met_mapped = False
                self._cursor_seq = 0
            seq = ring.keys()[i]
            slot: Slot = ring[seq]
            if not slot.gone and slot.npages > 0:
                self._cursor_seq = seq
                self._cursor_idx = 0
                self._spans = None  # its mappings are read when the cursor first needs them
                return slot
            i += 1

    # -- holes: pages in no mapping ---------------------------------------------------

    def _at_mapped(self, slot: Slot) -> int:
        """Move the cursor past any hole it is at; returns the end of the mapped run it is in then.

        0 when the rest of the slot is a hole (the cursor is then at the
        slot's end) or its process is gone.  The slot's mappings are read
        once each time the cursor enters it, so a mapping made or removed
        since is seen by the next pass at the latest; meanwhile a page
        unmapped reads as not present, as before.
        """
        spans = self._spans
        if spans is None:
            try:
                found = slot.space.mapped(slot.base, slot.npages)
            except Exception:
                # As a failed batch: counted and logged; the slot is then
                # scanned page by page, as if all of it were mapped.
                self.tally.errors += 1
                log.exception("scanner: the mappings of slot %d could not be read; all its pages are scanned", slot.seq)
                found = [(slot.base, slot.base + (slot.npages << PAGE_SHIFT))]
            if found is None:
                self._space_gone(slot.space)
                return 0
            spans = self._spans = _page_spans(found, slot.base, slot.npages)
        idx = self._cursor_idx
        lows, highs = spans
        i = bisect.bisect_right(highs, idx)
        start = lows[i] if i < len(lows) else slot.npages
        if start > idx:
            self._pass_hole(slot, idx, start)
        return highs[i] if i < len(highs) else 0

    def _pass_hole(self, slot: Slot, lo: int, hi: int) -> None:
        """Pages [lo, hi) of ``slot`` are in no mapping: the cursor passes them at once.

        What the per-page loop does to a page not present, in bulk: a page
        with an item loses it (its memory was unmapped since the last
        pass), a zero-page or unreadable mark goes; nothing else changes,
        and no page is counted as scanned.  Only chunks that exist are
        visited, so a hole of four billion pages costs as much as its chunks.
        """
        chunks = slot.chunks
        if chunks:
            c_lo, c_hi = lo >> CHUNK_SHIFT, ((hi - 1) >> CHUNK_SHIFT) + 1
            if c_hi - c_lo <= len(chunks):
                cis = [ci for ci in range(c_lo, c_hi) if ci in chunks]
            else:
                cis = sorted(ci for ci in chunks if c_lo <= ci < c_hi)
            for ci in cis:
                chunk = chunks[ci]
                first = ci << CHUNK_SHIFT
                a, b = max(lo, first) - first, min(hi, first + CHUNK_PAGES) - first
                state = chunk.state
                for m in _MARKS.finditer(state[a:b].tobytes()):
                    for k in range(a + m.start(), a + m.end()):
                        if state[k] & ITEM_MASK:
                            self._drop_item(slot, chunk, k)
                        else:
                            state[k] = NO_ITEM
        if hi > slot.visited:
            slot.visited = hi
        self._cursor_idx = hi

    def mapped_pages(self, slot: Slot) -> int | None:
        """How many pages of ``slot`` are inside a mapping of its process now (None: its process is gone)."""
        found = slot.space.mapped(slot.base, slot.npages)
        if found is None:
            return None
        lows, highs = _page_spans(found, slot.base, slot.npages)
        return sum(highs) - sum(lows)

    # -- cmp_and_merge_page, one batch at a time ---------------------------------

    def _window(self, slot: Slot, idx: int, n: int, end: int, budget: int) -> _Window | None:
        """The window holding pages [idx, idx + n) of ``slot`` (or their start), read now or ahead.

        A window is taken into use by the batch at its first page: the read
        of the next one starts then, in the other buffer, from the window's
        end to at most WINDOW_PAGES further, never past ``end`` (the mapped
        run: no slot, hole or wrap is read across) nor past the pages left
        in the round (``idx + budget``: a round that ends leaves no read
        behind).  A window, or a read ahead, is used only by the cursor that
        reaches it in the same slot and epoch, within WINDOW_SECONDS of its
        read; any other is dropped (a read ahead after its copy is done).
        No read ahead starts within AHEAD_PAUSE of a request's interrupt.

        None, when the read ahead is not done and ``interrupted()`` says a
        request waits, now or while the copy is waited for: the step ends
        there (0 pages) rather than make the request wait for the copy; the
        read is collected at the next step.
        """
        now = time.perf_counter()
        asked = now < self._ahead_from  # a request came within AHEAD_PAUSE
        win = self._win
        if win is not None:
            if win.fresh(slot, self._epoch, now) and win.lo <= idx < win.hi:
                return win
            self._win = win = None
        buf = 0
        ahead = self._ahead
        if ahead is not None:
            assert ahead.read is not None
            # Waited for in slices, asking between two whether a request
            # waits (COPY_WAIT_SLICE).
            timeout = 0.0
            while not ahead.read.ready(timeout):
                if self.interrupted():
                    return None
                timeout = COPY_WAIT_SLICE
            # Its copy is done once result() returns: its buffer is free.
            found = ahead.read.result()
            ahead.read = None
            self._ahead = None
            if ahead.fresh(slot, self._epoch, now) and ahead.lo == idx:
                ahead.found = found
                win = ahead
            buf = ahead.buf
        if win is None:
            # Nothing read ahead (a new mapped run, a slot, a pass, a window
            # dropped, or no read ahead since a request): this batch is read
            # now, as the window; only ASKED_READ_PAGES of it while requests
            # come (AHEAD_PAUSE), since a request waits for the whole read.
            if asked:
                n = min(n, ASKED_READ_PAGES)
            found = slot.space.read_pages(slot.base + (idx << PAGE_SHIFT), n, self._bufs[buf])
            win = _Window(slot, idx, idx + n, buf, self._epoch, now, None)
            win.found = found
        if win.found is None:
            return win  # the process is gone: nothing to read ahead
        self._win = win
        lo, hi = win.hi, min(end, win.hi + WINDOW_PAGES, idx + budget)
        if lo < hi and not asked:
            other = buf ^ 1
            try:
                read = slot.space.start_read(slot.base + (lo << PAGE_SHIFT), hi - lo, self._bufs[other])
            except Exception:
                # Not read ahead; the batch that needs these pages reads them
                # itself, and meets (and counts) the same failure.
                return win
            self._ahead = _Window(slot, lo, hi, other, self._epoch, time.perf_counter(), read)
        return win

    def _scan_batch(self, slot: Slot, idx: int, n: int, end: int, budget: int) -> int:
        """Read pages [idx, idx + n) of ``slot`` and run each present one through the algorithm.

        Returns how many pages were handled: n, unless the time budget cut
        the batch short or the window read ends before idx + n; 0 when
        the read ahead is not done and a request waits (see _window).  This
        is the emulator's hot loop: counters are kept in locals and folded
        in at the end, and the tree methods it calls per page are bound
        once per batch.
        """
        space = slot.space
        win = self._window(slot, idx, n, end, budget)
        if win is None:
            return 0
        if win.found is None:
            self._win = None
            self._space_gone(space)
            return n
        off = idx - win.lo
        n = min(n, win.hi - idx)
        found = win.found[off : off + n]
        pages = self._views[win.buf][off : off + n]
        # Zero pages and unreadable ones are rare: the loop takes them as not
        # present, and their state is set after it (_mark_absent).
        present = found if not found.translate(None, _PLAIN_READ) else found.translate(_IS_COPIED)
        ci = idx >> CHUNK_SHIFT
        k0 = idx & CHUNK_MASK
        chunk = slot.chunks.get(ci)
        if chunk is None:
            if 1 not in present:
                if present is not found:
                    chunk = slot.chunks[ci] = RmapChunk(items=False)
                    self._mark_absent(chunk, k0, found)
                return n
            chunk = slot.chunks[ci] = RmapChunk()
        elif not chunk.word and 1 in present:
            chunk.hold_items()
        state = chunk.state
        word = chunk.word
        # Every page's digest in one call, in C: a wasted hash of an absent
        # page's stale buffer costs less than a Python step per page.
        hashes = list(map(xxh3_64_intdigest, pages[:n]))
        if (
            present is found
            and found.count(PAGE_COPIED) == n
            and state[k0 : k0 + n] == _NO_ITEMS[:n]
            and self.stable.digests.isdisjoint(hashes)
        ):
            # A batch seen for the first time (a new region's first pass):
            # every page only gets its digest remembered (step 5), which the
            # loop below would do page by page.  The stable tree is searched
            # first in the loop; no page of this batch can match it (no digest
            # in common), so skipping that search changes nothing.
            word[k0 : k0 + n] = array("Q", hashes)
            state[k0 : k0 + n] = _ITEMS[:n]
            self.tally.items += n
            self.tally.pages_scanned += n
            return n
        by_id = self.stable.by_id
        stable_digests = self.stable.digests
        stable_find = self.stable.find
        unstable_search_insert = self.unstable.search_insert
        same = self._same_page
        clock = time.perf_counter
        deadline = clock() + BATCH_SECONDS
        interrupt = self.interrupted
        loc0 = (slot.no << 32) | idx
        d_items = d_unshared = d_sharers = d_merged = scanned = 0

        j0 = 0  # the loop below starts here
        if (
            present is found
            and found.count(PAGE_COPIED) == n
            and not state[k0 : k0 + n].tobytes().translate(None, _GATE_STATES)
            and word[k0 : k0 + n] == array("Q", hashes)
            and stable_digests.isdisjoint(hashes)
        ):
            # Every page is present, has an item in no tree (or went into the
            # unstable tree last pass) and the digest it had then, and none
            # can match the stable tree: each passes the checksum gate and
            # goes to the unstable tree (step 4), which the loop below would
            # find out page by page.  A match makes a new shared page, which a
            # later page of the batch may equal: from there on the loop below,
            # which searches the stable tree first, takes over.
            # A run of INTERRUPT_PAGES pages at a time goes to the table in one
            # call (UnstableTree.insert_run: no Python call per page).  Its
            # state bytes say UNSTABLE before the call, as they would page by
            # page, so that a page may meet an earlier one of the same run;
            # from a match on, they get back what they were.
            insert_run = self.unstable.insert_run
            j0 = 0
            while j0 < n:
                if j0 and (clock() > deadline or interrupt()):
                    n = j0
                    break
                stop = min(n, j0 + INTERRUPT_PAGES)
                was = state[k0 + j0 : k0 + stop]
                state[k0 + j0 : k0 + stop] = _UNSTABLES[: stop - j0]
                j, other = insert_run(hashes, j0, stop, loc0, pages, same)
                d_unshared += (j - j0) - was[: j - j0].count(UNSTABLE)
                if not other:
                    j0 = stop
                    continue
                state[k0 + j : k0 + stop] = was[j - j0 :]
                k = k0 + j
                if state[k] == UNSTABLE:
                    d_unshared -= 1
                    state[k] = ITEM
                self.tally.unshared += d_unshared
                d_unshared = 0
                self._merge_pair(slot, chunk, k, hashes[j], pages[j].tobytes(), other)
                j0 = j + 1
                break
            scanned = j0

        for j in range(j0, n):
            # Stopping between two pages is always safe: the batch's counts
            # are folded in below for the pages done, and the cursor moves
            # past those only (step), so the rest is scanned next time.
            if j and not j & (INTERRUPT_PAGES - 1) and (clock() > deadline or interrupt()):
                n = j
                break
            k = k0 + j
            st = state[k]
            if not present[j]:
                # Not present (never touched, swapped, or unmapped): skipped,
                # and an item it had leaves the trees, as if the page were new.
                if st:
                    if st & ITEM_MASK:
                        self._drop_item(slot, chunk, k)
                    else:
                        state[k] = NO_ITEM
                continue
            scanned += 1
            page = pages[j]
            h = hashes[j]

            if st == MERGED:
                kpage = by_id[word[k]]
                if h == kpage.checksum and page.tobytes() == kpage.data:
                    continue  # still maps its shared page
                # It was written to: the kernel would have taken a COW fault
                # and given it a private copy.  Drop the item and let the page
                # start over next pass, as the driver does after a COW.
                self._drop_item(slot, chunk, k)
                state[k] = WRITTEN
                continue

            if st == UNSTABLE:
                # Its entry went with the unstable tree at the last wrap.
                d_unshared -= 1
                state[k] = st = ITEM

            # Stable tree first: its pages cannot change, so a match on the
            # full content is a merge that stays valid.
            if h in stable_digests:
                shared = stable_find(h, page)
                if shared is not None:
                    if not st & ITEM_MASK:
                        d_items += 1
                    state[k] = MERGED
                    word[k] = shared.id
                    shared.sharers += 1
                    d_sharers += 1
                    d_merged += 1
                    continue

            if not st & ITEM_MASK:
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
                state[k] = VOLATILE
                continue

            # The unstable tree: search, and insert if nothing matches.
            other = unstable_search_insert(h, loc0 + j, page, same)
            if not other:
                state[k] = UNSTABLE
                d_unshared += 1
            else:
                # Fold the local count in first: _merge_pair updates it too.
                self.tally.unshared += d_unshared
                d_unshared = 0
                self._merge_pair(slot, chunk, k, h, page.tobytes(), other)
        tally = self.tally
        tally.items += d_items
        tally.unshared += d_unshared
        tally.sharers += d_sharers
        tally.pages_scanned += scanned
        slot.pages_merged += d_merged
        if present is not found:
            self._mark_absent(chunk, k0, found[:n])
        return n

    @staticmethod
    def _mark_absent(chunk: RmapChunk, k0: int, found: bytes) -> None:
        """Record the zero pages and unreadable pages among ``found`` (pages k0... of ``chunk``).

        The hot loop took them as not present (dropping any item); only
        their state byte says what was seen, in runs, without a loop per page.
        """
        marks = found.translate(_ABSENT_STATE)
        state = chunk.state
        for m in _MARKS.finditer(marks):
            state[k0 + m.start() : k0 + m.end()] = array("B", m.group())

    def _drop_item(self, slot: Slot, chunk: RmapChunk, k: int) -> None:
        """Remove the item of page k of ``chunk`` (it has one) from whatever tree holds it."""
        st = chunk.state[k]
        if st == MERGED:
            kpage = self.stable.by_id[chunk.word[k]]
            self.tally.sharers -= 1
            slot.pages_merged -= 1
            kpage.sharers -= 1
            if kpage.sharers == 0:
                # Its last sharer left: the shared page is freed.
                self.stable.remove(kpage)
        elif st == UNSTABLE:
            # Its entry in the unstable tree, if still there, turns stale: the
            # state check in _same_page ignores it.
            self.tally.unshared -= 1
        self.tally.items -= 1
        chunk.state[k] = NO_ITEM
        chunk.word[k] = 0

    def _locate(self, loc: int) -> tuple[Slot, RmapChunk, int] | None:
        slot = self.numbered[loc >> 32] if (loc >> 32) < len(self.numbered) else None
        if slot is None or slot.gone:
            return None
        idx = loc & 0xFFFFFFFF
        chunk = slot.chunks.get(idx >> CHUNK_SHIFT)
        if chunk is None:
            return None
        return slot, chunk, idx & CHUNK_MASK

    def _entry_digest(self, loc: int) -> int | None:
        """The digest the unstable tree's entry at ``loc`` went in with, if that page is still in the tree."""
        found = self._locate(loc)
        if found is None:
            return None
        _, chunk, k = found
        return chunk.word[k] if chunk.state[k] == UNSTABLE else None

    def _same_page(self, loc: int, checksum: int, page: memoryview) -> bool:
        """Unstable-tree match check: is the page at ``loc`` still there and identical to ``page``?

        The entry only says the page had this digest when it went in.  Its
        process may have written it since, so we read it again and compare
        every byte with the page being scanned; only then may they merge.
        """
        found = self._locate(loc)
        if found is None:
            return False
        slot, chunk, k = found
        if chunk.state[k] != UNSTABLE or chunk.word[k] != checksum:
            return False
        data = slot.space.read_page(slot.base + ((loc & 0xFFFFFFFF) << PAGE_SHIFT))
        return data is not None and data == page.tobytes()

    def _merge_pair(self, slot: Slot, chunk: RmapChunk, k: int, h: int, data: bytes, other: int) -> None:
        """Two identical pages met in the unstable tree: make them sharers of a new shared page."""
        limit = self.max_kernel_pages
        if limit and len(self.stable) >= limit:
            # At the limit no new shared page is made; the page stays out of
            # both trees this pass (the driver's failed merge does the same).
            chunk.state[k] = LIMITED
            return
        found = self._locate(other)
        assert found is not None  # _same_page just confirmed it
        slot2, chunk2, k2 = found
        kpage = self.stable.insert(h, data)
        # The other page leaves the unstable tree (its entry turns stale).
        self.tally.unshared -= 1
        chunk2.state[k2] = MERGED
        chunk2.word[k2] = kpage.id
        slot2.pages_merged += 1
        chunk.state[k] = MERGED
        chunk.word[k] = kpage.id
        slot.pages_merged += 1
        kpage.sharers = 2
        self.tally.sharers += 2


def _page_spans(found: list[tuple[int, int]], base: int, npages: int) -> tuple[list[int], list[int]]:
    """Mapped address ranges within a slot as page indexes from ``base``: (lows, highs), clipped to [0, npages)."""
    lows: list[int] = []
    highs: list[int] = []
    for start, end in found:
        lo = max(start - base, 0) >> PAGE_SHIFT
        hi = min((end - base + PAGE_SIZE - 1) >> PAGE_SHIFT, npages)
        if hi <= lo:
            continue
        if highs and lo <= highs[-1]:  # touching or overlapping the previous run: one run
            highs[-1] = max(highs[-1], hi)
        else:
            lows.append(lo)
            highs.append(hi)
    return lows, highs
