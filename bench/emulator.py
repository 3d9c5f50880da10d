"""The emulator's engine on the same workloads, in a trio loop as the daemon runs it."""

from __future__ import annotations

import functools
import gc
import os
import select
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass

import trio

from bench.workload import Workload
from cuse_ksm import abi, kksmd
from cuse_ksm.device import Done, Fetch, KsmDevice
from cuse_ksm.engine import Counters, Engine
from cuse_ksm.host.procmem import ProcessMemory


@dataclass
class EmulatorRun:
    seconds: float
    cpu_seconds: float
    full_scans: int
    pages_shared: int
    pages_sharing: int
    pages_scanned: int
    reads: int = 0  # reads of the pages file completed meanwhile (measure(reader=...))


def _register(engine: Engine, workload: Workload) -> None:
    engine.register(engine.new_sma(), ProcessMemory.open(workload.pid), workload.addr, workload.npages)


# How often the reader of measure(reader=...) asks for the file: one
# `cuse-ksm pages` run every 63 ms is what a shell loop of them managed here
# (28 runs in 1.77 s; its own CPU is the other core's), so the daemon saw
# one read of the file every 63 ms.
READ_EVERY = 0.063


async def read_in_a_loop(engine: Engine, pid: int, name: str, reads: list[int]) -> None:
    """Build ``processes/PID/NAME`` every READ_EVERY s as a FUSE read of it does, counting reads in ``reads``.

    Through controlfs's own ``_contents`` (pieces, checkpoints and the
    pacing while the scanner runs), in the scanner's trio loop: what the
    daemon spends on a shell loop of `cuse-ksm pages` (``pages``) or
    `cuse-ksm pages -v` (``page_runs``), without the FUSE transport.
    """
    from cuse_ksm import controlfs, controltree  # pyfuse3: only for this measurement

    tree = controltree.ControlTree(engine)
    ops = controlfs.ControlOperations(tree)
    inode = tree.path(f"processes/{pid}/{name}")
    assert inode is not None
    while True:
        await ops.contents(inode)
        reads[0] += 1
        await trio.sleep(READ_EVERY)


def measure(
    workload: Workload,
    *,
    pages_to_scan: int,
    scanned_pages: int | None = None,
    timeout: float = 600,
    reader: str | None = None,
) -> EmulatorRun:
    """Time from REGISTER until fully merged (or ``scanned_pages`` scanned), scanner at full speed (sleep 0).

    ``reader``: meanwhile read ``processes/PID/READER`` in a loop (:func:`read_in_a_loop`).
    """

    async def main() -> EmulatorRun:
        engine = Engine()
        want = workload.expected()
        async with trio.open_nursery() as nursery:
            await nursery.start(kksmd.run, engine)
            gc.collect()
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            _register(engine, workload)
            engine.set_kthread(sleep=0, pages_to_scan=pages_to_scan, flags=abi.KSM_CONTROL_FLAGS_RUN)
            reads = [0]
            if reader is not None:
                nursery.start_soon(read_in_a_loop, engine, workload.pid, reader, reads)
            c = await _until_merged(engine, want, scanned_pages, t0, timeout)
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            nursery.cancel_scope.cancel()
        assert engine.errors == 0
        for sma in list(engine.smas.values()):
            engine.release_sma(sma)
        return EmulatorRun(elapsed, cpu, c.full_scans, c.pages_shared, c.pages_sharing, c.pages_scanned, reads[0])

    return trio.run(main)


async def _until_merged(
    engine: Engine, want: tuple[int, int], scanned_pages: int | None, t0: float, timeout: float
) -> Counters:
    """The counters once fully merged (``want``: pages_shared, pages_sharing), or ``scanned_pages`` scanned."""
    while True:
        c = engine.counters()
        if scanned_pages is not None:
            if c.pages_scanned >= scanned_pages:
                return c
        elif (c.pages_shared, c.pages_sharing) == want:
            return c
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"emulator: {c} after {timeout} s")
        await trio.sleep(0.001)


