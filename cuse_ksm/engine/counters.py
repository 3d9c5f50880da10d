"""The scanner's running counts, and the counters they mean.

The scanner keeps a :class:`Tally` of its reverse-map items by state and
updates it as items change state; :class:`Counters` is the view later
kernels show under /sys/kernel/mm/ksm, derived from the tally and the
stable tree's size in one place (:meth:`Tally.counters`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counters:
    """What later kernels show under /sys/kernel/mm/ksm.

    pages_shared: shared pages in use; pages_sharing: how many more pages
    map them (the memory saved, in pages); pages_unshared: pages in the
    unstable tree, unique so far; pages_volatile: pages seen but changing
    too fast to enter it; full_scans and pages_scanned: the scanner's
    progress; max_kernel_pages: the limit on shared pages (0: none).
    """

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
        )
