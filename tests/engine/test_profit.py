"""Today's kernel's profit figures for the emulated scanner, and what the engine really spends.

The expected figures are worked out from each workload's definition and
the formulas of Documentation/admin-guide/mm/ksm.rst (64-byte rmap items),
never read back from the engine.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

import pytest

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine import Engine
from cuse_ksm.engine.check import check_engine
from cuse_ksm.engine.scanner import WINDOW_PAGES
from tests.engine.fakes import FakeSpace, full_scans, page, unique_page

BASE = 0x10000000
N = 1024  # four chunks of items


def workload(kind: str, n: int = N) -> list[bytes]:
    """``equal``: n identical pages; ``unique``: n different ones; ``half``: even pages are
    copies of one of 8 contents, odd pages unique."""
    if kind == "equal":
        return [page(7)] * n
    if kind == "unique":
        return [unique_page(i) for i in range(n)]
    return [page(1 + (i // 2) % 8) if i % 2 == 0 else unique_page(i) for i in range(n)]


# kind -> (pages_sharing, merging pages) after the merge, for N pages
EXPECTED = {
    "equal": (N - 1, N),
    "unique": (0, 0),
    "half": (N // 2 - 8, N // 2),
}


def merged(kind: str, tgid: int = 1000) -> Engine:
    e = Engine()
    space = FakeSpace(tgid)
    space.map(BASE, workload(kind))
    e.register(e.new_sma(), space, BASE, N)
    full_scans(e, 3)
    return e


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_general_and_process_profit_follow_the_kernels_formulas(kind: str) -> None:
    sharing, merging = EXPECTED[kind]
    e = merged(kind)
    check_engine(e)
    c = e.counters()
    assert (c.pages_sharing, c.rmap_items) == (sharing, N)
    # (pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * 64, zero pages 0.
    assert c.general_profit == sharing * 4096 - N * 64
    st = e.process_stat(1000)
    assert (st.rmap_items, st.merging_pages, st.zero_pages) == (N, merging, 0)
    # (ksm_merging_pages + ksm_zero_pages) * PAGE_SIZE - ksm_rmap_items * 64
    assert st.profit == merging * 4096 - N * 64


def test_all_unique_pages_cost_64_bytes_each() -> None:
    e = merged("unique")
    assert e.counters().general_profit == -N * 64
    assert e.process_stat(1000).profit == -N * 64


def test_each_process_has_its_own_items_and_their_profits_exceed_the_general_one_by_the_shared_pages() -> None:
    e = Engine()
    a, b = FakeSpace(100), FakeSpace(200)
    # 100: 300 copies of one content in two regions, and 12 unique pages;
    # 200: 20 more copies of it, and 40 pages present out of 64 registered.
    a.map(BASE, [page(5)] * 200)
    a.map(BASE + (1 << 24), [page(5)] * 100 + [unique_page(i) for i in range(12)])
    b.map(BASE, [page(5)] * 20 + [unique_page(100 + i) for i in range(20)])
    e.register(e.new_sma(), a, BASE, 200)
    e.register(e.new_sma(), a, BASE + (1 << 24), 112)
    e.register(e.new_sma(), b, BASE, 64)
    full_scans(e, 3)
    check_engine(e)
    sa, sb = e.process_stat(100), e.process_stat(200)
    assert (sa.rmap_items, sa.merging_pages) == (312, 300)
    assert (sb.rmap_items, sb.merging_pages) == (40, 20)
    c = e.counters()
    assert (c.pages_shared, c.pages_sharing, c.rmap_items) == (1, 319, 352)
    assert sa.profit + sb.profit == c.general_profit + c.pages_shared * PAGE_SIZE
    assert e.process_stat(300).rmap_items == 0  # no such process


def test_items_leave_with_unmapped_pages_and_removed_regions() -> None:
    e = merged("half")
    space = e.slots[0].space
    assert isinstance(space, FakeSpace)
    space.unmap(BASE, 100)  # 50 copies, 50 unique pages gone
    full_scans(e, 1)
    st = e.process_stat(1000)
    assert (st.rmap_items, st.merging_pages) == (N - 100, N // 2 - 50)
    assert e.counters().general_profit == (N // 2 - 50 - 8) * 4096 - (N - 100) * 64
    e.remove_regions(e.slots[0].sma)
    assert e.counters().general_profit == 0
    assert e.process_stat(1000).rmap_items == 0


def traced_engine(kind: str, n: int) -> tuple[Engine, int]:
    """An engine merged over ``kind``, and the bytes tracemalloc saw it allocate (as make bench counts)."""
    space = FakeSpace()
    space.map(BASE, workload(kind, n))
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    e = Engine()
    e.register(e.new_sma(), space, BASE, n)
    full_scans(e, 3)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return e, traced


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_the_engines_own_count_of_its_memory_agrees_with_tracemalloc(kind: str) -> None:
    e, traced = traced_engine(kind, 8192)
    m = e.memory()
    # tracemalloc sees neither the unstable table nor the two read buffers
    # (anonymous mappings), which the engine counts in full.
    # A few KiB of small fixed objects (the registry, the SMA) are not counted.
    unseen = e.unstable.nbytes() + 2 * WINDOW_PAGES * PAGE_SIZE
    assert m.total - unseen == pytest.approx(traced, rel=0.02, abs=8192)
    assert m.metadata + m.copies == m.total
    assert m.copies == e.counters().pages_shared * (PAGE_SIZE + 33)  # one bytes object per shared page
    assert m.registered_pages == m.rmap_items == 8192


def test_the_emulators_profit_charges_its_metadata_instead_of_64_bytes_an_item() -> None:
    e = merged("half")
    m = e.memory()
    c = e.counters()
    assert m.profit == c.pages_sharing * PAGE_SIZE - m.metadata
    assert m.metadata == m.rmap + m.unstable + m.stable + m.slots + m.buffer
    assert m.per_registered_page == (m.metadata - m.buffer) / N
    # Column-wise items: well under the kernel's 64 bytes, the unstable table included.
    assert 9 < m.per_rmap_item < 64


def test_an_empty_engine_spends_only_its_fixed_parts() -> None:
    m = Engine().memory()
    assert (m.rmap, m.copies, m.registered_pages, m.rmap_items) == (0, 0, 0, 0)
    assert m.slots == sys.getsizeof([None])  # no slot, only the unstable tree's numbering list
    assert m.buffer >= 2 * WINDOW_PAGES * PAGE_SIZE and m.per_registered_page == 0.0
    assert m.profit == -m.metadata
