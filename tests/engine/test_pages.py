"""Each page's state as the scanner last saw it (engine/pages.py), on in-memory spaces.

The mixed workload puts pages in every state a scanned region can show,
with each count known from the algorithm; the counters, whose definitions
the states refine, must come out as the 2009 driver's (pages_volatile still
counts every item in no tree and not merged).
"""

from __future__ import annotations

import sys

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine import STATE_NAMES, Engine, PageSurvey, Run, Slot
from cuse_ksm.engine.check import check_engine
from cuse_ksm.engine.pages import NOT_SCANNED
from cuse_ksm.engine.trees import CHUNK_SHIFT, UNREADABLE
from tests.engine.fakes import MIXED_ADDR as A
from tests.engine.fakes import MIXED_PAGES as NPAGES
from tests.engine.fakes import FakeSpace, full_scans, mixed, page, unique_page


def at(i: int) -> int:
    return A + i * PAGE_SIZE


def counts(engine: Engine, slot: Slot) -> dict[str, int]:
    survey = engine.survey(slot).run()
    return {STATE_NAMES[s]: n for s, n in survey.counts.items() if n}


def test_every_state_counted_exactly_and_the_counters_unchanged() -> None:
    engine, _, slot = mixed()
    assert counts(engine, slot) == {
        "merged": 11,  # 0-9 into one shared page, 20 alone in the other (21 left it)
        "unstable": 10,  # 10-14, 512-515, and 30 (its pair 31 could not merge)
        "volatile": 5,  # 15-19
        "seen_once": 1,  # 32
        "written": 1,  # 21
        "at_limit": 1,  # 31
        "zero_page": 3,  # 22, 23, 300
        "unreadable": 1,  # 24
        "not_present": NPAGES - 33,
    }
    c = engine.counters()
    # The counters as the 2009 driver's definitions give them, whatever the states say.
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (2, 9, 10, 7)
    # ...and how the states refine them: pages_volatile is every item in no tree, not merged.
    n = counts(engine, slot)
    assert c.pages_unshared == n["unstable"]
    assert c.pages_volatile == n["volatile"] + n["seen_once"] + n["at_limit"]
    assert c.pages_shared + c.pages_sharing == n["merged"]


def test_the_shared_pages_a_region_maps_and_their_sharers() -> None:
    engine, _, slot = mixed()
    survey = engine.survey(slot).run()
    by_content = {engine.stable.by_id[k].data: (k, n) for k, n in survey.shared.items()}
    one, ten = by_content[page(1)]
    two, alone = by_content[page(2)]
    assert (ten, alone) == (10, 1)
    assert (survey.shared_page(one), survey.shared_page(two)) == ((10, False), (1, False))


def test_runs_in_address_order_merged_ones_split_by_shared_page() -> None:
    engine, _, slot = mixed()
    survey = engine.survey(slot, runs=True).run()
    one = slot.chunks[0].word[0]
    two = slot.chunks[0].word[20]
    assert [(r.start, r.npages, STATE_NAMES[r.state], r.kpage) for r in survey.runs] == [
        (0, 10, "merged", one),
        (10, 5, "unstable", 0),
        (15, 5, "volatile", 0),
        (20, 1, "merged", two),
        (21, 1, "written", 0),
        (22, 2, "zero_page", 0),
        (24, 1, "unreadable", 0),
        (25, 5, "not_present", 0),
        (30, 1, "unstable", 0),
        (31, 1, "at_limit", 0),
        (32, 1, "seen_once", 0),
        (33, 300 - 33, "not_present", 0),  # across the end of chunk 0
        (300, 1, "zero_page", 0),
        (301, 512 - 301, "not_present", 0),
        (512, 4, "unstable", 0),
        (516, NPAGES - 516, "not_present", 0),
    ]
    assert sum(r.npages for r in survey.runs) == NPAGES


def test_a_chunk_holding_only_pages_with_no_item_costs_one_byte_a_page() -> None:
    _, _, slot = mixed()
    assert len(slot.chunks[300 >> CHUNK_SHIFT].word) == 0
    assert len(slot.chunks[300 >> CHUNK_SHIFT].state) == 256


