"""What the engine itself spends on memory, part by part: the emulator's real price of merging.

Today's kernel charges 64 bytes per reverse-map item in its profit figures
(:func:`cuse_ksm.engine.counters.general_profit`).  This emulator's items
are stored otherwise (trees.py: 9 bytes of arrays per page, in chunks), and
it has costs the kernel has not (a hash table for the unstable tree, a copy
of every shared page).  :func:`measure` adds up what the engine's objects
occupy, from their sizes (``sys.getsizeof``), without walking every page:

* ``rmap``: the :class:`~cuse_ksm.engine.trees.RmapChunk` arrays of every
  slot, and the dicts that hold them;
* ``unstable``: the unstable tree's table, counted in full as if every page
  of its anonymous mapping had been touched;
* ``stable``: the :class:`~cuse_ksm.engine.trees.KsmPage` objects and the
  stable tree's indexes, without the pages' contents;
* ``copies``: the contents, one copy of each shared page.  They stand for
  the shared pages themselves, which the kernel's formula already nets out
  of pages_sharing, so the metadata leaves them out;
* ``slots``: the :class:`~cuse_ksm.engine.registry.Slot` objects, and the
  list that numbers them for the unstable tree;
* ``buffer``: the scanner's two read buffers (2 MiB each: the window it
  scans and the one read ahead) and their page views, a
  fixed cost whatever is registered.

The figure per registered page leaves the fixed buffer out, as ``make
bench`` does; the profit charges it.  Not counted: the interpreter and the
daemon around the engine, and anything in the scanned processes.
bench/emulator.py checks these sums against tracemalloc's count of the
same engine, and so does tests/engine/test_memory.py.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine.trees import RmapChunk

if TYPE_CHECKING:
    from cuse_ksm.engine.scanner import Scanner


def _chunk_bytes() -> int:
    chunk = RmapChunk()
    return sys.getsizeof(chunk) + sys.getsizeof(chunk.state)


# Every chunk is built the same way, so each occupies the same bytes, but
# for its checksum column, which a chunk of pages with no item lacks
# (trees.py): that one is measured chunk by chunk.
CHUNK_BYTES = _chunk_bytes()
_words = operator.attrgetter("word")


@dataclass(frozen=True)
class EngineMemory:
    """The engine's memory, in bytes per part, with what it serves (see the module's docstring)."""

    rmap: int
    unstable: int
    stable: int
    copies: int
    slots: int
    buffer: int
    registered_pages: int  # pages of the slots still scanned (Registry.live_pages)
    rmap_items: int  # pages seen present, as the kernel counts rmap items
    pages_sharing: int

    @property
    def metadata(self) -> int:
        """Everything but the shared pages' copies: the emulator's counterpart of the kernel's rmap items."""
        return self.rmap + self.unstable + self.stable + self.slots + self.buffer

    @property
    def total(self) -> int:
        return self.metadata + self.copies

    @property
    def per_registered_page(self) -> float:
        """Metadata bytes per registered page, the fixed buffer apart (as ``make bench`` reports it); 0 with none."""
        return (self.metadata - self.buffer) / self.registered_pages if self.registered_pages else 0.0

    @property
    def per_rmap_item(self) -> float:
        """The same per page seen present: against the kernel's 64 bytes per rmap item."""
        return (self.metadata - self.buffer) / self.rmap_items if self.rmap_items else 0.0

    @property
    def profit(self) -> int:
        """general_profit's saving, less what this engine really spends on metadata instead of 64 B per item."""
        return self.pages_sharing * PAGE_SIZE - self.metadata


def measure(scanner: Scanner) -> EngineMemory:
    """The engine's memory now.  O(slots): reads sizes, never walks the pages."""
    registry = scanner.registry
    rmap = slots = 0
    for slot in registry.slots:
        chunks = slot.chunks
        # The dict, its keys (ints; the small ones are shared, a few bytes
        # overcounted) and its chunks.
        rmap += sys.getsizeof(chunks) + sum(map(sys.getsizeof, chunks)) + len(chunks) * CHUNK_BYTES
        rmap += sum(map(sys.getsizeof, map(_words, chunks.values())))
        slots += sys.getsizeof(slot) + sys.getsizeof(slot.__dict__)
    stable = scanner.stable
    nshared = len(stable)
    stable_bytes = sys.getsizeof(stable.by_checksum) + sys.getsizeof(stable.by_id)
    copies = 0
    if nshared:
        # Every shared page is one object with a page-sized copy, its digest
        # and its id: measure one and multiply.
        kpage = next(iter(stable))
        stable_bytes += nshared * (sys.getsizeof(kpage) + sys.getsizeof(kpage.checksum) + sys.getsizeof(kpage.id))
        copies = nshared * sys.getsizeof(kpage.data)
    slots += sys.getsizeof(scanner.numbered)
    c = scanner.tally.counters(nshared, scanner.max_kernel_pages)
    return EngineMemory(
        rmap=rmap,
        unstable=scanner.unstable.nbytes(),
        stable=stable_bytes,
        copies=copies,
        slots=slots,
        buffer=scanner.buffer_bytes(),
        registered_pages=registry.live_pages,
        rmap_items=c.rmap_items,
        pages_sharing=c.pages_sharing,
    )
