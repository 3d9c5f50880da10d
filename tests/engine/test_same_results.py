"""The scanner's results, pass by pass, on the benchmark's workloads and the cross-check patterns.

Issue 14 made the scanner faster (bulk paths, batches hashed in one call,
pre-emption between pages); none of that may change what it finds.  The
counters after every pass below were recorded from the scanner as it was
before that work (10158a9), on the same layouts as bench/workload.py and
tests/c/ksm_crosscheck.c, small enough for a unit test.  Each layout is
scanned twice: in whole passes (``scan_now``) and in the daemon's small
rounds (budgets that cut batches anywhere), which must agree.
"""

from __future__ import annotations

import zlib

import pytest

from cuse_ksm.engine import Engine, Slot
from cuse_ksm.engine.check import check_engine
from tests.engine.fakes import FakeSpace, rewrite_volatile, workload

ADDR = 0x7F10_0000_0000
PASSES = 4


LAYOUTS = {
    "dup50": 2048,
    "tail8": 1500,
    "equal": 512,
    "half": 1024,
    "volatile": 1024,
    "tail": 1024,
    "tailgroup": 1024,
    "zeroread": 512,
}


def _space(layout: str) -> FakeSpace:
    space = FakeSpace()
    space.map(ADDR, workload(layout, LAYOUTS[layout]))
    return space


def _states(slot: Slot) -> int:
    """A fingerprint of every page's state byte (what processes/PID/pages shows)."""
    return zlib.crc32(b"".join(bytes(slot.chunks[ci].state) for ci in sorted(slot.chunks)))


def _run(layout: str, budget: int | None, *, interrupted: bool = False) -> list[tuple[int, ...]]:
    """The counters (and pages merged in the slot) after each of PASSES full scans.

    ``interrupted``: a request is always waiting, so every batch ends at the
    first page where the scanner asks (Engine.interrupt_when).
    """
    space = _space(layout)
    engine = Engine()
    if interrupted:
        engine.interrupt_when(lambda: True)
    slot = engine.register(engine.new_sma(), space, ADDR, LAYOUTS[layout])
    out: list[tuple[int, ...]] = []
    writes = 0
    for _ in range(PASSES):
        scans = engine.counters().full_scans
        while engine.counters().full_scans == scans:
            if budget is None:
                engine.scan_now(1 << 40, stop_at_wrap=True)
            else:
                engine.scan_step(budget)
                if layout == "volatile":
                    writes += 1
                    rewrite_volatile(space, ADDR, LAYOUTS["volatile"], writes)
        if layout == "volatile" and budget is None:
            writes += 1
            rewrite_volatile(space, ADDR, LAYOUTS["volatile"], writes)
        c = engine.counters()
        c_ = (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile, c.pages_scanned, c.rmap_items)
        out.append((*c_, slot.pages_merged, _states(slot)))
        check_engine(engine)
    return out


