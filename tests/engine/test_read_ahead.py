"""The scanner's read-ahead: the next window of pages read while this one is scanned (Scanner._window)."""

from __future__ import annotations

import mmap

from xxhash import xxh3_64_intdigest

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine import Engine
from cuse_ksm.engine.check import check_engine
from cuse_ksm.engine.scanner import AHEAD_PAUSE, ASKED_READ_PAGES, BATCH_PAGES, COPY_WAIT_SLICE, WINDOW_PAGES
from tests.engine.fakes import FakeSpace, unique_page

A = 0x7F00_0000_0000
B = 0x7E00_0000_0000
N = 4 * WINDOW_PAGES


class Later:
    """A read whose copy is "in flight" until the test says it is done, or its owner waits for it; records waits.

    A wait (``ready`` with a timeout, or ``result``) completes the copy,
    unless the test ``held`` it: then only the test's ``done`` does.
    """

    def __init__(self, found: bytes | None, lo: int) -> None:
        self.found = found
        self.lo = lo  # its first page, as an index from the space's first page
        self.done = False
        self.results = 0
        self.waited = False
        self.held = False
        self.waits: list[float] = []  # the timeout of each ready() call

    def ready(self, timeout: float = 0.0) -> bool:
        self.waits.append(timeout)
        if timeout and not self.done and not self.held:
            self.done = self.waited = True  # a real copy would have ended during the wait
        return self.done

    def result(self) -> bytes | None:
        self.results += 1
        self.waited |= not self.done  # a real read would have blocked here
        self.done = True
        return self.found