def test_pages_the_cursor_has_not_reached_are_not_scanned() -> None:
    engine = Engine()
    space = FakeSpace()
    space.map(A, [unique_page(i) for i in range(300)])
    slot = engine.register(engine.new_sma(), space, A, 1000)
    assert counts(engine, slot) == {"not_scanned": 1000}
    engine.set_kthread(sleep=0, pages_to_scan=1, flags=1)
    assert engine.scan_now(100) == 100
    assert counts(engine, slot) == {"seen_once": 100, "not_scanned": 900}
    engine.scan_now(400)  # up to page 500: chunk 1 partly, no chunk beyond page 300's
    assert counts(engine, slot) == {"seen_once": 300, "not_present": 200, "not_scanned": 500}
    full_scans(engine, 1)  # the end of this first pass
    assert counts(engine, slot) == {"seen_once": 300, "not_present": 700}
    full_scans(engine, 1)
    assert counts(engine, slot) == {"unstable": 300, "not_present": 700}
    check_engine(engine)


def test_states_move_on_as_the_pages_do() -> None:
    """A zero page written, an unreadable page readable again, a written page merging again."""
    engine = Engine()
    space = FakeSpace()
    space.map(A, [page(1)] * 4)
    space.zero.add(at(4))
    space.pages[at(5)] = page(1)
    space.unreadable.add(at(5))
    slot = engine.register(engine.new_sma(), space, A, 6)
    full_scans(engine, 2)
    assert counts(engine, slot) == {"merged": 4, "zero_page": 1, "unreadable": 1}
    space.zero.discard(at(4))
    space.write(at(4), page(1))  # the zero page written with the shared content: merges at once
    space.unreadable.clear()  # readable, same content: merges at once too
    space.write(at(0), page(7))  # COW
    full_scans(engine, 1)
    assert counts(engine, slot) == {"merged": 5, "written": 1}
    space.write(at(0), page(1))
    full_scans(engine, 1)
    assert counts(engine, slot) == {"merged": 6}
    space.unmap(A, 2)
    space.zero.add(at(2))
    full_scans(engine, 1)
    assert counts(engine, slot) == {"merged": 3, "not_present": 2, "zero_page": 1}
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_volatile) == (1, 2, 0)
    check_engine(engine)


def test_a_gone_process_has_every_page_unreadable() -> None:
    engine, space, slot = mixed()
    space.gone = True
    full_scans(engine, 1)
    assert slot.gone
    assert counts(engine, slot) == {"unreadable": NPAGES}
    assert engine.survey(slot, runs=True).run().runs == [Run(0, NPAGES, UNREADABLE)]


def test_the_survey_yields_once_per_chunk_or_gap() -> None:
    engine, _, slot = mixed()
    survey = PageSurvey(engine.stable, slot)
    # chunk 0, chunk 1, gap 512? no: chunks 0, 1 and 2 are adjacent, and nothing follows page 699.
    assert sum(1 for _ in survey.steps()) == 3
    assert sum(survey.counts.values()) == NPAGES
    lone = Engine()
    s = FakeSpace()
    s.map(A + (1 << 20) * 64, [page(1)])  # one page far into a huge region
    big = lone.register(lone.new_sma(), s, A, 1 << 30)
    assert sum(1 for _ in lone.survey(big).steps()) == 0  # never scanned: one gap, no chunk
    assert lone.survey(big).run().counts[NOT_SCANNED] == 1 << 30


def test_the_profit_figures_count_items_not_pages_without_one() -> None:
    """ksm_rmap_items and the engine's memory know the states with no item (zero, unreadable, written)."""
    engine, _, slot = mixed()
    assert engine.process_stat(77).rmap_items == 28 == engine.counters().rmap_items  # 11 + 10 + 5 + 1 + 1
    # The chunk of page 300 (a zero page alone) has no checksum column, and is charged none.
    full = sys.getsizeof(slot.chunks[0].word)
    empty = sys.getsizeof(slot.chunks[300 >> CHUNK_SHIFT].word)
    charged = engine.memory().rmap
    slot.chunks[300 >> CHUNK_SHIFT].hold_items()
    assert engine.memory().rmap - charged == full - empty > 0
