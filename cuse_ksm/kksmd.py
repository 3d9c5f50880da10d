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


async def run(engine: Engine, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Scan while told to run, idle otherwise.  Never returns; cancel it to stop."""
    wake = _Wakeups()
    unwatch = engine.watch(wake.changed)
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
            await scan(engine, k.pages_to_scan)
            if engine.kthread is not k:
                continue  # new parameters: act on them now
            if k.sleep:
                wake.params = trio.Event()
                with trio.move_on_after(k.sleep / 1e6):
                    await wake.params.wait()
            else:
                await trio.lowlevel.checkpoint()
    finally:
        unwatch()


async def scan(engine: Engine, npages: int) -> None:
    """One round: scan up to ``npages`` pages, yielding to trio between batches.

    A stop (or any change of parameters) takes effect at the next batch.
    """
    params = engine.kthread
    registry = engine.registry
    left = npages
    clock = time.perf_counter
    next_yield = clock() + YIELD_SECONDS
    while left > 0 and registry.live_pages > 0:
        left -= engine.scan_step(left)
        # A checkpoint costs ~15 us; yielding after every batch would add
        # 5-10 % to a pass.  Yield once the work since the last yield
        # reaches YIELD_SECONDS (a batch is at most BATCH_SECONDS more).
        if clock() >= next_yield:
            await trio.lowlevel.checkpoint()
            next_yield = clock() + YIELD_SECONDS
            if engine.kthread is not params:
                return
    await trio.lowlevel.checkpoint()
