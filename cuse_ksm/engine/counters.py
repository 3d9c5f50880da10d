"""The scanner's running counts, and the counters they mean.

The scanner keeps a :class:`Tally` of its reverse-map items by state and
updates it as items change state; :class:`Counters` is the view later
kernels show under /sys/kernel/mm/ksm, derived from the tally and the
stable tree's size in one place (:meth:`Tally.counters`).

The profit figures of today's kernel (6.4+; Documentation/admin-guide/mm/
ksm.rst, "Monitoring KSM profit") are here too, as functions of those
counts: :func:`general_profit` (/sys/kernel/mm/ksm/general_profit) and
:attr:`ProcessStat.profit` (``ksm_process_profit`` in /proc/PID/ksm_stat).  Both
charge :data:`RMAP_ITEM_BYTES` per reverse-map item; what this emulator
really spends instead is :mod:`cuse_ksm.engine.memory`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass

from cuse_ksm.abi import PAGE_SIZE

# sizeof(struct ksm_rmap_item) on 64-bit kernels, the cost per item that the
# kernel's profit formulas charge.
RMAP_ITEM_BYTES = 64


def general_profit(pages_sharing: int, rmap_items: int, zero_pages: int = 0) -> int:
    """The kernel's general_profit in bytes: pages saved, less 64 bytes per reverse-map item.

    (pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * 64; negative
    while the items cost more than merging saves.  The 2009 driver had no
    zero-page merging (use_zero_pages), so the emulator's zero_pages is 0.
    """
    return (pages_sharing + zero_pages) * PAGE_SIZE - rmap_items * RMAP_ITEM_BYTES


@dataclass(frozen=True)
class ProcessStat:
    """The figures of today's /proc/PID/ksm_stat for one process, as the emulated scanner sees it.

    rmap_items: its pages seen present; merging_pages: those that map a
    shared page (ksm_merging_pages); zero_pages: always 0 here, the 2009
    driver never mapped the zero page (no use_zero_pages).
    """

    rmap_items: int
    merging_pages: int
    zero_pages: int = 0

    @property
    def profit(self) -> int:
        """ksm_process_profit in bytes: (ksm_merging_pages + ksm_zero_pages) * PAGE_SIZE - ksm_rmap_items * 64.

        It counts every page of the process that maps a shared page, the
        one the shared page stands for included, so the processes' profits
        add up to more than general_profit: by pages_shared pages.
        """
        return (self.merging_pages + self.zero_pages) * PAGE_SIZE - self.rmap_items * RMAP_ITEM_BYTES


@dataclass(frozen=True)
class Counters:
    """What later kernels show under /sys/kernel/mm/ksm.

    pages_shared: shared pages in use; pages_sharing: how many more pages
    map them (the memory saved, in pages); pages_unshared: pages in the
    unstable tree, unique so far; pages_volatile: pages seen but changing
    too fast to enter it; full_scans and pages_scanned: the scanner's
    progress; max_kernel_pages: the limit on shared pages (0: none);
    rmap_items: reverse-map items, one per page seen present (which the
    kernel counts but shows only through general_profit).
    """

    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    full_scans: int
    pages_scanned: int
    max_kernel_pages: int
    rmap_items: int

    @property
    def kernel_pages_allocated(self) -> int:
        """The 2009 v4 name of pages_shared."""
        return self.pages_shared

    @property
    def general_profit(self) -> int:
        """Today's kernel's general_profit, in bytes, for these counts (:func:`general_profit`)."""
        return general_profit(self.pages_sharing, self.rmap_items)


@dataclass(slots=True)
class Tally:
    """Counts the scanner keeps up to date as it works (check.py recounts them)."""

    items: int = 0  # reverse-map items (pages seen present)
    unshared: int = 0  # items in state UNSTABLE
    sharers: int = 0  # items in state MERGED
    full_scans: int = 0
    pages_scanned: int = 0
    errors: int = 0  # unexpected exceptions caught in the scanner

    def counters(self, pages_shared: int, max_kernel_pages: int) -> Counters:
        return Counters(
            pages_shared=pages_shared,
            pages_sharing=self.sharers - pages_shared,
            pages_unshared=self.unshared,
            pages_volatile=self.items - self.sharers - self.unshared,
            full_scans=self.full_scans,
            pages_scanned=self.pages_scanned,
            max_kernel_pages=max_kernel_pages,
            rmap_items=self.items,
        )
