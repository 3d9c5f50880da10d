"""The scanner's algorithm (stable tree, checksum gate, unstable tree, two passes to merge) and counters, in memory."""

from __future__ import annotations

import random

import pytest

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine import Engine, Slot, StableTree, UnstableTree, scanner
from cuse_ksm.engine.check import check_engine
from cuse_ksm.engine.trees import ITEM, MERGED, UNSTABLE
from tests.engine.fakes import FakeSpace, full_scans, page, unique_page

A = 0x7F00_0000_0000
B = 0x7E00_0000_0000


def setup(*spaces_pages: tuple[int, list[bytes]]) -> tuple[Engine, list[FakeSpace], list[Slot]]:
    engine = Engine()
    sma = engine.new_sma()
    spaces, slots = [], []
    for i, (addr, contents) in enumerate(spaces_pages):
        space = FakeSpace(1000 + i)
        space.map(addr, contents)
        spaces.append(space)
        slots.append(engine.register(sma, space, addr, len(contents)))
    return engine, spaces, slots


@pytest.mark.parametrize("n", [2, 3, 10, 300])
def test_identical_pages_across_two_processes_merge_after_two_full_scans(n: int) -> None:
    same = page(0xAB)
    first = n // 2
    engine, _, _ = setup(
        (A, [same] * first + [unique_page(i) for i in range(5)]),
        (B, [unique_page(100 + i) for i in range(5)] + [same] * (n - first)),
    )
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (0, 0)
    assert c.pages_volatile == n + 10  # every page seen once: items, in no tree
    check_engine(engine)
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, n - 1)
    assert c.pages_unshared == 10
    assert c.pages_volatile == 0
    assert c.full_scans == 2
    assert c.pages_scanned == 2 * (n + 10)
    check_engine(engine)
    # Steady state: further passes change nothing.
    full_scans(engine, 3)
    c2 = engine.counters()
    assert (c2.pages_shared, c2.pages_sharing, c2.pages_unshared) == (1, n - 1, 10)
    check_engine(engine)


def test_merge_needs_two_passes_even_within_one_process() -> None:
    engine, _, _ = setup((A, [page(1), page(1)]))
    full_scans(engine, 1)
    assert engine.counters().pages_shared == 0
    full_scans(engine, 1)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 1)


def test_unique_pages_are_never_merged() -> None:
    engine, _, _ = setup((A, [unique_page(i) for i in range(600)]), (B, [unique_page(1000 + i) for i in range(7)]))
    full_scans(engine, 4)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (0, 0, 607, 0)
    check_engine(engine)


def test_pages_equal_but_for_the_last_8_bytes_are_never_merged() -> None:
    contents = [page(0, i.to_bytes(8, "little")) for i in range(1000)]
    engine, _, _ = setup((A, contents[:500]), (B, contents[500:]))
    full_scans(engine, 3)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (0, 0, 1000)


def test_a_page_written_between_passes_is_volatile_and_not_merged() -> None:
    engine, spaces, _ = setup((A, [page(7)]), (B, [page(7)]))
    full_scans(engine, 1)
    spaces[1].write(B, page(8))  # changes after its first sight
    spaces[1].write(B, page(7))  # ... and back: same digest, not volatile
    spaces[0].write(A, page(9))
    full_scans(engine, 1)
    c = engine.counters()
    assert c.pages_shared == 0
    assert c.pages_volatile == 1  # A's page: its digest moved
    assert c.pages_unshared == 1  # B's page went into the unstable tree
    spaces[0].write(A, page(7))  # A now equals B, but was volatile last pass
    full_scans(engine, 1)
    assert engine.counters().pages_shared == 0  # its digest moved again: volatile once more
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 1)
    check_engine(engine)


