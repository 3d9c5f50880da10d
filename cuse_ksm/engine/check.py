"""A full walk of the engine's state: trees, reverse map, ring and counters.

:func:`check_engine` recounts everything the engine keeps incrementally and
compares: every MERGED item points at a live :class:`KsmPage` whose
``sharers`` is exactly the number of items pointing at it, every shared page
is reachable from the stable tree's digest chains exactly once and holds the
content its digest says, each slot's ``pages_merged`` and the global
counters equal what a recount gives, the scan ring and the SMA lists agree
with the slot list, and no item lies outside its slot.

It reads engine internals on purpose (it is the engine's own invariant
checker, for tests and fuzzing) and changes nothing.  It costs a pass over
every reverse-map item, so it is not for the request path.  Violations
raise :class:`EngineInconsistent` with every problem found, not just the
first.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from xxhash import xxh3_64_intdigest

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine.trees import CHUNK_PAGES, CHUNK_SHIFT, ITEM_STATES, MERGED, NO_ITEM_STATES, UNSTABLE

if TYPE_CHECKING:
    from cuse_ksm.engine.core import Engine
    from cuse_ksm.engine.trees import KsmPage


class EngineInconsistent(AssertionError):
    """The engine's incremental bookkeeping disagrees with a recount."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("engine state inconsistent:\n  " + "\n  ".join(problems))
        self.problems = problems