# Recorded from the scanner at 10158a9 (before issue 14's work): (pages_shared,
# pages_sharing, pages_unshared, pages_volatile, pages_scanned, rmap_items,
# slot.pages_merged, a CRC of the pages' state bytes) after each pass, in whole passes and in rounds of 100 pages.
EXPECTED: dict[tuple[str, int | None], list[tuple[int, ...]]] = {
    ("dup50", None): [
        (0, 0, 0, 2048, 2048, 2048, 0, 761955282),
        (64, 960, 1024, 0, 4096, 2048, 1024, 741252664),
        (64, 960, 1024, 0, 6144, 2048, 1024, 741252664),
        (64, 960, 1024, 0, 8192, 2048, 1024, 741252664),
    ],
    ("dup50", 100): [
        (0, 0, 0, 2048, 2048, 2048, 0, 761955282),
        (64, 960, 1024, 0, 4096, 2048, 1024, 741252664),
        (64, 960, 1024, 0, 6144, 2048, 1024, 741252664),
        (64, 960, 1024, 0, 8192, 2048, 1024, 741252664),
    ],
    ("dup50", 37): [
        (0, 0, 0, 2048, 2048, 2048, 0, 761955282),
        (64, 960, 1024, 0, 4096, 2048, 1024, 741252664),
        (64, 960, 1024, 0, 6144, 2048, 1024, 741252664),
        (64, 960, 1024, 0, 8192, 2048, 1024, 741252664),
    ],
    ("tail8", None): [
        (0, 0, 0, 1500, 1500, 1500, 0, 3542927271),
        (0, 0, 1500, 0, 3000, 1500, 0, 3373116045),
        (0, 0, 1500, 0, 4500, 1500, 0, 3373116045),
        (0, 0, 1500, 0, 6000, 1500, 0, 3373116045),
    ],
    ("tail8", 100): [
        (0, 0, 0, 1500, 1500, 1500, 0, 3542927271),
        (0, 0, 1500, 0, 3000, 1500, 0, 3373116045),
        (0, 0, 1500, 0, 4500, 1500, 0, 3373116045),
        (0, 0, 1500, 0, 6000, 1500, 0, 3373116045),
    ],
    ("tail8", 37): [
        (0, 0, 0, 1500, 1500, 1500, 0, 3542927271),
        (0, 0, 1500, 0, 3000, 1500, 0, 3373116045),
        (0, 0, 1500, 0, 4500, 1500, 0, 3373116045),
        (0, 0, 1500, 0, 6000, 1500, 0, 3373116045),
    ],
    ("equal", None): [
        (0, 0, 0, 512, 512, 512, 0, 2212873983),
        (1, 511, 0, 0, 1024, 512, 512, 3782910449),
        (1, 511, 0, 0, 1536, 512, 512, 3782910449),
        (1, 511, 0, 0, 2048, 512, 512, 3782910449),
    ],
    ("equal", 100): [
        (0, 0, 0, 512, 512, 512, 0, 2212873983),
        (1, 511, 0, 0, 1024, 512, 512, 3782910449),
        (1, 511, 0, 0, 1536, 512, 512, 3782910449),
        (1, 511, 0, 0, 2048, 512, 512, 3782910449),
    ],
    ("equal", 37): [
        (0, 0, 0, 512, 512, 512, 0, 2212873983),
        (1, 511, 0, 0, 1024, 512, 512, 3782910449),
        (1, 511, 0, 0, 1536, 512, 512, 3782910449),
        (1, 511, 0, 0, 2048, 512, 512, 3782910449),
    ],
    ("half", None): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (4, 508, 512, 0, 2048, 1024, 512, 692119226),
        (4, 508, 512, 0, 3072, 1024, 512, 692119226),
        (4, 508, 512, 0, 4096, 1024, 512, 692119226),
    ],
    ("half", 100): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (4, 508, 512, 0, 2048, 1024, 512, 692119226),
        (4, 508, 512, 0, 3072, 1024, 512, 692119226),
        (4, 508, 512, 0, 4096, 1024, 512, 692119226),
    ],
    ("half", 37): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (4, 508, 512, 0, 2048, 1024, 512, 692119226),
        (4, 508, 512, 0, 3072, 1024, 512, 692119226),
        (4, 508, 512, 0, 4096, 1024, 512, 692119226),
    ],
    ("volatile", None): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (1, 767, 0, 256, 2048, 1024, 768, 1306103648),
        (1, 767, 0, 256, 3072, 1024, 768, 1306103648),
        (1, 767, 0, 256, 4096, 1024, 768, 1306103648),
    ],
    ("volatile", 100): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (1, 767, 0, 256, 2048, 1024, 768, 1306103648),
        (1, 767, 0, 256, 3072, 1024, 768, 1306103648),
        (1, 767, 0, 256, 4096, 1024, 768, 1306103648),
    ],
    ("volatile", 37): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (1, 767, 0, 256, 2048, 1024, 768, 1306103648),
        (1, 767, 0, 256, 3072, 1024, 768, 1306103648),
        (1, 767, 0, 256, 4096, 1024, 768, 1306103648),
    ],
    ("tail", None): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (0, 0, 1024, 0, 2048, 1024, 0, 3319445832),
        (0, 0, 1024, 0, 3072, 1024, 0, 3319445832),
        (0, 0, 1024, 0, 4096, 1024, 0, 3319445832),
    ],
    ("tail", 100): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (0, 0, 1024, 0, 2048, 1024, 0, 3319445832),
        (0, 0, 1024, 0, 3072, 1024, 0, 3319445832),
        (0, 0, 1024, 0, 4096, 1024, 0, 3319445832),
    ],
    ("tail", 37): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (0, 0, 1024, 0, 2048, 1024, 0, 3319445832),
        (0, 0, 1024, 0, 3072, 1024, 0, 3319445832),
        (0, 0, 1024, 0, 4096, 1024, 0, 3319445832),
    ],
    ("tailgroup", None): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (128, 896, 0, 0, 2048, 1024, 1024, 3505205883),
        (128, 896, 0, 0, 3072, 1024, 1024, 3505205883),
        (128, 896, 0, 0, 4096, 1024, 1024, 3505205883),
    ],
    ("tailgroup", 100): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (128, 896, 0, 0, 2048, 1024, 1024, 3505205883),
        (128, 896, 0, 0, 3072, 1024, 1024, 3505205883),
        (128, 896, 0, 0, 4096, 1024, 1024, 3505205883),
    ],
    ("tailgroup", 37): [
        (0, 0, 0, 1024, 1024, 1024, 0, 4202832925),
        (128, 896, 0, 0, 2048, 1024, 1024, 3505205883),
        (128, 896, 0, 0, 3072, 1024, 1024, 3505205883),
        (128, 896, 0, 0, 4096, 1024, 1024, 3505205883),
    ],
    ("zeroread", None): [
        (0, 0, 0, 256, 256, 256, 0, 1187358154),
        (1, 255, 0, 0, 512, 256, 256, 3740086918),
        (1, 255, 0, 0, 768, 256, 256, 3740086918),
        (1, 255, 0, 0, 1024, 256, 256, 3740086918),
    ],
    ("zeroread", 100): [
        (0, 0, 0, 256, 256, 256, 0, 1187358154),
        (1, 255, 0, 0, 512, 256, 256, 3740086918),
        (1, 255, 0, 0, 768, 256, 256, 3740086918),
        (1, 255, 0, 0, 1024, 256, 256, 3740086918),
    ],
    ("zeroread", 37): [
        (0, 0, 0, 256, 256, 256, 0, 1187358154),
        (1, 255, 0, 0, 512, 256, 256, 3740086918),
        (1, 255, 0, 0, 768, 256, 256, 3740086918),
        (1, 255, 0, 0, 1024, 256, 256, 3740086918),
    ],
}


@pytest.mark.parametrize("budget", [None, 100, 37])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_counters_after_each_pass_as_before(layout: str, budget: int | None) -> None:
    assert _run(layout, budget) == EXPECTED[layout, budget]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batches_cut_short_by_requests_find_the_same(layout: str) -> None:
    assert _run(layout, None, interrupted=True) == EXPECTED[layout, None]
