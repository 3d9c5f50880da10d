"""kksmd's loop: parameters, sleeping, idling, wake-ups, and yielding to the device."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

from cuse_ksm import abi, kksmd
from cuse_ksm.device import Done, KsmDevice
from cuse_ksm.engine import Engine, scanner
from cuse_ksm.engine.check import check_engine
from tests.engine.fakes import FakeSpace, page

A = 0x7F00_0000_0000


def engine_with(npages: int, content: bytes = page(1)) -> tuple[Engine, FakeSpace]:
    engine = Engine()
    space = FakeSpace()
    space.map(A, [content] * npages)
    engine.register(engine.new_sma(), space, A, npages)
    return engine, space


async def poll_info(device: KsmDevice, fh: int, answered: list[int]) -> None:
    """Call GET_INFO_KTHREAD in the scanner's loop for ever, counting the answers in ``answered[0]``."""
    while True:
        out = device.ioctl(fh, abi.KSM_GET_INFO_KTHREAD, 1, b"", abi.STRUCT_SIZE)
        assert isinstance(out, Done) and out.result == 0
        answered[0] += 1
        await trio.lowlevel.checkpoint()


async def test_idle_until_started_then_scans_then_stops(autojump_clock: trio.testing.MockClock) -> None:
    engine, _ = engine_with(40)
    async with trio.open_nursery() as nursery:
        await nursery.start(kksmd.run, engine)
        await trio.sleep(1)
        assert engine.counters().pages_scanned == 0  # flags 0: idle
        engine.set_kthread(sleep=1000, pages_to_scan=10, flags=1)
        await trio.sleep(1)
        c = engine.counters()
        assert c.full_scans >= 2 and (c.pages_shared, c.pages_sharing) == (1, 39)
        engine.set_kthread(sleep=1000, pages_to_scan=10, flags=0)
        await trio.lowlevel.checkpoint()
        scanned = engine.counters().pages_scanned
        await trio.sleep(1)
        assert engine.counters().pages_scanned == scanned
        nursery.cancel_scope.cancel()
    check_engine(engine)