class SlowSpace(FakeSpace):
    """A FakeSpace whose reads started ahead stay in flight until ``done`` is set."""

    def __init__(self, base: int, tgid: int = 1000) -> None:
        super().__init__(tgid)
        self.base = base
        self.started: list[Later] = []

    def start_read(self, addr: int, npages: int, into: mmap.mmap) -> Later:  # type: ignore[override]
        read = Later(self.read_pages(addr, npages, into), (addr - self.base) // PAGE_SIZE)
        self.started.append(read)
        return read


def setup(*bases: int) -> tuple[Engine, list[SlowSpace]]:
    engine = Engine()
    spaces = []
    for i, base in enumerate(bases):
        space = SlowSpace(base, 1000 + i)
        space.map(base, [unique_page(i * N + j) for j in range(N)])
        engine.register(engine.new_sma(), space, base, N)
        spaces.append(space)
    return engine, spaces


def digest(engine: Engine, slot_no: int, index: int) -> int | None:
    return engine.scanner.rmap_item(engine.slots[slot_no], index).checksum


def test_the_first_batch_is_read_now_and_the_next_window_ahead() -> None:
    engine, (space,) = setup(A)
    assert engine.scanner.step(N) == BATCH_PAGES
    assert space.reads == 2  # this batch, and the window after it
    (ahead,) = space.started
    assert ahead.lo == BATCH_PAGES and ahead.results == 0
    ahead.done = True
    # The next batches are carved from the window read ahead: no read until its last batch starts the next.
    assert engine.scanner.step(N) == BATCH_PAGES
    assert ahead.results == 1 and len(space.started) == 2 and space.started[1].lo == BATCH_PAGES + WINDOW_PAGES
    assert digest(engine, 0, BATCH_PAGES) == xxh3_64_intdigest(unique_page(BATCH_PAGES))


def test_a_read_ahead_never_goes_past_the_rounds_budget() -> None:
    engine, (space,) = setup(A)
    assert engine.scanner.step(BATCH_PAGES + 10) == BATCH_PAGES
    (ahead,) = space.started
    assert space.reads == 2 and ahead.found is not None and len(ahead.found) == 10


def test_a_step_whose_read_ahead_is_not_done_while_a_request_waits_returns_at_once() -> None:
    engine, (space,) = setup(A)
    scanner = engine.scanner
    assert scanner.step(N) == BATCH_PAGES
    (ahead,) = space.started
    scanner.interrupt_when(lambda: True)
    assert scanner.step(N) == 0  # no wait: kksmd yields to the request
    assert scanner.step(N) == 0
    assert ahead.results == 0 and scanner.tally.pages_scanned == BATCH_PAGES
    ahead.done = True
    # Done: the batch runs (pages seen for the first time: all of it in one go).
    assert scanner.step(N) == BATCH_PAGES
    assert (ahead.results, ahead.waited) == (1, False)
    # With no request waiting (and AHEAD_PAUSE over), a step waits for its read ahead.
    scanner.interrupt_when(lambda: False)
    scanner._ahead_from = 0.0
    while len(space.started) == 1:
        scanner.step(N)
    later = space.started[1]
    while later.results == 0:
        scanner.step(N)
    assert later.waited
    check_engine(engine)


def test_a_request_that_comes_while_a_copy_is_waited_for_ends_the_step() -> None:
    # The copy is waited for in slices; the driver is asked between two.
    engine, (space,) = setup(A)
    scanner = engine.scanner
    assert scanner.step(N) == BATCH_PAGES
    (ahead,) = space.started
    ahead.held = True
    scanner.interrupt_when(lambda: len(ahead.waits) >= 3)  # a request comes during the second slice
    assert scanner.step(N) == 0
    assert ahead.waits == [0.0, COPY_WAIT_SLICE, COPY_WAIT_SLICE] and ahead.results == 0
    ahead.done = True
    assert scanner.step(N) == BATCH_PAGES
    assert (ahead.results, ahead.waited) == (1, False)
    check_engine(engine)


def test_a_read_ahead_of_a_slot_removed_mid_window_is_collected_and_dropped() -> None:
    engine, (space_a, space_b) = setup(A, B)
    scanner = engine.scanner
    assert scanner.step(2 * N) == BATCH_PAGES
    (ahead,) = space_a.started
    engine.remove_regions(engine.slots[0].sma)
    assert space_a.closed and ahead.results == 0
    ahead.done = True
    assert scanner.step(2 * N) == BATCH_PAGES
    # Collected (its buffer is free again), not used: slot B's first batch was read for it.
    assert ahead.results == 1 and space_b.reads == 2
    assert digest(engine, 0, 0) == xxh3_64_intdigest(unique_page(N))
    assert digest(engine, 0, BATCH_PAGES) is None
    assert scanner.tally.items == BATCH_PAGES
    check_engine(engine)


def test_a_read_ahead_whose_process_is_gone_drops_the_slots_pages() -> None:
    engine, (space,) = setup(A)
    scanner = engine.scanner
    assert scanner.step(N) == BATCH_PAGES
    (ahead,) = space.started
    ahead.found = None  # as ProcessMemory's result() says when the check after the copy finds the process gone
    ahead.done = True
    assert scanner.step(N) == BATCH_PAGES
    assert scanner.tally.items == 0 and engine.slots[0].chunks == {}
    check_engine(engine)


def test_a_window_older_than_window_seconds_is_read_again() -> None:
    engine, (space,) = setup(A)
    scanner = engine.scanner
    assert scanner.step(N) == BATCH_PAGES
    (ahead,) = space.started
    ahead.done = True
    space.write(A + BATCH_PAGES * PAGE_SIZE, unique_page(10**6))  # after the read ahead
    assert scanner._ahead is not None
    scanner._ahead.t -= 1.0  # read a second ago (a round that ended, the scanner stopped...)
    assert scanner.step(N) == BATCH_PAGES
    assert ahead.results == 1 and space.reads == 4  # collected; the batch read again, and the next window ahead
    assert digest(engine, 0, BATCH_PAGES) == xxh3_64_intdigest(unique_page(10**6))


def test_no_read_ahead_starts_for_ahead_pause_after_a_request_interrupted() -> None:
    engine, (space,) = setup(A)
    scanner = engine.scanner
    waiting = [False]
    scanner.interrupt_when(lambda: waiting[0])
    # Pages seen once, so that the batch loop asks interrupt() (not the first-sight path).
    scanner.step(N)
    for read in space.started:
        read.done = True
    while scanner.tally.full_scans == 0:
        scanner.step(N)
    waiting[0] = True
    assert 0 < scanner.step(N) < BATCH_PAGES  # a request ends the batch (its window's read ahead had started)...
    started = len(space.started)
    waiting[0] = False
    for _ in range(6):
        scanner.step(N)
    # ... and for AHEAD_PAUSE every batch is read when it is scanned.
    assert len(space.started) == started and scanner.tally.pages_scanned > N + 3 * BATCH_PAGES
    assert scanner._ahead_from - AHEAD_PAUSE > 0
    scanner._ahead_from -= AHEAD_PAUSE  # the pause is over
    scanner.step(N)
    assert len(space.started) == started + 1


def test_while_requests_come_the_scanner_reads_a_few_pages_at_a_time() -> None:
    # No read ahead then, so the scanner copies each batch itself, and a
    # request that arrives meanwhile waits for the whole copy.
    engine, (space,) = setup(A)
    scanner = engine.scanner
    engine.interrupt_when(lambda: True)
    assert engine.interrupted()  # a request, as kksmd sees one between two steps
    engine.interrupt_when(None)
    assert scanner.step(N) == ASKED_READ_PAGES < BATCH_PAGES
    assert scanner.step(N) == ASKED_READ_PAGES
    assert space.reads == 2 and space.started == []
    scanner._ahead_from -= AHEAD_PAUSE  # the pause is over: the rest of the batch, and the window after it
    assert scanner.step(N) == BATCH_PAGES - 2 * ASKED_READ_PAGES
    assert space.reads == 4 and len(space.started) == 1
    assert scanner.tally.items == BATCH_PAGES
    check_engine(engine)


def test_a_request_the_driver_sees_between_steps_pauses_the_read_ahead_too() -> None:
    engine, (space,) = setup(A)
    scanner = engine.scanner
    waiting = [False]
    engine.interrupt_when(lambda: waiting[0])
    scanner.step(N)
    assert len(space.started) == 1
    for read in space.started:
        read.done = True
    while len(space.started) == 1:
        scanner.step(N)  # the next window is started when this one is taken into use
    assert not engine.interrupted()
    waiting[0] = True
    assert engine.interrupted()  # kksmd's check after a step (kksmd.scan)
    waiting[0] = False
    started = len(space.started)
    for read in space.started:
        read.done = True
    for _ in range(8):
        scanner.step(N)
    assert len(space.started) == started  # for AHEAD_PAUSE, batches are read when scanned
