"""``python -m bench``: the emulator's scanner against the host kernel's KSM, same machine, same run.

Figures, each section ending with its ratio line:

1. 1 GiB, 50 % duplicate pages (128 copies of each duplicate content):
   time from registration to full merge, and CPU seconds; emulator and
   kernel side by side, interleaved, ``--repeat`` times each (medians).
2. The worst case for content-sorted trees (Andrea Arcangeli's 2009
   ksmpages test: the page index in the last 8 bytes of each page), 1 GiB:
   time for two full passes (2 x npages pages scanned; nothing can merge).
3. The engine's own memory per registered page (tracemalloc + its table
   mapping), against the kernel's 64-byte reverse-map item.
4. ioctl latency while the scanner runs at full speed, against idle.
5. Section 1's time to full merge while ``processes/PID/pages`` (what
   ``cuse-ksm pages PID`` reads) or ``page_runs`` (``-v``) is read in a
   loop, built in the scanner's own trio loop as the daemon builds it,
   against no reader.

The last line printed is section 1's: the 1 GiB ratio emulator/kernel
(time to full merge).  A short run of every section (as ``make test``
does): ``--size-mib 64 --repeat 1 --quiet-wait 0 --latency-seconds 0.5``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any

from bench import emulator, kernel, workload
from cuse_ksm import abi
from cuse_ksm.engine.counters import RMAP_ITEM_BYTES

PAGES_TO_SCAN = 100_000
# sizeof(struct ksm_rmap_item) on x86_64: what the kernel spends per scanned page.
KERNEL_BYTES_PER_PAGE = RMAP_ITEM_BYTES  # sizeof(struct ksm_rmap_item), charged by the kernel's profit formulas


def _sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so every `finally` (the kernel settings!) runs.
    raise SystemExit(128 + signum)


def _cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(max_wait: float) -> bool:
    """Wait (up to ``max_wait`` s) until nothing else loads the CPUs or has mergeable memory.

    Other work on this 2-CPU machine (a qemu guest, typically, which also
    marks its RAM mergeable, so the kernel's KSM would scan it too) skews
    both sides.  Returns whether the machine was quiet; runs that were not
    are flagged in the output.
    """
    deadline = time.monotonic() + max_wait
    while True:
        others = kernel.other_mergeable(os.getpid()) if kernel.available() else []
        if not others and _cpu_busy() < 0.15:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(2)


def _emulator_merge(
    size: int, *, scanned_pages: int | None = None, layout: str = "dup50", reader: str | None = None
) -> emulator.EmulatorRun:
    w = workload.start(layout, size)
    try:
        return emulator.measure(w, pages_to_scan=PAGES_TO_SCAN, scanned_pages=scanned_pages, reader=reader)
    finally:
        w.stop()


def _kernel_merge(size: int, *, scanned_pages: int | None = None, layout: str = "dup50") -> kernel.KernelRun:
    w = workload.start(layout, size, mergeable=True)
    try:
        return kernel.measure(w, pages_to_scan=PAGES_TO_SCAN, scanned_pages=scanned_pages)
    finally:
        w.stop()


def _ratio(section: str, what: str, num: float, den: float | None, detail: str) -> str:
    """A section's ratio line (the one figure to compare run to run)."""
    value = "n/a" if den is None else f"{num / den:.2f}"
    return f"{section} ratio {what}: {value} ({detail})"


def _line(label: str, emu: float, ker: float | None, unit: str = "s") -> str:
    if ker is None:
        return f"  {label:<44} emulator {emu:8.3f} {unit}   kernel      n/a"
    return f"  {label:<44} emulator {emu:8.3f} {unit}   kernel {ker:8.3f} {unit}   ratio {emu / ker:5.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mib", type=int, default=1024, help="registered memory per workload (default 1024)")
    p.add_argument("--repeat", type=int, default=3, help="runs of the 50 %% duplicate timing, each side (default 3)")
    p.add_argument("--no-kernel", action="store_true", help="skip the host kernel's KSM")
    p.add_argument(
        "--skip", action="append", default=[], choices=["worst", "memory", "latency", "pages"], help="skip a section"
    )
    p.add_argument("--latency-seconds", type=float, default=3.0, help="length of each latency measurement (default 3)")
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument(
        "--quiet-wait", type=float, default=180, help="seconds to wait for an idle machine per run (default 180)"
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if os.geteuid() != 0:
        print("python -m bench: must run as root (reads process memory, drives /sys/kernel/mm/ksm)", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    use_kernel = not args.no_kernel and kernel.available()
    if use_kernel and kernel.read("run") != "0":
        print(f"note: host KSM was running (run={kernel.read('run')}); stopped during the runs, then restored")
    out: dict[str, Any] = {"machine": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(f"cuse-ksm benchmark: {args.size_mib} MiB per workload, {os.cpu_count()} CPUs, Python {out['python']}")
    if use_kernel:
        print(f"host kernel {platform.release()}, KSM at pages_to_scan={PAGES_TO_SCAN} sleep_millisecs=0")
        others = kernel.other_mergeable(os.getpid())
        if others:
            print(f"WARNING: other processes have mergeable memory the kernel will scan too: {others}")
    busy = _cpu_busy()
    print(f"CPUs busy at start: {busy:.0%} (each run first waits, up to --quiet-wait s, for < 15 % and no qemu)")

    # 1. 50 % duplicates, time to full merge.
    emu_runs: list[emulator.EmulatorRun] = []
    ker_runs: list[kernel.KernelRun] = []
    quiet_runs: list[bool] = []
    for i in range(args.repeat):
        quiet = wait_quiet(args.quiet_wait)
        emu_runs.append(_emulator_merge(size))
        r = emu_runs[-1]
        print(f"  run {i + 1}: emulator {r.seconds:.3f} s ({r.cpu_seconds:.3f} CPU s, {r.full_scans} scans)", end="")
        if use_kernel:
            quiet = wait_quiet(args.quiet_wait) and quiet
            ker_runs.append(_kernel_merge(size))
            k = ker_runs[-1]
            print(f"; kernel {k.seconds:.3f} s ({k.cpu_seconds:.2f} CPU s of ksmd, {k.full_scans} full scans, ", end="")
            print(f"{k.pages_scanned} pages scanned, {k.pages_skipped} skipped)", end="")
            if k.others:
                print(f" [also scanning other mergeable processes: {k.others}]", end="")
        quiet_runs.append(quiet)
        print("" if quiet else "  (machine busy: other load during this run)", flush=True)
    out["quiet_runs"] = quiet_runs
    emu_t = statistics.median(r.seconds for r in emu_runs)
    emu_cpu = statistics.median(r.cpu_seconds for r in emu_runs)
    ker_t = statistics.median(k.seconds for k in ker_runs) if ker_runs else None
    ker_cpu = statistics.median(k.cpu_seconds for k in ker_runs) if ker_runs else None
    print(f"50 % duplicates, {args.size_mib} MiB, registration to full merge (median of {args.repeat}):")
    print(_line("time", emu_t, ker_t))
    print(_line("CPU (emulator process / ksmd thread)", emu_cpu, ker_cpu))
    out["dup50"] = {"emulator": [asdict(r) for r in emu_runs], "kernel": [asdict(k) for k in ker_runs]}

    # 2. The worst case for content-sorted trees: two full scans.
    if "worst" not in args.skip:
        quiet = wait_quiet(args.quiet_wait)
        two_passes = 2 * (size // abi.PAGE_SIZE)
        we = _emulator_merge(size, scanned_pages=two_passes, layout="tail8")
        quiet = wait_quiet(args.quiet_wait) and quiet
        wk = _kernel_merge(size, scanned_pages=two_passes, layout="tail8") if use_kernel else None
        print(f"worst case (index in the last 8 bytes), {args.size_mib} MiB, two passes ({two_passes} pages scanned):")
        line = f"  emulator: {we.pages_scanned} pages scanned"
        if wk:
            line += f"; kernel: {wk.full_scans} scans, {wk.pages_scanned} pages scanned, {wk.pages_skipped} skipped"
        print(line + ("" if quiet else "  (machine busy: other load during this measurement)"))
        print(_line("time", we.seconds, wk.seconds if wk else None))
        print(_line("CPU (emulator process / ksmd thread)", we.cpu_seconds, wk.cpu_seconds if wk else None))
        rate = f"  scan rate: emulator {we.pages_scanned / we.seconds / 1e6:.2f} M pages/s"
        if wk:
            rate += f", kernel {wk.pages_scanned / wk.seconds / 1e6:.2f} M pages/s"
        print(rate)
        w = workload.start("tail8", size)
        try:
            ceiling = {n: emulator.read_ceiling(w, n) for n in (1, 2)}
        finally:
            w.stop()
        print(
            "  read ceiling (/proc/PID/mem, 512 KiB reads, nothing else): "
            f"1 thread {ceiling[1] / 1e6:.2f} M pages/s, 2 threads {ceiling[2] / 1e6:.2f} M pages/s"
        )
        out["tail8"] = {"emulator": asdict(we), "kernel": asdict(wk) if wk else None, "read_ceiling": ceiling}
        print(_ratio("worst case", "emulator/kernel", we.seconds, wk.seconds if wk else None, "time for two passes"))

    # 3. Memory per registered page.
    if "memory" not in args.skip:
        print("engine memory per registered page (tracemalloc, after 3 full scans; ", end="")
        print(f"kernel: {KERNEL_BYTES_PER_PAGE} B):")
        out["memory"] = {}
        peaks = []
        for layout in ("dup50", "tail8"):
            w = workload.start(layout, size)
            try:
                m = emulator.measure_memory(w)
            finally:
                w.stop()
            out["memory"][layout] = asdict(m)
            peaks.append(m.peak_per_page)
            print(
                f"  {layout:<6} {m.per_page:6.1f} B/page at the end, {m.peak_per_page:6.1f} B/page at the peak; "
                f"shared page copies apart: {m.pages_shared} x 4 KiB = {m.copies_bytes / 2**20:.1f} MiB; "
                f"the engine's own count (emulator_memory) {m.counted_per_page:.1f} B/page"
            )
            print(
                f"  {'':<6} profit: general_profit {m.general_profit / 2**20:.1f} MiB (64 B per rmap item), "
                f"emulator_profit {m.emulator_profit / 2**20:.1f} MiB (the engine's metadata)"
            )
        print(_ratio("memory", "emulator/kernel", max(peaks), KERNEL_BYTES_PER_PAGE, "bytes per page, worst peak"))

    # 4. ioctl latency.
    if "latency" not in args.skip:
        print(f"ioctl latency, {args.size_mib} MiB registered (p50 / p99 / max):")
        if not wait_quiet(args.quiet_wait):
            print("  (machine busy: other load during this measurement)")
        w = workload.start("dup50", size)
        try:
            lat = emulator.measure_latency(w, seconds=args.latency_seconds)
        finally:
            w.stop()
        out["latency"] = [asdict(x) for x in lat]
        for x in lat:
            rate = f", scanning {x.pages_per_s / 1e6:.2f} M pages/s" if x.pages_per_s else ""
            print(
                f"  {x.label:<44} {x.p50_us:8.0f} / {x.p99_us:8.0f} / {x.max_us:8.0f} us  ({x.samples} samples{rate})"
            )
        p99 = {x.label: x.p99_us for x in lat}
        busy, idle = p99["fd round trip, scanner at full speed"], p99["fd round trip, scanner idle"]
        print(_ratio("latency", "busy/idle", busy, idle, "fd round trip p99"))

    # 5. The scanner while `cuse-ksm pages` runs in a loop.
    if "pages" not in args.skip:
        print(f"50 % duplicates, {args.size_mib} MiB, time to full merge while `cuse-ksm pages` reads in a loop:")
        loops: dict[str, list[emulator.EmulatorRun]] = {"alone": [], "pages": [], "pages -v": []}
        quiet = True
        for _ in range(args.repeat):
            for label, reader in (("alone", None), ("pages", "pages"), ("pages -v", "page_runs")):
                quiet = wait_quiet(args.quiet_wait) and quiet
                loops[label].append(_emulator_merge(size, reader=reader))
        med = {label: statistics.median(r.seconds for r in runs) for label, runs in loops.items()}
        for label, runs in loops.items():
            reads = sum(r.reads for r in runs)
            cpu = statistics.median(r.cpu_seconds for r in runs)
            print(f"  {label:<10} {med[label]:8.3f} s  ({cpu:.3f} CPU s, {reads} reads of the file in all runs)")
        out["pages"] = {label: [asdict(r) for r in runs] for label, runs in loops.items()}
        detail = f"`pages` in a loop against none; `pages -v`: {med['pages -v'] / med['alone']:.2f}"
        print(_ratio("pages", "loop/alone", med["pages"], med["alone"], detail + ("" if quiet else "; machine busy")))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if ker_t is None:
        print(f"{args.size_mib} MiB ratio emulator/kernel: n/a (no host KSM); emulator {emu_t:.3f} s")
    else:
        ratio = emu_t / ker_t
        print(f"{args.size_mib} MiB ratio emulator/kernel: {ratio:.2f} (emulator {emu_t:.3f} s, kernel {ker_t:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
