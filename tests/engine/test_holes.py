"""Holes: pages of a registered range in no mapping are passed over at once, at no cost to the budget.

Issue 14's example: a region of 2^32-1 pages at an unmapped address, then
a real one of 256 identical pages.  The 2009 loop walked every address of
the first before reaching the second; the scanner now reads the process's
mappings (``AddressSpace.mapped``, here FakeSpace's declared ones) as
today's kernel walks VMAs.  The counters keep their definitions: a run over
ranges with holes ends each pass with exactly the counters of the same run
where the holes' pages are merely not present (the scan as it was, page by
page: a space that reports everything mapped).
"""

from __future__ import annotations

import pytest

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine import Engine, PageSurvey
from cuse_ksm.engine.check import check_engine
from cuse_ksm.engine.counters import Counters
from cuse_ksm.engine.trees import NO_ITEM
from tests.engine.fakes import FakeSpace, full_scans, page, rewrite_volatile, workload

HOLE_ADDR = 0x1000_0000_0000  # nothing mapped there
REAL_ADDR = 0x7F00_0000_0000
MAX_PAGES = 2**32 - 1


def issue_example(tgid: int = 14) -> tuple[Engine, FakeSpace]:
    """2^32-1 pages at an unmapped address, then 256 identical pages, both registered (in that order)."""
    engine = Engine()
    space = FakeSpace(tgid)
    space.add_mapping(REAL_ADDR, 256)
    space.map(REAL_ADDR, [page(7)] * 256)
    sma = engine.new_sma()
    engine.register(sma, space, HOLE_ADDR, MAX_PAGES)
    engine.register(sma, space, REAL_ADDR, 256)
    return engine, space


def test_the_real_region_merges_within_two_passes_of_its_own_pages() -> None:
    engine, space = issue_example()
    # Budget 5000 a round (ksmctl start 5000 100): one round is two passes
    # of the 256 real pages, and the hole of four billion pages costs nothing.
    stepped = engine.scan_now(512)
    c = engine.counters()
    assert stepped == 512
    assert (c.pages_shared, c.pages_sharing) == (1, 255)
    assert c.pages_scanned == 512  # pages looked at: the real ones, twice
    assert c.full_scans == 2  # the cursor wraps as it leaves the last region
    assert space.mapped_calls <= 4  # once each time the cursor enters a region
    check_engine(engine)


def test_a_hole_shows_as_not_present_once_passed() -> None:
    engine, _ = issue_example()
    hole, real = engine.slots
    assert PageSurvey(engine.stable, hole).run().counts[0x40] == MAX_PAGES  # not scanned yet
    full_scans(engine, 1)
    survey = PageSurvey(engine.stable, hole).run()
    assert survey.counts[NO_ITEM] == MAX_PAGES
    assert hole.visited == MAX_PAGES
    assert not hole.chunks  # passing costs no per-page state either
    assert engine.mapped_pages(hole) == 0 and engine.mapped_pages(real) == 256


def test_nothing_mapped_at_all_ends_the_round() -> None:
    engine = Engine()
    space = FakeSpace()
    space.add_mapping(REAL_ADDR, 1)  # mapped elsewhere: the region is all hole
    engine.register(engine.new_sma(), space, HOLE_ADDR, MAX_PAGES)
    assert engine.scanner.step(5000) == 5000  # a whole pass, nothing to count: the round ends
    assert engine.counters().full_scans >= 1
    assert engine.scan_now(10**6) == 10**6  # and scan_now returns
    assert engine.counters().pages_scanned == 0


@pytest.mark.parametrize("after", ["hole", "gone process"])
def test_a_round_of_one_pass_of_mapped_pages_is_one_pass(after: str) -> None:
    # What follows the last mapped page costs nothing, so the pass ends with
    # the step that scans that page: a round of exactly the pass's mapped
    # pages is one pass, and full_scans moves in that round, not the next.
    engine = Engine()
    space = FakeSpace()
    space.add_mapping(REAL_ADDR, 64)
    space.map(REAL_ADDR, [page(i) for i in range(64)])
    sma = engine.new_sma()
    engine.register(sma, space, REAL_ADDR, 64)
    other = FakeSpace(15)
    if after == "hole":
        engine.register(sma, space, HOLE_ADDR, MAX_PAGES)
    else:
        other.add_mapping(REAL_ADDR, 16)
        other.map(REAL_ADDR, [page(100 + i) for i in range(16)])
        engine.register(sma, other, REAL_ADDR, 16)
        other.gone = True  # the process exited; its region stays registered
    for n in range(1, 4):
        assert engine.scan_now(64) == 64
        c = engine.counters()
        assert (c.full_scans, c.pages_scanned) == (n, 64 * n)