def test_a_page_that_keeps_changing_is_never_merged() -> None:
    engine, spaces, _ = setup((A, [page(1), page(1)]), (B, [page(1)]))
    for i in range(6):
        full_scans(engine, 1)
        spaces[1].write(B, page(i + 100))
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 1)  # A's two pages merged together
    assert engine.rmap_item(engine.slots[1], 0).kpage is None


def test_a_merged_page_then_written_is_unshared_on_the_next_pass() -> None:
    engine, spaces, slots = setup((A, [page(5)] * 3), (B, [page(5)]))
    full_scans(engine, 2)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 3)
    spaces[1].write(B, page(6))  # COW break, emulated
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 2)
    assert slots[1].pages_merged == 0 and slots[0].pages_merged == 3
    check_engine(engine)
    # Written with the shared content again: it is a new page and rejoins
    # through the stable tree on its next sight.
    spaces[1].write(B, page(5))
    full_scans(engine, 1)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 3)
    check_engine(engine)


def test_the_shared_page_is_freed_when_its_last_sharer_leaves() -> None:
    engine, spaces, _ = setup((A, [page(5)]), (B, [page(5)]))
    full_scans(engine, 2)
    assert engine.counters().pages_shared == 1
    spaces[0].write(A, page(1))
    full_scans(engine, 1)
    # One sharer left: the shared page lives on (pages_shared 1, sharing 0).
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 0)
    spaces[1].write(B, page(2))
    full_scans(engine, 1)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (0, 0)
    assert len(engine.stable) == 0 and not engine.stable.by_checksum
    check_engine(engine)


def test_stable_tree_first_a_new_page_equal_to_a_shared_page_merges_in_one_pass() -> None:
    engine, _, _ = setup((A, [page(5), page(5)]))
    full_scans(engine, 2)
    sma = engine.new_sma()
    space = FakeSpace(77)
    space.map(B, [page(5)] * 4)
    engine.register(sma, space, B, 4)
    full_scans(engine, 1)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 5)


def test_max_kernel_pages_caps_the_shared_pages() -> None:
    contents = [page(i) for i in range(10)]
    engine, _, _ = setup((A, contents), (B, contents))
    engine.max_kernel_pages = 4
    full_scans(engine, 3)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (4, 4)
    assert c.max_kernel_pages == 4
    check_engine(engine)
    engine.max_kernel_pages = 0  # unlimited
    full_scans(engine, 2)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (10, 10)
    check_engine(engine)


def test_max_kernel_pages_does_not_stop_sharers_joining_existing_shared_pages() -> None:
    engine, _, _ = setup((A, [page(1)] * 3 + [page(2)] * 3))
    engine.max_kernel_pages = 1
    full_scans(engine, 3)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 2)


def test_not_present_pages_are_skipped_and_unmapping_drops_their_items() -> None:
    engine, spaces, slots = setup((A, [page(3)] * 8), (B, [page(3)] * 8))
    spaces[0].unmap(A + 4 * PAGE_SIZE, 4)  # never touched: not present
    full_scans(engine, 2)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 11)
    assert c.pages_scanned == 2 * 12
    spaces[1].unmap(B, 8)  # munmap: B's pages leave the trees
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 3)
    assert slots[1].pages_merged == 0 and not any(slots[1].chunks[0].state)
    check_engine(engine)
    spaces[0].unmap(A, 8)
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (0, 0, 0, 0)
    assert slots[0].chunks == {} or not any(slots[0].chunks[0].state)


def test_process_exit_drops_its_pages_counters_return_to_what_remains() -> None:
    same = page(9)
    engine, spaces, slots = setup((A, [same] * 3 + [unique_page(1)]), (B, [same] * 2 + [unique_page(2)]))
    full_scans(engine, 2)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 4)
    spaces[1].gone = True  # the process exited
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (1, 2, 1)
    assert slots[1].gone and engine.slots == slots  # still registered until REMOVE
    check_engine(engine)
    engine.release_sma(slots[1].sma)
    assert spaces[0].closed and spaces[1].closed
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (0, 0, 0, 0)
    assert engine.scan_now(1000) == 0