async def test_pages_to_scan_pages_then_sleep(autojump_clock: trio.testing.MockClock) -> None:
    engine, _ = engine_with(10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(kksmd.run, engine)
        engine.set_kthread(sleep=100_000, pages_to_scan=7, flags=1)  # 7 pages every 0.1 s
        await trio.sleep(1.05)
        # Rounds at t = 0, 0.1, ..., 1.0: 11 rounds of 7 pages.
        assert engine.counters().pages_scanned == 77
        nursery.cancel_scope.cancel()


async def test_a_new_setting_cuts_a_long_sleep_short(autojump_clock: trio.testing.MockClock) -> None:
    engine, _ = engine_with(100)
    async with trio.open_nursery() as nursery:
        await nursery.start(kksmd.run, engine)
        engine.set_kthread(sleep=3_600_000_000, pages_to_scan=5, flags=1)  # an hour
        await trio.sleep(10)
        assert engine.counters().pages_scanned == 5
        engine.set_kthread(sleep=1_000_000, pages_to_scan=5, flags=1)
        await trio.sleep(0.5)  # the hour-long sleep was cut short: a round ran at once
        assert engine.counters().pages_scanned == 10
        nursery.cancel_scope.cancel()


async def test_running_with_nothing_registered_idles_until_a_register(autojump_clock: trio.testing.MockClock) -> None:
    engine = Engine()
    async with trio.open_nursery() as nursery:
        await nursery.start(kksmd.run, engine)
        engine.set_kthread(sleep=0, pages_to_scan=100, flags=1)
        await trio.sleep(1)
        space = FakeSpace()
        space.map(A, [page(3)] * 4)
        engine.register(engine.new_sma(), space, A, 4)
        for _ in range(100):
            await trio.lowlevel.checkpoint()
        assert engine.counters().pages_shared == 1
        engine.set_kthread(sleep=1000, pages_to_scan=100, flags=1)
        # Everything removed: back to idle, nothing left counted.
        engine.remove_regions(engine.slots[0].sma)
        await trio.sleep(1)
        c = engine.counters()
        assert (c.pages_shared, c.pages_sharing) == (0, 0)
        nursery.cancel_scope.cancel()


async def test_the_scanner_yields_to_the_device_between_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """While one round scans many batches, ioctls in the same loop keep being answered.

    With YIELD_SECONDS at 0 the scanner yields after every batch, so the
    count does not depend on this machine's speed.
    """
    monkeypatch.setattr(kksmd, "YIELD_SECONDS", 0.0)
    engine, _ = engine_with(64 * 256)
    device = KsmDevice(engine, lambda tid: FakeSpace(tid))
    fh = device.open().fh
    answered = [0]
    async with trio.open_nursery() as nursery:
        await nursery.start(kksmd.run, engine)
        engine.set_kthread(sleep=0, pages_to_scan=64 * 256, flags=1)  # one round = 64 batches
        nursery.start_soon(poll_info, device, fh, answered)
        while engine.counters().full_scans < 1:
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    # About one answer per batch of the first pass (the poller starts a
    # batch or so after the scanner, and the last batch ends the wait).
    assert answered[0] >= 64 * 256 // scanner.BATCH_PAGES - 3


async def test_a_stop_takes_effect_at_the_next_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A round of many batches ends at the first yield after START_STOP changes the parameters."""
    monkeypatch.setattr(kksmd, "YIELD_SECONDS", 0.0)  # yield after every batch
    engine, _ = engine_with(64 * 256)
    async with trio.open_nursery() as nursery:
        await nursery.start(kksmd.run, engine)
        engine.set_kthread(sleep=0, pages_to_scan=64 * 256, flags=1)  # one round = 128 batches
        while engine.counters().pages_scanned == 0:
            await trio.lowlevel.checkpoint()
        engine.set_kthread(sleep=0, pages_to_scan=64 * 256, flags=0)
        scanned = engine.counters().pages_scanned
        for _ in range(20):
            await trio.lowlevel.checkpoint()
        assert engine.counters().pages_scanned == scanned < 64 * 256
        nursery.cancel_scope.cancel()


def test_a_waiting_request_ends_a_batch_between_pages() -> None:
    """The engine asks its driver between pages, and stops the batch where it is when told to."""
    from tests.engine.fakes import unique_page

    engine = Engine()
    space = FakeSpace()
    space.map(A, [unique_page(i) for i in range(256)])
    engine.register(engine.new_sma(), space, A, 256)
    engine.scan_now(256)  # first sight of every page (taken in bulk, never cut)
    asked = 0

    def waiting() -> bool:
        nonlocal asked
        asked += 1
        return True

    engine.interrupt_when(waiting)
    assert engine.scan_step(256) == scanner.INTERRUPT_PAGES
    assert asked == 1
    engine.interrupt_when(None)
    assert engine.scan_step(256) == scanner.BATCH_PAGES - scanner.INTERRUPT_PAGES
    check_engine(engine)


async def test_a_request_always_waiting_starves_neither_side() -> None:
    """With ``pending`` always true (a client calling back to back), the scan still moves, and requests are answered."""
    engine, _ = engine_with(8 * 256)
    device = KsmDevice(engine, lambda tid: FakeSpace(tid))
    fh = device.open().fh
    answered = [0]
    asked = 0

    def pending() -> bool:
        nonlocal asked
        asked += 1
        return True

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(kksmd.run, engine, pending=pending))
        engine.set_kthread(sleep=0, pages_to_scan=8 * 256, flags=1)
        nursery.start_soon(poll_info, device, fh, answered)
        with trio.fail_after(10):
            while engine.counters().full_scans < 3:
                await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    # Every batch of the second and third passes stepped aside for the request.
    assert asked >= 2 * 8 * 256 // scanner.BATCH_PAGES
    assert answered[0] >= 2 * 8 * 256 // scanner.BATCH_PAGES
