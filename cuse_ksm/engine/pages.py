"""What the scanner knows of each page of a region: "why is this page not merged?".

The scanner keeps one state byte per page of every chunk of a slot that
has held a present page (:class:`RmapChunk`); the slot's ``visited`` mark
says how far the cursor has come since registration.  :class:`PageSurvey`
turns them into the states ``cuse-ksm pages`` reports, with counts, the
shared pages the region maps and, on request, runs of pages in one state.
It reads, never scans, and changes nothing.

Cost: the work is C-speed operations over each chunk's state bytes
(``bytes.count``, ``re.finditer`` for runs, ``itertools`` for the shared
pages), one step per existing chunk; chunks never made (ranges never
present) cost one step per gap, whatever their size.  :meth:`PageSurvey.steps`
yields after each step, so a caller that shares its thread with the scanner
(the control files, served from the daemon's trio loop) can let it run
between steps; each step sees one consistent chunk, the whole survey sees
the region as the scanner changes it.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine.registry import Slot
from cuse_ksm.engine.trees import (
    CHUNK_PAGES,
    CHUNK_SHIFT,
    ITEM,
    LIMITED,
    MERGED,
    NO_ITEM,
    UNREADABLE,
    UNSTABLE,
    VOLATILE,
    WRITTEN,
    ZERO_PAGE,
    StableTree,
)

# A page the cursor has not reached since its slot was registered.  Never
# stored: derived from Slot.visited.  (NO_ITEM below that mark: not present.)
NOT_SCANNED = 0x40

# The states, as `cuse-ksm pages` and the control files name them, in the
# order they are shown.  README.md ("cuse-ksm pages") defines each one.
STATE_NAMES: dict[int, str] = {
    MERGED: "merged",
    UNSTABLE: "unstable",
    VOLATILE: "volatile",
    ITEM: "seen_once",
    WRITTEN: "written",
    LIMITED: "at_limit",
    NO_ITEM: "not_present",
    ZERO_PAGE: "zero_page",
    UNREADABLE: "unreadable",
    NOT_SCANNED: "not_scanned",
}

_IS_MERGED = bytes(1 if b == MERGED else 0 for b in range(256))
_RUNS = re.compile(rb"(.)\1*", re.DOTALL)
_ZEROS = bytes(PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Run:
    """``npages`` pages from page ``start`` of the region, all in ``state``; merged ones all map ``kpage``."""

    start: int
    npages: int
    state: int
    kpage: int = 0  # id of the shared page (state MERGED), else 0


@dataclass
class PageSurvey:
    """The states of the pages of one slot, gathered a chunk at a time (:meth:`steps`).

    After the steps: ``counts`` (pages per state, every state present),
    ``shared`` (pages of the region that map each shared page, by id) and,
    with ``runs=True``, ``runs`` (consecutive pages in one state; merged
    pages split by shared page).  :meth:`shared_page` says how many pages
    map a shared page in all, and whether it holds zeros, when asked.
    """

    stable: StableTree
    slot: Slot
    want_runs: bool = False
    counts: dict[int, int] = field(default_factory=lambda: dict.fromkeys(STATE_NAMES, 0))
    shared: Counter[int] = field(default_factory=Counter)
    runs: list[Run] = field(default_factory=list)

    def shared_page(self, kid: int) -> tuple[int, bool] | None:
        """(sharers in all regions, content all zeros) of shared page ``kid`` now; None once it is freed."""
        kpage = self.stable.by_id.get(kid)
        return None if kpage is None else (kpage.sharers, kpage.data == _ZEROS)

    def steps(self) -> Iterator[None]:
        """Survey the slot, yielding after each chunk (or gap between chunks) surveyed."""
        slot = self.slot
        npages = slot.npages
        if slot.gone:
            # Its process is gone (the scanner dropped its items): nothing can be read.
            self._plain(0, npages, UNREADABLE)
            return
        done = 0
        for ci in sorted(slot.chunks):
            lo = ci << CHUNK_SHIFT
            if lo >= npages:
                break
            if done < lo:
                self._gap(done, lo)
                yield
            done = min(lo + CHUNK_PAGES, npages)
            self._chunk(ci, lo, done)
            yield
            if slot.gone:
                self._plain(done, npages, UNREADABLE)
                return
        if done < npages:
            self._gap(done, npages)

    def run(self) -> PageSurvey:
        """All the steps at once (tests, small regions)."""
        for _ in self.steps():
            pass
        return self

    # -- one step ------------------------------------------------------------------

    def _gap(self, lo: int, hi: int) -> None:
        """Pages [lo, hi) have no chunk: never present where visited, else not scanned yet."""
        seen = min(max(self.slot.visited, lo), hi)
        self._plain(lo, seen, NO_ITEM)
        self._plain(seen, hi, NOT_SCANNED)

    def _plain(self, lo: int, hi: int, state: int) -> None:
        if hi > lo:
            self.counts[state] += hi - lo
            self._add_run(lo, hi - lo, state, 0)

    def _chunk(self, ci: int, lo: int, hi: int) -> None:
        chunk = self.slot.chunks.get(ci)
        if chunk is None:  # the slot's pages were dropped meanwhile
            self._gap(lo, hi)
            return
        seen = min(max(self.slot.visited - lo, 0), hi - lo)
        states = chunk.state.tobytes()[:seen] + bytes([NOT_SCANNED]) * (hi - lo - seen)
        counts = self.counts
        for state in counts:
            counts[state] += states.count(state)
        word = chunk.word
        if MERGED in states:
            # An iterable (not a mapping): Counter counts it in C.
            self.shared.update(itertools.compress(word, states.translate(_IS_MERGED)))
        if not self.want_runs:
            return
        for m in _RUNS.finditer(states):
            state = states[m.start()]
            if state != MERGED:
                self._add_run(lo + m.start(), m.end() - m.start(), state, 0)
                continue
            at = lo + m.start()
            for kid, group in itertools.groupby(word[m.start() : m.end()]):
                n = len(list(group))
                self._add_run(at, n, MERGED, kid)
                at += n

    def _add_run(self, start: int, npages: int, state: int, kpage: int) -> None:
        if not self.want_runs:
            return
        runs = self.runs
        if runs:
            last = runs[-1]
            if last.state == state and last.kpage == kpage and last.start + last.npages == start:
                runs[-1] = Run(last.start, last.npages + npages, state, kpage)
                return
        runs.append(Run(start, npages, state, kpage))