def read_ceiling(workload: Workload, threads: int) -> float:
    """Pages a second that reading ``workload``'s memory allows: ``threads`` readers doing nothing else.

    Through ``/proc/PID/mem`` in reads of a scanner batch (512 KiB), the
    only read the scanner may use: ``process_vm_readv`` pins the pages it
    reads, and a read-only pin unshares KSM and COW-shared pages
    (cuse_ksm/host/procmem.py).  No scan rate can pass this figure.
    """
    chunk = 512 << 10
    fd = os.open(f"/proc/{workload.pid}/mem", os.O_RDONLY)
    share = workload.size // threads

    def read(lo: int) -> None:
        buf = bytearray(chunk)
        for off in range(lo, lo + share, chunk):
            if os.preadv(fd, [buf], workload.addr + off) != chunk:
                raise OSError(f"short read of the workload at {off:#x}")

    try:
        readers = [threading.Thread(target=read, args=(i * share,)) for i in range(threads)]
        t0 = time.perf_counter()
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        return workload.npages / (time.perf_counter() - t0)
    finally:
        os.close(fd)


@dataclass
class MemoryRun:
    npages: int
    engine_bytes: int  # traced Python memory of the engine after the scans, shared page copies excluded
    peak_bytes: int  # peak traced memory during the scans, shared page copies excluded
    copies_bytes: int  # the shared page copies (KsmPage.data) at the end
    pages_shared: int
    # The engine's own count (Engine.memory(), what emulator_memory shows), per
    # registered page, read buffer apart: it should agree with engine_bytes.
    counted_per_page: float
    general_profit: int  # today's kernel's formula, bytes (64 B per rmap item)
    emulator_profit: int  # the same saving less the engine's metadata, bytes (emulator_memory)

    @property
    def per_page(self) -> float:
        return self.engine_bytes / self.npages

    @property
    def peak_per_page(self) -> float:
        return self.peak_bytes / self.npages


def measure_memory(workload: Workload, passes: int = 3) -> MemoryRun:
    """The engine's own memory per registered page after ``passes`` full scans.

    Everything the engine allocates through Python's allocators is traced
    by tracemalloc (its arrays included); the unstable tree's table is an
    anonymous mapping, added in full; the 512 KiB read buffer (a fixed mmap)
    is left out, as is anything in the scanned process.  Beside it, the
    engine's own count of the same (:meth:`Engine.memory`, which the control
    file emulator_memory shows), so that a drift between the two shows.  The peak is
    tracemalloc's over the whole run, minus the copies held at the end, plus
    the final table (so it overstates, if anything).
    """
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    engine = Engine()
    _register(engine, workload)
    for _ in range(passes):
        engine.scan_now(1 << 40, stop_at_wrap=True)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The copies and the table as the engine counts them (engine/memory.py).
    # The unstable tree's table lives in an anonymous mapping, which
    # tracemalloc does not see: add it, in full, as if all of it were touched.
    # The read buffer, an mmap, is left out; its page views are traced.
    m = engine.memory()
    copies, table = m.copies, m.unstable
    c = engine.counters()
    own, own_peak = current - base - copies + table, peak - base - copies + table
    run = MemoryRun(
        workload.npages, own, own_peak, copies, c.pages_shared, m.per_registered_page, c.general_profit, m.profit
    )
    for sma in list(engine.smas.values()):
        engine.release_sma(sma)
    return run


# -- ioctl latency while the scanner runs --------------------------------------------

# A client in another process sends one byte at random moments (every 1-3 ms),
# the trio side answers each with a GET_INFO_KTHREAD through the device layer,
# and the client times the round trip: how long a request that arrives on an
# fd (as CUSE requests do) waits for the scanner to yield.
CLIENT_SOURCE = r"""
import os, random, sys, time
rfd, wfd, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
hammer = sys.argv[4] == "1"  # back to back, no pause between requests
rtts = []
end = time.perf_counter() + seconds
rng = random.Random(7)
while time.perf_counter() < end:
    if not hammer:
        time.sleep(rng.uniform(0.001, 0.003))
    t = time.perf_counter()
    os.write(wfd, b"?")
    assert os.read(rfd, 64)
    rtts.append(time.perf_counter() - t)
os.close(wfd)  # before printing: a long list would fill the stdout pipe the parent reads only after this
os.close(rfd)
print(" ".join(f"{x:.7f}" for x in rtts), flush=True)
"""


@dataclass
class Latency:
    label: str
    samples: int
    p50_us: float
    p99_us: float
    max_us: float
    pages_per_s: float = 0.0  # the scanner's rate meanwhile (0: scanner idle)

    @classmethod
    def of(cls, label: str, seconds: list[float], pages_per_s: float = 0.0) -> Latency:
        us = sorted(x * 1e6 for x in seconds)
        q = statistics.quantiles(us, n=100, method="inclusive")
        return cls(label, len(us), statistics.median(us), q[98], us[-1], pages_per_s)


