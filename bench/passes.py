"""``python -m bench.passes``: the scanner's time per pass over one workload, the engine alone.

One child holds the workload (``bench/workload.py``: dup50 or tail8); the
engine registers it and runs whole passes (``Engine.scan_now`` of the
registered pages), one after the other, no trio loop and no daemon: the
scanner's own cost, pass by pass.  Printed: wall and CPU seconds of each
pass and the counters after it.  Pass 1 reads and hashes every page; pass 2
is where pages merge (dup50) or all go to the unstable tree (tail8).

It runs any tree's engine (``PYTHONPATH=DIR python3 -m bench.passes``), so
that an attempt is measured against the code before it in one sitting,
the two taking turns: this machine's speed moves by 20 % within minutes.
"""

from __future__ import annotations

import argparse
import time

import cuse_ksm
from bench import workload
from bench.emulator import _register
from cuse_ksm.engine import Engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.passes", description=__doc__.splitlines()[0])
    p.add_argument("layout", choices=["dup50", "tail8"])
    p.add_argument("--size-mib", type=int, default=512, help="registered memory (default 512)")
    p.add_argument("--passes", type=int, default=3, help="full passes (default 3)")
    args = p.parse_args(argv)
    print(f"{args.layout}, {args.size_mib} MiB, engine of {cuse_ksm.__file__}")
    w = workload.start(args.layout, args.size_mib << 20)
    try:
        engine = Engine()
        _register(engine, w)
        for n in range(1, args.passes + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            engine.scan_now(w.npages)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            c = engine.counters()
            print(
                f"  pass {n}: {wall:.3f} s, {cpu:.3f} CPU s, {w.npages / wall / 1e6:.2f} M pages/s; "
                f"full_scans {c.full_scans}, pages_shared {c.pages_shared}, pages_sharing {c.pages_sharing}"
            )
    finally:
        w.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