def test_a_mapping_made_later_is_seen_by_the_next_pass_and_one_removed_loses_its_items() -> None:
    engine = Engine()
    space = FakeSpace()
    a = REAL_ADDR
    space.add_mapping(a, 8)
    space.map(a, [page(1)] * 8)
    slot = engine.register(engine.new_sma(), space, a, 64)
    full_scans(engine, 2)
    assert engine.counters().pages_sharing == 7
    space.add_mapping(a + 32 * PAGE_SIZE, 8)
    space.map(a + 32 * PAGE_SIZE, [page(1)] * 8)
    full_scans(engine, 1)  # stable tree match: merges on first sight
    assert engine.counters().pages_sharing == 15
    space.munmap(a, 8)
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.rmap_items) == (1, 7, 8)
    assert slot.pages_merged == 8
    check_engine(engine)


# -- the counters after each pass, with holes and without ------------------------

LAYOUTS = {
    "dup50": 1024,
    "tail8": 1024,
    **{f"crosscheck-{p}": n for p, n in (("equal", 512), ("half", 1024), ("volatile", 1024))},
    **{f"crosscheck-{p}": n for p, n in (("tail", 1024), ("tailgroup", 1024), ("zeroread", 512))},
}
HOLE = 300  # pages of hole before, between and after the two halves of a workload


def passes(layout: str, *, holes: bool, npasses: int = 4) -> list[tuple[Counters, dict[int, int]]]:
    """The counters and page states after each pass over the workload split in two mappings with holes around.

    ``holes``: the space reports its mappings (the holes are passed over);
    otherwise everything reads as mapped and the holes' pages as not
    present, which is the scan page by page as before holes were skipped.
    Between passes 2 and 3 the second half is unmapped and mapped again
    (its items go, then come back as first seen).
    """
    npages = LAYOUTS[layout]
    half = npages // 2
    engine = Engine()
    space = FakeSpace()
    base = REAL_ADDR
    first, second = base + HOLE * PAGE_SIZE, base + (2 * HOLE + half) * PAGE_SIZE
    total = 3 * HOLE + 2 * half
    if holes:
        space.add_mapping(first, half)
        space.add_mapping(second, half)
    pages = workload(layout.removeprefix("crosscheck-"), half)
    space.map(first, pages)
    space.map(second, pages)
    engine.register(engine.new_sma(), space, base, total)
    # A region wholly in the hole, and one with the workload's copy twice over.
    engine.register(engine.new_sma(), space, HOLE_ADDR, 5000)
    engine.register(engine.new_sma(), space, base, total)
    out = []
    for n in range(npasses):
        if layout == "crosscheck-volatile":
            rewrite_volatile(space, first, half, n)
            rewrite_volatile(space, second, half, n)
        if n == 2:
            saved = {a: p for a, p in space.pages.items() if a >= second}
            saved_zero = {a for a in space.zero if a >= second}
            space.zero -= saved_zero  # an unmapped page maps no zero page either
            (space.munmap if holes else space.unmap)(second, half)
        full_scans(engine, 1)
        check_engine(engine)
        out.append((engine.counters(), _states(engine)))
        if n == 2:
            if holes:
                space.add_mapping(second, half)
            space.pages.update(saved)
            space.zero |= saved_zero
    return out


def _states(engine: Engine) -> dict[int, int]:
    counts: dict[int, int] = {}
    for slot in engine.slots:
        for state, n in PageSurvey(engine.stable, slot).run().counts.items():
            counts[state] = counts.get(state, 0) + n
    return counts


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_counters_after_each_pass_are_those_of_the_scan_page_by_page(layout: str) -> None:
    with_holes = passes(layout, holes=True)
    page_by_page = passes(layout, holes=False)
    assert with_holes == page_by_page
    # And they are not trivial: something merged, or the layout says nothing can.
    last = with_holes[-1][0]
    assert last.pages_sharing > 0 or layout in ("tail8", "crosscheck-tail")
    assert last.full_scans == 4
