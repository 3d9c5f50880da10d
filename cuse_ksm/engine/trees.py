"""The scanner's data structures: reverse-map items, shared pages, the two trees.

How the 2009 driver sorts pages, and how this emulator departs from it
-----------------------------------------------------------------------

The driver keeps two red-black trees ordered by page *content* and walks
them with memcmp().  A tree of pointers costs it nothing per page beyond the
node, because the pages are right there in kernel memory.  From user space
we hold no pointer into another process's memory: to compare a candidate we
must copy it over with a system call.  Walking a content-ordered tree would
cost one copy per level, and holding copies of the pages in the tree would
cost 4 KiB per registered page.

So both trees here are keyed by a 64-bit xxh3 digest of the page, and
ordered by nothing: a hash table finds "a page that might be equal" in one
probe instead of log2(n) memcmp()s, and the worst case for content-sorted
trees (pages equal but for their last bytes, as in Andrea Arcangeli's 2009
ksmpages test) costs no more than any other content.  Equal digests are only a *hint*: every merge
is preceded by a full byte comparison of both pages, so a digest collision
(accidental or crafted; xxh3 is not a cryptographic hash) can at worst cost
a wasted comparison, never a wrong merge.  Ordered structures do serve
elsewhere: the scan cursor walks the slots in registration order
(see scanner.py).

Memory: the kernel spends about 64 bytes per scanned page on its reverse
map.  A Python object per page would cost more than that by itself, so the
reverse-map items are stored column-wise, one :class:`RmapChunk` of arrays
per 256 pages that have ever been present, and the unstable tree is an
open-addressing table of two flat arrays.  :class:`RmapItem` is a read-only
view of one item, for introspection and tests.
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Callable, Iterator, KeysView
from dataclasses import dataclass

from cuse_ksm.abi import PAGE_SIZE

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

# One chunk of reverse-map items covers this many consecutive pages of a
# slot; it is also the largest batch the scanner reads with one system call
# (256 pages = 1 MiB), so a batch never straddles two chunks.
CHUNK_SHIFT = 8
CHUNK_PAGES = 1 << CHUNK_SHIFT
CHUNK_MASK = CHUNK_PAGES - 1

# State of a page (RmapChunk.state), one byte.  Values with a non-zero low
# nibble (ITEM_MASK) are reverse-map items, which the counters count; the
# others say what the scanner saw of a page that has no item.
NO_ITEM = 0  # no item: never seen, or not present at its last look
ITEM = 1  # seen once: its checksum is remembered, it is in no tree yet
UNSTABLE = 2  # unchanged for a full scan: it went into the unstable tree
MERGED = 3  # it maps a KsmPage (the stable tree); `word` holds that page's id
VOLATILE = 4  # its checksum moved since the previous look: in no tree
LIMITED = 5  # it matched a page of the unstable tree, but max_kernel_pages refused a new shared page
ITEM_MASK = 0x0F
ZERO_PAGE = 0x10  # no item: at its last look it mapped the kernel's shared zero page
UNREADABLE = 0x20  # no item: at its last look it was present but could not be read
WRITTEN = 0x30  # no item: it mapped a shared page and was written since (COW); it starts over
ITEM_STATES = bytes((ITEM, UNSTABLE, MERGED, VOLATILE, LIMITED))
NO_ITEM_STATES = bytes((NO_ITEM, ZERO_PAGE, UNREADABLE, WRITTEN))

_ZERO_WORDS = bytes(8 * CHUNK_PAGES)
_ZERO_STATES = bytes(CHUNK_PAGES)


def count_items(states: array[int] | bytes) -> int:
    """How many of the pages whose ``states`` these are (one chunk's, or several joined) have a reverse-map item."""
    return len(states) - sum(states.count(s) for s in NO_ITEM_STATES)


class RmapChunk:
    """Reverse-map items of CHUNK_PAGES consecutive pages of one slot.

    ``word[i]`` is the page's checksum from its last scan (the item states
    but MERGED), or the id of the KsmPage it maps (state MERGED): a merged
    page needs no checksum of its own, the shared page has one.  Sharing the
    column keeps an item at 9 bytes.  A chunk made only to remember pages
    with no item (zero pages, unreadable ones: ``items=False``) has an
    empty ``word`` until its first item, so it costs one byte per page.
    """

    __slots__ = ("state", "word")

    def __init__(self, items: bool = True) -> None:
        self.word = array("Q", _ZERO_WORDS if items else b"")
        self.state = array("B", _ZERO_STATES)

    def hold_items(self) -> None:
        """Give a chunk made with ``items=False`` its checksum column."""
        if not self.word:
            self.word = array("Q", _ZERO_WORDS)


@dataclass(frozen=True, slots=True)
class RmapItem:
    """A view of the reverse-map item of one (slot, page index)."""

    slot: object
    index: int
    state: int
    checksum: int | None
    kpage: KsmPage | None


class KsmPage:
    """A shared page: the one copy the engine keeps for all pages merged into it.

    In the kernel, the shared page is write-protected in every mapping, so
    its content cannot change; here it is an immutable ``bytes`` that only
    the engine holds, which gives the same guarantee.  That is what makes the
    stable tree trustworthy: a search in it compares against content that
    cannot have moved since it was inserted.
    """

    __slots__ = ("checksum", "data", "id", "next", "sharers")

    def __init__(self, id: int, checksum: int, data: bytes) -> None:
        self.id = id
        self.checksum = checksum
        self.data = data
        self.sharers = 0
        # Another shared page with the same digest but other content (a
        # digest collision): the stable tree chains them.
        self.next: KsmPage | None = None

    def __repr__(self) -> str:
        return f"KsmPage(id={self.id}, checksum={self.checksum:#018x}, sharers={self.sharers})"


class StableTree:
    """The shared pages, found by content digest.

    Never emptied: a shared page leaves only when its last sharer does.
    Lookups compare the full content of the candidate (see :meth:`find`),
    so the digest is never trusted on its own.
    """

    __slots__ = ("_by_checksum", "_by_id", "_free_ids", "_next_id", "digests")

    def __init__(self) -> None:
        self._by_checksum: dict[int, KsmPage] = {}
        # The digests of the shared pages, a live view: a page whose digest
        # is not in it equals no shared page.  Most pages the scanner sees
        # are not in it, and asking costs no Python call (see find()).
        self.digests: KeysView[int] = self._by_checksum.keys()
        # RmapChunk.word stores the id of the shared page a merged page maps;
        # ids of freed pages are reused so they stay small.
        self._by_id: dict[int, KsmPage] = {}
        self._free_ids: list[int] = []
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[KsmPage]:
        return iter(self._by_id.values())

    @property
    def by_checksum(self) -> dict[int, KsmPage]:
        return self._by_checksum

    @property
    def by_id(self) -> dict[int, KsmPage]:
        return self._by_id

    def find(self, checksum: int, page: memoryview) -> KsmPage | None:
        """The shared page whose content is exactly ``page`` (whose digest is ``checksum``), if any.

        ``page`` is a view (of the scanner's read buffer): it is copied for
        the byte comparison only when a digest matches.  The scanner calls
        this for pages whose digest is in :attr:`digests`.
        """
        kpage = self._by_checksum.get(checksum)
        if kpage is None:
            return None
        data = page.tobytes()
        while kpage is not None and kpage.data != data:
            kpage = kpage.next
        return kpage

    def insert(self, checksum: int, data: bytes) -> KsmPage:
        """A new shared page holding ``data`` (with no sharers yet)."""
        kid = self._free_ids.pop() if self._free_ids else self._next_id
        if kid == self._next_id:
            self._next_id += 1
        kpage = KsmPage(kid, checksum, data)
        kpage.next = self._by_checksum.get(checksum)
        self._by_checksum[checksum] = kpage
        self._by_id[kid] = kpage
        return kpage

    def remove(self, kpage: KsmPage) -> None:
        """Free a shared page whose last sharer is gone."""
        del self._by_id[kpage.id]
        self._free_ids.append(kpage.id)
        head = self._by_checksum[kpage.checksum]
        if head is kpage:
            if kpage.next is None:
                del self._by_checksum[kpage.checksum]
            else:
                self._by_checksum[kpage.checksum] = kpage.next
        else:
            while head.next is not kpage:
                assert head.next is not None
                head = head.next
            head.next = kpage.next
        kpage.next = None


# The unstable tree's match check: (candidate loc, checksum, page) -> still there and identical?
Confirm = Callable[[int, int, memoryview], bool]


# Where an entry's page is, to the digest it holds if it is still in the
# tree (its item's state is UNSTABLE), else None: what grow() rehashes by.
EntryDigest = Callable[[int], int | None]


def _table(cells: int) -> tuple[memoryview, memoryview]:
    """Zeroed tag and loc arrays of ``cells`` cells, in anonymous memory.

    An anonymous mapping costs nothing until touched, and is handed back to
    the kernel as soon as the last view of it goes: resetting the table at
    every full scan (5 MiB for 1 GiB registered) then takes microseconds
    instead of the milliseconds that zero-filling an array takes - time the
    scanner would otherwise spend without yielding to the device.
    """
    tags = memoryview(mmap.mmap(-1, 2 * cells)).cast("H")
    locs = memoryview(mmap.mmap(-1, 8 * cells)).cast("Q")
    return tags, locs


class UnstableTree:
    """Pages unchanged for one full scan, found by the digest they had then.

    Why it may be "corrupted", and why that is harmless: its pages belong to
    running processes and may change at any moment after they went in, so an
    entry's digest may no longer describe its page.  An entry is therefore
    only ever a candidate: a match is confirmed by re-reading that page and
    comparing it byte for byte with the page being scanned.  A stale entry
    costs one wasted comparison; it can never produce a wrong merge.  The
    kernel's red-black tree stays balanced however wrong its order becomes;
    a hash table's probe length likewise does not depend on the pages'
    content.  And, as in the kernel, the whole table is dropped at the end of
    every full scan (and when a slot goes away), so stale entries never
    outlive one pass.

    Layout: open addressing with linear probing over two flat arrays (see
    :func:`_table`), 10 bytes per cell, at most half full.  ``loc`` (``(slot number << 32) |
    page index``, never 0) says where the page is; 0 marks an empty cell.
    The high half of the digest picks the home cell; ``tag`` is its low 16
    bits, which spares the caller's check (a Python call) for all but one
    in 65 536 of the entries a probe passes that are not the page sought.
    The tag does not say where an entry's home is, so growing the table asks
    ``entry_digest`` for each entry's digest (the item's own ``word``); an
    entry whose page has left the tree meanwhile is dropped then, which
    changes nothing, since the caller's check would have refused it.  (A
    32-bit tag that also gave the home cell cost 2 more bytes per cell, the
    4 B per page that made the worst case 34.7 B instead of 30.7.)
    Entries are never deleted otherwise: a merged or dropped page leaves a
    stale entry, which fails the caller's check of the item's state.
    """

    __slots__ = ("_count", "_limit", "_locs", "_mask", "_tags", "entry_digest")

    MIN_CELLS = 1024

    def __init__(self, entry_digest: EntryDigest, expected: int = 0) -> None:
        self.entry_digest = entry_digest
        self.reset(expected)

    def __len__(self) -> int:
        return self._count

    def reset(self, expected: int = 0) -> None:
        """Empty the table, sized for ``expected`` entries without growing."""
        cells = self.MIN_CELLS
        while cells < 2 * expected:
            cells <<= 1
        self._tags, self._locs = _table(cells)
        self._mask = cells - 1
        self._limit = cells // 2  # grow rather than be more than half full
        self._count = 0

    def arrays(self) -> tuple[memoryview, memoryview, int]:
        """(tags, locs, mask), for inspection (the consistency checker); valid until the next grow() or reset()."""
        return self._tags, self._locs, self._mask

    def nbytes(self) -> int:
        """Size of the table (all of it, as if every page of it had been touched)."""
        return self._tags.nbytes + self._locs.nbytes

    def search_insert(self, checksum: int, loc: int, page: memoryview, same: Confirm) -> int:
        """Return the ``loc`` of an entry that ``same`` confirms, else insert ``loc`` and return 0.

        ``same(candidate_loc, checksum, page)`` is called only for entries
        whose tag matches; it must check that the candidate is still valid
        and byte-identical to ``page``.  This is the scanner's per-page call
        for every page that passed the checksum gate, so it reads the table
        into locals once and touches nothing else on the common path.

        The table grows *before* an insert would make it more than half
        full, not after: by then the caller has recorded every earlier
        entry's page as in the tree, which grow() asks about.
        """
        if self._count >= self._limit:
            self.grow()
        tag = checksum & 0xFFFF
        mask = self._mask
        tags = self._tags
        locs = self._locs
        i = (checksum >> 32) & mask
        cand = locs[i]
        while cand:
            if tags[i] == tag and same(cand, checksum, page):
                return cand
            i = (i + 1) & mask
            cand = locs[i]
        tags[i] = tag
        locs[i] = loc
        self._count += 1
        return 0

    def insert_run(
        self, checksums: list[int], start: int, stop: int, loc0: int, pages: list[memoryview], same: Confirm
    ) -> tuple[int, int]:
        """:meth:`search_insert` of pages ``start`` to ``stop - 1`` in turn (page ``j`` at ``loc0 + j``) up to a match.

        Returns ``(j, loc)`` for the first page ``j`` that ``same`` confirms
        an entry ``loc`` for (pages before it were inserted, it and those
        after it were not), or ``(stop, 0)``.  The scanner's worst case,
        every page unique and unchanged, in one call for a run: no Python
        call per page.  The table grows first, for the whole run, so the
        entries it asks about are all from earlier calls.
        """
        while self._count + (stop - start) > self._limit:
            self.grow()
        mask = self._mask
        tags = self._tags
        locs = self._locs
        for j in range(start, stop):
            checksum = checksums[j]
            tag = checksum & 0xFFFF
            i = (checksum >> 32) & mask
            cand = locs[i]
            while cand:
                if tags[i] == tag and same(cand, checksum, pages[j]):
                    self._count += j - start
                    return j, cand
                i = (i + 1) & mask
                cand = locs[i]
            tags[i] = tag
            locs[i] = loc0 + j
        self._count += stop - start
        return stop, 0

    def grow(self) -> None:
        # Rare: reset() sizes the table for the pass ahead from the number of
        # items the last pass saw; registering more pages meanwhile grows it.
        old_locs = self._locs
        cells = 2 * (self._mask + 1)
        tags, locs = _table(cells)
        mask = cells - 1
        count = 0
        entry_digest = self.entry_digest
        for loc in old_locs:
            if not loc:
                continue
            checksum = entry_digest(loc)
            if checksum is None:
                continue  # stale: it could match nothing (see above)
            i = (checksum >> 32) & mask
            while locs[i]:
                i = (i + 1) & mask
            tags[i] = checksum & 0xFFFF
            locs[i] = loc
            count += 1
        self._tags, self._locs, self._mask, self._limit, self._count = tags, locs, mask, cells // 2, count
