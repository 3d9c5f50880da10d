"""kksmd: the trio task that runs the engine's scanner, as the 2009 driver's kernel thread did.

While the run flag is set and ``pages_to_scan`` is not 0, it scans
``pages_to_scan`` pages, sleeps ``sleep`` microseconds, and again;
otherwise (or with nothing registered) it waits until the engine reports a
change.  A change of parameters (START_STOP_KTHREAD) also cuts a sleep
short and ends a round at its next batch, so a new setting takes effect at
once.

The engine is pure logic and never waits; this module is the one that owns
time: it decides when the scanner runs and when it yields to the rest of
the daemon (the device answering ioctls on the same trio loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

from cuse_ksm.engine import Engine

# The scanner yields to trio (lets the device answer ioctls) as soon as it
# has worked this long since it last yielded.  A batch is at most about
# 0.5 ms more (scanner.BATCH_SECONDS), so no request waits for much more
# than 1 ms of scanning.
YIELD_SECONDS = 0.0005


class _Wakeups:
    """The two things kksmd waits for, set by the engine's change reports."""

    def __init__(self) -> None:
        # The idle wait ends on any change; the sleep between two rounds
        # ends on a change of parameters only.
        self.idle = trio.Event()
        self.params = trio.Event()

    def changed(self, params: bool) -> None:
        self.idle.set()
        if params:
            self.params.set()


# How many times in a row the scanner steps aside for a request that is
# still waiting, before it goes on regardless (see scan()).
YIELDS_TO_A_REQUEST = 2
# After stepping aside, the scanner works at least this long before a
# waiting request may interrupt it again: a client that calls ioctls back
# to back would otherwise leave it a few pages per request.
SCAN_AT_LEAST = 0.0002


async def run(
    engine: Engine,
    *,
    pending: Callable[[], bool] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Scan while told to run, idle otherwise.  Never returns; cancel it to stop.

    ``pending()``, if given, says whether a request is waiting to be read
    (in the daemon, a poll of the CUSE channel: :meth:`Server.waiting`).  The
    scanner asks it between pages and after each batch, and steps aside at
    once when it says yes, so that a request waits for a few pages of
    scanning instead of up to a millisecond of it.
    """
    wake = _Wakeups()
    unwatch = engine.watch(wake.changed)
    quiet = _Quiet(pending) if pending is not None else None
    engine.interrupt_when(quiet.interrupts if quiet is not None else None)
    try:
        task_status.started()
        while True:
            if not engine.running():
                # No await between the test above and creating the event:
                # a change cannot slip in between and be lost.
                wake.idle = trio.Event()
                await wake.idle.wait()
                continue
            k = engine.kthread
            await scan(engine, k.pages_to_scan, quiet)
            if engine.kthread is not k:
                continue  # new parameters: act on them now
            if k.sleep:
                wake.params = trio.Event()
                with trio.move_on_after(k.sleep / 1e6):
                    await wake.params.wait()
            else:
                await trio.lowlevel.checkpoint()
    finally:
        engine.interrupt_when(None)
        unwatch()


class _Quiet:
    """Whether a request waits, as the scanner asks it: not again until it has worked SCAN_AT_LEAST."""

    def __init__(self, pending: Callable[[], bool]) -> None:
        self.pending = pending
        self.not_before = 0.0

    def interrupts(self) -> bool:
        """Asked between pages: end the batch now?"""
        return time.perf_counter() >= self.not_before and self.pending()

    def stepped_aside(self) -> None:
        self.not_before = time.perf_counter() + SCAN_AT_LEAST


async def scan(engine: Engine, npages: int, quiet: _Quiet | None = None) -> None:
    """One round: scan up to ``npages`` pages, yielding to trio between batches.

    A stop (or any change of parameters) takes effect at the next batch.
    When ``quiet`` says a request waits, the scanner yields at once
    (the batch has already ended early, see Scanner.interrupt), and again
    while it still waits: trio runs the woken tasks of one round in random
    order, so after one checkpoint the scanner may well be first again.
    YIELDS_TO_A_REQUEST bounds that, so that a request the daemon does not
    read at once (a borrow in progress) cannot stop the scan.
    """
    params = engine.kthread
    registry = engine.registry
    left = npages
    clock = time.perf_counter
    next_yield = clock() + YIELD_SECONDS
    while left > 0 and registry.live_pages > 0:
        # A step may return 0 while pages are left: its read ahead was not
        # done and a request waits (Scanner._window).  That is the case
        # below (the request still waits: nothing read it since), which
        # yields; after that engine.interrupted() (quiet.interrupts
        # underneath) says no for SCAN_AT_LEAST, so the next step waits for
        # the read if it must: the loop never spins without yielding, and
        # the scan goes on.
        left -= engine.scan_step(left)
        # Asked through the engine, which notes a yes as the scanner's own
        # (no read ahead for a while: the copy would take the CPU that the
        # client calling us needs).
        if quiet is not None and engine.interrupted():
            for _ in range(YIELDS_TO_A_REQUEST):
                await trio.lowlevel.checkpoint()
                if not quiet.pending():
                    break
            quiet.stepped_aside()
            next_yield = clock() + YIELD_SECONDS
            if engine.kthread is not params:
                return
        # A checkpoint costs ~15 us; yielding after every batch would add
        # 5-10 % to a pass.  Yield once the work since the last yield
        # reaches YIELD_SECONDS (a batch is at most BATCH_SECONDS more).
        elif clock() >= next_yield:
            await trio.lowlevel.checkpoint()
            next_yield = clock() + YIELD_SECONDS
            if engine.kthread is not params:
                return
    await trio.lowlevel.checkpoint()