def problems(engine: Engine) -> list[str]:
    """Every inconsistency found in ``engine``; empty when all is well."""
    out: list[str] = []
    bad = out.append
    stable = engine.stable

    # -- slots, SMAs, ring ------------------------------------------------------
    ids = [id(s) for s in engine.slots]
    if len(ids) != len(set(ids)):
        bad("a slot appears twice in Engine.slots")
    from_smas = [s for sma in engine.smas.values() for s in sma.slots]
    if sorted(map(id, from_smas)) != sorted(ids):
        bad("Engine.slots and the SMAs' slot lists disagree")
    for sma_id, sma in engine.smas.items():
        if sma.id != sma_id:
            bad(f"SMA {sma.id} filed under id {sma_id}")
    seqs = [s.seq for s in engine.slots]
    if seqs != sorted(seqs):
        bad(f"slots not in registration order: {seqs}")
    ring = dict(engine.registry.ring.items())
    if set(ring) != set(seqs) or any(ring[s.seq] is not s for s in engine.slots):
        bad("the scan ring does not hold exactly the registered slots")
    numbered = engine.scanner.numbered
    for slot in engine.slots:
        if not (0 < slot.no < len(numbered)) or numbered[slot.no] is not slot:
            bad(f"slot {slot.seq} has unstable-tree number {slot.no}, which names another slot")
        if slot.sma.id not in engine.smas or engine.smas[slot.sma.id] is not slot.sma:
            bad(f"slot {slot.seq} outlived its SMA {slot.sma.id}")
        if slot.npages < 0 or slot.npages >= 2**32:
            bad(f"slot {slot.seq}: npages {slot.npages} is not a __u32")
        if getattr(slot.space, "closed", False):
            bad(f"slot {slot.seq} holds a closed address space")
    live_pages = sum(s.npages for s in engine.slots if not s.gone)
    if engine.registry.live_pages != live_pages:
        bad(f"live_pages {engine.registry.live_pages}, recount {live_pages}")

    # -- reverse map --------------------------------------------------------------
    items = unshared = sharers = 0
    by_kpage: Counter[int] = Counter()
    for slot in engine.slots:
        merged = 0
        if slot.gone and (slot.chunks or slot.pages_merged):
            bad(f"slot {slot.seq} is gone but still has items")
        nchunks = (slot.npages + CHUNK_PAGES - 1) >> CHUNK_SHIFT
        for ci, chunk in slot.chunks.items():
            if not 0 <= ci < nchunks:
                bad(f"slot {slot.seq}: chunk {ci} lies beyond its {slot.npages} pages")
                continue
            state, word = chunk.state, chunk.word
            # A chunk that never held an item may have no checksum column.
            if len(state) != CHUNK_PAGES or len(word) not in (CHUNK_PAGES, 0):
                bad(f"slot {slot.seq} chunk {ci}: arrays of {len(state)}/{len(word)} entries")
                continue
            for k in range(CHUNK_PAGES):
                st = state[k]
                index = (ci << CHUNK_SHIFT) + k
                if st in NO_ITEM_STATES:
                    if word and word[k]:
                        bad(f"slot {slot.seq} page {index}: no item but word {word[k]:#x}")
                    if st and index >= slot.npages:
                        bad(f"slot {slot.seq}: state {st:#x} at page {index}, past its {slot.npages} pages")
                    continue
                if st not in ITEM_STATES:
                    bad(f"slot {slot.seq} page {index}: unknown state {st}")
                    continue
                if not word:
                    bad(f"slot {slot.seq} page {index}: an item in a chunk with no checksum column")
                    continue
                if index >= slot.npages:
                    bad(f"slot {slot.seq}: item at page {index}, past its {slot.npages} pages")
                items += 1
                if st == UNSTABLE:
                    unshared += 1
                elif st == MERGED:
                    sharers += 1
                    merged += 1
                    by_kpage[word[k]] += 1
                    if word[k] not in stable.by_id:
                        bad(f"slot {slot.seq} page {index} is MERGED into shared page {word[k]}, which does not exist")
        if slot.pages_merged != merged:
            bad(f"slot {slot.seq}: pages_merged {slot.pages_merged}, recount {merged}")

    # -- stable tree ----------------------------------------------------------------
    reached: Counter[int] = Counter()
    for checksum, head in stable.by_checksum.items():
        chained: KsmPage | None = head
        hops = 0
        contents: set[bytes] = set()
        while chained is not None:
            kpage = chained
            hops += 1
            if hops > len(stable.by_id) + 1:
                bad(f"digest chain {checksum:#x} loops")
                break
            reached[kpage.id] += 1
            if stable.by_id.get(kpage.id) is not kpage:
                bad(f"shared page {kpage.id} is in a digest chain but not in by_id")
            if kpage.checksum != checksum:
                bad(f"shared page {kpage.id} with digest {kpage.checksum:#x} chained under {checksum:#x}")
            if len(kpage.data) != PAGE_SIZE or xxh3_64_intdigest(kpage.data) != kpage.checksum:
                bad(f"shared page {kpage.id}: content does not match its digest")
            if kpage.data in contents:
                bad(f"two shared pages hold the same content under digest {checksum:#x}")
            contents.add(kpage.data)
            chained = kpage.next
    for kid, kpage in stable.by_id.items():
        if kpage.id != kid:
            bad(f"shared page {kpage.id} filed under id {kid}")
        if reached[kid] != 1:
            bad(f"shared page {kid} reachable {reached[kid]} times from the digest chains")
        if kpage.sharers != by_kpage[kid]:
            bad(f"shared page {kid}: sharers {kpage.sharers}, items pointing at it {by_kpage[kid]}")
        if kpage.sharers < 1:
            bad(f"shared page {kid} has no sharer and was not freed")
    free = stable._free_ids
    if len(free) != len(set(free)) or set(free) & set(stable.by_id):
        bad("the free-id list holds duplicates or ids in use")

    # -- unstable tree ------------------------------------------------------------
    ut = engine.unstable
    tags, locs, mask = ut.arrays()
    cells = mask + 1
    if cells & mask or len(tags) != cells or len(locs) != cells:
        bad(f"unstable table of {cells} cells is malformed")
    else:
        used = cells - locs.tolist().count(0)
        if used != len(ut):
            bad(f"unstable table holds {used} entries, counts {len(ut)}")
        if 2 * len(ut) > cells:
            bad(f"unstable table more than half full ({len(ut)}/{cells})")

    # -- counters -------------------------------------------------------------------
    tally = engine.scanner.tally
    if tally.items != items:
        bad(f"tally.items {tally.items}, recount {items}")
    if tally.unshared != unshared:
        bad(f"tally.unshared {tally.unshared}, recount {unshared}")
    if tally.sharers != sharers:
        bad(f"tally.sharers {tally.sharers}, recount {sharers}")
    c = engine.counters()
    if c.pages_shared != len(stable.by_id) or c.pages_shared != len(by_kpage):
        bad(f"pages_shared {c.pages_shared}, shared pages {len(stable.by_id)}, in use {len(by_kpage)}")
    if c.pages_sharing != sharers - len(by_kpage):
        bad(f"pages_sharing {c.pages_sharing}, recount {sharers - len(by_kpage)}")
    if c.pages_unshared != unshared:
        bad(f"pages_unshared {c.pages_unshared}, recount {unshared}")
    if c.pages_volatile != items - sharers - unshared:
        bad(f"pages_volatile {c.pages_volatile}, recount {items - sharers - unshared}")
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans", "pages_scanned"):
        if getattr(c, name) < 0:
            bad(f"{name} is negative: {getattr(c, name)}")
    kt = engine.kthread
    if not (0 <= kt.sleep < 2**32 and 0 <= kt.pages_to_scan < 2**32 and 0 <= kt.flags < 2**32):
        bad(f"kthread parameters out of range: {kt}")
    if engine.errors:
        bad(f"the scanner caught {engine.errors} unexpected exception(s)")
    return out


def check_engine(engine: Engine) -> None:
    """Raise :class:`EngineInconsistent` unless the engine's state is consistent."""
    found = problems(engine)
    if found:
        raise EngineInconsistent(found)