def _get_info(device: KsmDevice, fh: int) -> bytes:
    """One GET_INFO_KTHREAD as the daemon carries it out, in both of its calls.

    The first call names the caller's buffer the answer goes to (the
    daemon turns that into CUSE's ioctl RETRY); the kernel's second call
    brings room for it, and gets the answer.
    """
    first = device.ioctl(fh, abi.KSM_GET_INFO_KTHREAD, os.getpid(), b"")
    assert isinstance(first, Fetch) and first.copy_out == abi.STRUCT_SIZE, first
    done = device.ioctl(fh, abi.KSM_GET_INFO_KTHREAD, os.getpid(), b"", first.copy_out)
    assert isinstance(done, Done) and done.result == 0 and len(done.out) == abi.STRUCT_SIZE, done
    return done.out


def measure_latency(workload: Workload, *, seconds: float = 3.0) -> list[Latency]:
    """Scheduling latency in the loop and fd round trips, scanner idle then at full speed.

    The scanner is told when a request waits on the client's pipe, as the
    daemon tells it of the CUSE channel (kksmd.run's ``pending``).  Last, a
    client that sends its requests back to back: every one must be
    answered, and the scanner's rate meanwhile shows whether it still moves.
    """
    watched = select.poll()

    def pending() -> bool:
        return bool(watched.poll(0))

    async def main() -> list[Latency]:
        engine = Engine()
        device = KsmDevice(engine, ProcessMemory.open)
        fh = device.open().fh
        results: list[Latency] = []
        _register(engine, workload)

        async def scheduling(duration: float) -> list[float]:
            late = []
            end = trio.current_time() + duration
            while trio.current_time() < end:
                target = trio.current_time() + 0.002
                await trio.sleep_until(target)
                t = trio.current_time()
                _get_info(device, fh)
                late.append(t - target)
            return late

        async def round_trips(duration: float, hammer: bool = False) -> list[float]:
            to_client_r, to_client_w = os.pipe()
            to_us_r, to_us_w = os.pipe()
            client = subprocess.Popen(
                [sys.executable, "-c", CLIENT_SOURCE, str(to_client_r), str(to_us_w), str(duration), str(int(hammer))],
                pass_fds=(to_client_r, to_us_w),
                stdout=subprocess.PIPE,
            )
            os.close(to_client_r)
            os.close(to_us_w)
            watched.register(to_us_r, select.POLLIN)
            try:
                while True:
                    await trio.lowlevel.wait_readable(to_us_r)
                    if not os.read(to_us_r, 64):
                        break
                    os.write(to_client_w, _get_info(device, fh)[:1])
            finally:
                watched.unregister(to_us_r)
                os.close(to_us_r)
                os.close(to_client_w)
            assert client.stdout is not None
            data = client.stdout.read()
            client.wait()
            return [float(x) for x in data.split()]

        def rate_since(mark: tuple[int, float]) -> float:
            return (engine.counters().pages_scanned - mark[0]) / (time.perf_counter() - mark[1])

        def now() -> tuple[int, float]:
            return engine.counters().pages_scanned, time.perf_counter()

        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(kksmd.run, engine, pending=pending))
            # Idle: registered, scanner stopped.
            results.append(Latency.of("in-loop scheduling, scanner idle", await scheduling(seconds)))
            results.append(Latency.of("fd round trip, scanner idle", await round_trips(seconds)))
            # Busy: full speed over the whole workload, pass after pass.
            engine.set_kthread(sleep=0, pages_to_scan=100_000, flags=abi.KSM_CONTROL_FLAGS_RUN)
            mark = now()
            late = await scheduling(seconds)
            results.append(Latency.of("in-loop scheduling, scanner at full speed", late, rate_since(mark)))
            mark = now()
            rtts = await round_trips(seconds)
            results.append(Latency.of("fd round trip, scanner at full speed", rtts, rate_since(mark)))
            mark = now()
            rtts = await round_trips(seconds, hammer=True)
            results.append(Latency.of("fd round trip, client back to back", rtts, rate_since(mark)))
            scans = engine.counters().full_scans
            nursery.cancel_scope.cancel()
        assert scans >= 1, "the scanner did not get through a pass while measuring"
        assert engine.errors == 0
        for sma in list(engine.smas.values()):
            engine.release_sma(sma)
        return results

    return trio.run(main)
