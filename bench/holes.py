"""``python -m bench.holes``: issue 14's example on the host, engine over a real child process.

A child maps 256 identical pages; 2^32-1 pages at an unmapped address
(16 TiB) are registered before them, then the 256.  The engine is driven as
``ksmctl start 5000 100`` drives kksmd: rounds of 5000 pages, 100 µs
apart.  Printed: the time until pages_sharing is 255, or, if it is not
reached within ``--limit`` seconds, how far the cursor got and what the
wait would be at that pace.  Then the rate at which a full-speed scanner
(one round of 2 M pages, no sleep) crosses the unmapped region, and the
cost of a pass over the 256 pages registered alone (what reading the
mappings once a pass adds where there is no hole).

It runs any tree's engine (``PYTHONPATH=DIR python3 -m bench.holes``):
the same script measures before and after in one sitting.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory

HOLE_ADDR = 0x1000_0000_0000
HOLE_PAGES = 2**32 - 1
REAL_PAGES = 256
CHILD = r"""
import ctypes, mmap, sys
m = mmap.mmap(-1, 256 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = b"\x5a" * (256 * 4096)
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


def registered(child_pid: int, addr: int) -> Engine:
    engine = Engine()
    sma = engine.new_sma()
    space = ProcessMemory.open(child_pid)
    engine.register(sma, space, HOLE_ADDR, HOLE_PAGES)
    engine.register(sma, space, addr, REAL_PAGES)
    return engine


def paced(engine: Engine, pages_to_scan: int, sleep_s: float, limit: float) -> None:
    started = time.perf_counter()
    rounds = 0
    while engine.counters().pages_sharing < REAL_PAGES - 1:
        elapsed = time.perf_counter() - started
        if elapsed > limit:
            walked = rounds * pages_to_scan
            first = HOLE_PAGES / (walked / elapsed)
            print(
                f"  paced (ksmctl start {pages_to_scan} {int(sleep_s * 1e6)}): not merged after {elapsed:.0f} s "
                f"({rounds} rounds, {walked} pages stepped, pages_sharing {engine.counters().pages_sharing}); "
                f"at this pace the real region is first reached after {first:.0f} s, and merges in the "
                f"second pass, after {2 * first:.0f} s"
            )
            return
        engine.scan_now(pages_to_scan)
        rounds += 1
        if engine.counters().pages_sharing >= REAL_PAGES - 1:
            break
        time.sleep(sleep_s)
    elapsed = time.perf_counter() - started
    c = engine.counters()
    print(
        f"  paced (ksmctl start {pages_to_scan} {int(sleep_s * 1e6)}): pages_sharing {c.pages_sharing} after "
        f"{elapsed * 1e3:.1f} ms, {rounds} round(s), {c.full_scans} full scans, {c.pages_scanned} pages scanned"
    )


def full_speed(engine: Engine, npages: int) -> None:
    started = time.perf_counter()
    stepped = engine.scan_now(npages)
    elapsed = time.perf_counter() - started
    rate = stepped / elapsed
    c = engine.counters()
    print(
        f"  full speed, one round of {npages} pages: {elapsed * 1e3:.1f} ms, {c.full_scans} full scans, "
        f"{c.pages_scanned} pages scanned, pages_sharing {c.pages_sharing}; "
        f"{rate / 1e6:.2f} M budget pages/s, one pass over the unmapped region: {HOLE_PAGES / rate:.0f} s"
        if c.full_scans == 0
        else f"  full speed, one round of {npages} pages: {elapsed * 1e3:.1f} ms, {c.full_scans} full scans, "
        f"{c.pages_scanned} pages scanned, pages_sharing {c.pages_sharing}"
    )


def small_passes(child_pid: int, addr: int, npages: int) -> None:
    """The cost of a pass over the 256 real pages alone (no hole): what reading the mappings adds to each pass."""
    engine = Engine()
    engine.register(engine.new_sma(), ProcessMemory.open(child_pid), addr, REAL_PAGES)
    started = time.perf_counter()
    engine.scan_now(npages)
    elapsed = time.perf_counter() - started
    scans = engine.counters().full_scans
    print(
        f"  the 256 real pages alone, one round of {npages} pages: {scans} passes, "
        f"{elapsed / scans * 1e6:.0f} us a pass"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=10.0, help="seconds to wait for the paced merge")
    args = parser.parse_args()
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        addr = int(proc.stdout.readline())
        import cuse_ksm

        print(f"issue 14's example, engine of {cuse_ksm.__file__}")
        paced(registered(proc.pid, addr), 5000, 100e-6, args.limit)
        full_speed(registered(proc.pid, addr), 2_000_000)
        small_passes(proc.pid, addr, 2_000_000)
    finally:
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    main()