def test_remove_mid_scan() -> None:
    engine = Engine()
    sma1, sma2 = engine.new_sma(), engine.new_sma()
    s1, s2 = FakeSpace(1), FakeSpace(2)
    s1.map(A, [page(4)] * 600)
    s2.map(B, [page(4)] * 600)
    engine.register(sma1, s1, A, 600)
    engine.register(sma2, s2, B, 600)
    full_scans(engine, 2)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 1199)
    engine.scan_now(300)  # the cursor is inside sma1's slot
    engine.remove_regions(sma1)
    assert s1.closed
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 599)
    check_engine(engine)
    engine.scan_now(700)
    check_engine(engine)
    engine.release_sma(sma2)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (0, 0, 0, 0)
    assert len(engine.stable) == 0 and engine.slots == []


def test_remove_empties_the_unstable_tree() -> None:
    engine, _, _ = setup((A, [unique_page(i) for i in range(10)]), (B, [unique_page(100)]))
    full_scans(engine, 1)
    engine.scan_now(10)  # the second pass, but for its last page
    assert len(engine.unstable) == 10
    sma = engine.new_sma()
    space = FakeSpace(5)
    space.map(0x1000, [page(0)])
    engine.register(sma, space, 0x1000, 1)
    engine.remove_regions(sma)
    assert len(engine.unstable) == 0
    # The items stay unshared (counted) until rescanned, as in later kernels.
    assert engine.counters().pages_unshared == 10
    check_engine(engine)


def test_cursor_survives_slots_added_and_removed_mid_pass() -> None:
    engine = Engine()
    smas = [engine.new_sma() for _ in range(4)]
    spaces = [FakeSpace(i) for i in range(4)]
    for i, space in enumerate(spaces):
        space.map(A, [page(i % 2)] * 100)
    engine.register(smas[0], spaces[0], A, 100)
    engine.register(smas[1], spaces[1], A, 100)
    engine.scan_now(150)  # halfway through the second slot
    engine.register(smas[2], spaces[2], A, 100)
    engine.remove_regions(smas[0])
    engine.scan_now(50)  # the rest of slot 1
    reads = spaces[2].reads
    engine.scan_now(100)  # slot 2, appended during the pass, comes next
    assert spaces[2].reads > reads
    assert engine.counters().full_scans == 1
    assert engine.counters().pages_scanned == 300


def test_unaligned_and_empty_slots() -> None:
    engine = Engine()
    sma = engine.new_sma()
    space = FakeSpace()
    space.map(A, [page(1)] * 4)
    engine.register(sma, space, A + 123, 2)  # names pages A and A+4096
    engine.register(sma, space, A + 2 * PAGE_SIZE, 0)  # empty: skipped
    engine.register(sma, space, A + 2 * PAGE_SIZE, 2)
    full_scans(engine, 2)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 3)


def test_huge_npages_over_unmapped_memory_costs_no_memory() -> None:
    engine = Engine()
    sma = engine.new_sma()
    space = FakeSpace()
    space.map(A, [page(1)] * 2)
    slot = engine.register(sma, space, A, 0xFFFFFFFF)  # qemu-style garbage
    engine.scan_now(100_000)
    assert len(slot.chunks) == 1


def test_a_space_raising_is_contained() -> None:
    engine, spaces, _ = setup((A, [page(1)] * 2), (B, [page(1)] * 2))
    spaces[0].fail = OSError("boom")
    full_scans(engine, 2)
    assert engine.errors >= 1
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 1)


def test_rmap_item_view() -> None:
    engine, _, slots = setup((A, [page(1), page(1), unique_page(3)]))
    full_scans(engine, 1)
    assert engine.rmap_item(slots[0], 2).state == ITEM
    full_scans(engine, 1)
    item = engine.rmap_item(slots[0], 0)
    assert item.state == MERGED and item.kpage is not None and item.kpage.sharers == 2
    assert engine.rmap_item(slots[0], 2).state == UNSTABLE


def test_stable_tree_chains_digest_collisions() -> None:
    tree = StableTree()
    a = tree.insert(42, b"a" * PAGE_SIZE)
    b = tree.insert(42, b"b" * PAGE_SIZE)
    c = tree.insert(42, b"c" * PAGE_SIZE)

    def view(fill: bytes) -> memoryview:  # the scanner passes a view of its read buffer
        return memoryview(fill * PAGE_SIZE)

    assert set(tree.digests) == {42}
    assert tree.find(42, view(b"a")) is a
    assert tree.find(42, view(b"b")) is b
    assert tree.find(42, view(b"d")) is None
    assert tree.find(43, view(b"a")) is None  # same content, other digest: not looked at
    tree.remove(b)
    assert tree.find(42, view(b"b")) is None and tree.find(42, view(b"a")) is a
    tree.remove(c)
    tree.remove(a)
    assert len(tree) == 0 and not tree.by_checksum and 42 not in tree.digests
    assert tree.insert(1, b"x").id in (1, 2, 3)  # ids are reused
    assert 1 in tree.digests  # a live view


def test_the_scanner_merges_a_page_into_the_shared_page_of_its_content_when_digests_collide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A digest that collides for every page: a crafted collision, which
    # xxh3 does not rule out.  Pages A0 A1 B0 B1 A2: the pass that merges
    # makes shared page A, then B, listed first under the one digest; A2
    # must be compared past B and join A.
    monkeypatch.setattr(scanner, "xxh3_64_intdigest", lambda data: 7)
    a, b = page(0xA), page(0xB)
    engine, _, slots = setup((A, [a, a, b, b, a]))
    full_scans(engine, 2)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (2, 3, 0)
    shared = [engine.rmap_item(slots[0], i).kpage for i in range(5)]
    assert shared[0] is shared[1] is shared[4] and shared[0] is not None and shared[0].data == a
    assert shared[2] is shared[3] and shared[2] is not None and shared[2].data == b
    assert [k.sharers for k in engine.stable] == [3, 2]


def test_unstable_tree_candidates_are_confirmed_and_collisions_kept() -> None:
    digests: dict[int, int] = {}
    tree = UnstableTree(digests.get)
    asked = []
    page_a = memoryview(page(0xA))

    def never(loc: int, checksum: int, candidate: memoryview) -> bool:
        asked.append((loc, checksum, candidate))
        return False

    def only_2(loc: int, checksum: int, candidate: memoryview) -> bool:
        return loc == 2

    h = 0xDEADBEEF_00000001
    digests.update({1: h, 2: h})
    assert tree.search_insert(h, 1, page_a, never) == 0
    assert tree.search_insert(h, 2, page_a, never) == 0  # same digest, not confirmed: both kept
    assert asked == [(1, h, page_a)]  # the confirmation sees the page and digest being searched
    assert tree.search_insert(h, 3, page_a, only_2) == 2
    # Growth keeps every entry findable.
    # As the scanner does, an entry's page is known to be in the tree only
    # once search_insert has returned: growing must not lose the newest one.
    for i in range(5000):
        h_i = random.getrandbits(64)
        tree.search_insert(h_i, 10 + i, page_a, never)
        digests[10 + i] = h_i
    assert tree.search_insert(h, 99, page_a, only_2) == 2
    assert len(tree) == 5002
    # An entry whose page left the tree (no digest any more) is dropped when it grows.
    del digests[10]
    for i in range(5000, 9000):
        h_i = random.getrandbits(64)
        tree.search_insert(h_i, 10 + i, page_a, never)
        digests[10 + i] = h_i
    assert len(tree) == 9001 and 10 not in tree.arrays()[1].tolist()


def test_unstable_tree_insert_run_stops_at_the_first_match() -> None:
    digests: dict[int, int] = {}
    tree = UnstableTree(digests.get)
    pages = [memoryview(page(i)) for i in range(40)]
    hashes = [random.getrandbits(64) for _ in range(40)]
    hashes[30] = hashes[3]  # page 30 will meet page 3

    def same(loc: int, checksum: int, candidate: memoryview) -> bool:
        return digests.get(loc) == checksum and candidate is pages[loc - 100]

    # Pages 0..19 go in (a run from 0 to 20, no match): all inserted.
    assert tree.insert_run(hashes, 0, 20, 100, pages, same) == (20, 0)
    digests.update({100 + j: hashes[j] for j in range(20)})
    assert len(tree) == 20
    # A run that meets page 3 at its 11th page: the ten before it go in, it and the rest do not.
    pages[30] = pages[3]
    assert tree.insert_run(hashes, 20, 36, 100, pages, same) == (30, 103)
    assert len(tree) == 30
    assert tree.search_insert(hashes[33], 999, pages[33], lambda *a: True) == 0  # 33 was not inserted
    digests.update({100 + j: hashes[j] for j in range(20, 30)} | {999: hashes[33]})
    # A run longer than the room left grows the table first, and loses nothing.
    many = [random.getrandbits(64) for _ in range(3000)]
    digests.update({5000 + j: many[j] for j in range(3000)})
    assert tree.insert_run(many, 0, 3000, 5000, [pages[0]] * 3000, lambda *a: False) == (3000, 0)
    assert len(tree) == 3031
    assert tree.insert_run(hashes, 3, 4, 100, pages, same) == (3, 103)  # still found after growing


def test_random_workload_keeps_counters_consistent() -> None:
    rng = random.Random(1234)
    engine = Engine()
    smas = [engine.new_sma() for _ in range(3)]
    spaces = [FakeSpace(i) for i in range(3)]
    palette = [page(i) for i in range(6)] + [unique_page(i) for i in range(6)]
    for space in spaces:
        space.map(A, [rng.choice(palette) for _ in range(700)])
    for sma, space in zip(smas, spaces, strict=True):
        engine.register(sma, space, A, 700)
    engine.max_kernel_pages = 5
    for step in range(300):
        op = rng.random()
        space = rng.choice(spaces)
        addr = A + rng.randrange(700) * PAGE_SIZE
        if op < 0.5:
            space.write(addr, rng.choice(palette))
        elif op < 0.6:
            space.unmap(addr, rng.randrange(1, 30))
        elif op < 0.62 and step > 100:
            space.gone = True
        engine.scan_now(rng.randrange(1, 400))
        if step % 25 == 0:
            check_engine(engine)
        if step == 150:
            engine.max_kernel_pages = 0
    check_engine(engine)
    for sma in smas:
        engine.release_sma(sma)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (0, 0, 0, 0)


def test_unstable_tree_grows_mid_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table sized too small for the pass grows while the scanner inserts, and loses nothing."""
    monkeypatch.setattr(UnstableTree, "MIN_CELLS", 8)
    original = UnstableTree.reset
    monkeypatch.setattr(UnstableTree, "reset", lambda self, expected=0: original(self, 0))
    contents = [unique_page(i) for i in range(1500)] + [page(1)] * 20
    engine, _, _ = setup((A, contents), (B, [unique_page(5000 + i) for i in range(700)] + [page(1)] * 3))
    full_scans(engine, 1)
    engine.scan_now(2000)  # well into the second pass: the table grew several times
    assert len(engine.unstable) > 8
    check_engine(engine)  # ... and stayed at most half full
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (1, 22, 2200)
    check_engine(engine)


def test_merged_pages_per_process() -> None:
    engine, spaces, _ = setup((A, [page(1)] * 3 + [unique_page(1)]), (B, [page(1)] * 2))
    full_scans(engine, 2)
    assert engine.merged_pages_by_tgid() == {spaces[0].tgid: 3, spaces[1].tgid: 2}
