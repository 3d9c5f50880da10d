"""``cuse-ksm status``: the control directory read back as a short report.

It only reads files (``/run/cuse-ksm/ksm`` by default), so it runs as any
user who can read that directory, needs no connection to the daemon, and
works on a real kernel's ``/sys/kernel/mm/ksm`` too, as far as the names
agree (``--dir /sys/kernel/mm/ksm``).  ``--watch`` redraws the report every
few seconds with each counter's rate of change since the previous frame.

The emulated counters are what the 2009 driver would report; they share no
memory.  The report says so ("would save"), and when the daemon runs with
``--merge kernel`` it also shows what the host kernel's KSM really shares
("really shared (host KSM)"), from the ``host_`` files.

It needs only :mod:`cuse_ksm.controltree` (the file names and their number
format), not the FUSE adapter, so it runs where pyfuse3 is not installed.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cuse_ksm import abi
from cuse_ksm.controltree import HOST_VALUES, VALUES, default_dir, parse_number, parse_stat
from cuse_ksm.engine.counters import RMAP_ITEM_BYTES

DEFAULT_DIR = default_dir("ksm")

# The counters, in display order; the kthread parameters are shown in the header.
COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "full_scans",
)
# Counters that are not numbers of pages get no MiB column.
NOT_PAGES = {"full_scans"}


class StatusError(Exception):
    """The directory cannot be read; the message says why and what to check."""


@dataclass(frozen=True)
class Process:
    """One ``processes/<pid>`` directory."""

    pid: int
    regions: int
    pages: int
    merged: int
    host_merged: int | None = None  # kernel mode: pages the host kernel merges in it


@dataclass(frozen=True)
class Snapshot:
    """Every value of the directory, read at ``when`` (monotonic seconds)."""

    directory: str
    when: float
    values: dict[str, int]
    processes: list[Process] = field(default_factory=list)
    # A cuse-ksm directory (it has processes/): its counters are emulated.
    # A kernel's /sys/kernel/mm/ksm has none, and its counters are real.
    emulated: bool = True
    # The lines of emulator_memory (what the emulator itself spends); empty without that file.
    emulator: dict[str, str] = field(default_factory=dict)


def _read_number(path: str) -> int | None:
    """The number in a file; signed, as general_profit may be negative."""
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
        return -parse_number(text[1:]) if text.startswith(b"-") else parse_number(text)
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def _read_process(directory: str, pid: int) -> Process | None:
    try:
        with open(os.path.join(directory, "regions")) as f:
            rows = [line.split() for line in f.read().splitlines()[1:] if line.strip()]
    except FileNotFoundError:
        return None  # unregistered between the listing and the read
    merged = _read_number(os.path.join(directory, "ksm_merging_pages"))
    return Process(
        pid=pid,
        regions=len(rows),
        pages=sum(int(r[2]) for r in rows),
        merged=merged if merged is not None else sum(int(r[3]) for r in rows),
        host_merged=_read_number(os.path.join(directory, "host_ksm_merging_pages")),
    )


def list_directory(directory: str) -> set[str]:
    """The names in the control directory, or StatusError saying why it cannot be read."""
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        raise StatusError(
            f"no control files at {directory}: is the cuse-ksm daemon running? "
            "(it mounts them unless started with --no-stats-dir; see --stats-dir)"
        ) from None
    except PermissionError:
        raise StatusError(f"{directory}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise StatusError(f"{directory}: stale mount, the daemon that served it died") from None
        raise StatusError(f"{directory}: {e.strerror}") from None


def read_snapshot(directory: str, clock: Callable[[], float] = time.monotonic) -> Snapshot:
    """Read every value file and process directory under ``directory``."""
    names = list_directory(directory)
    values: dict[str, int] = {}
    for name in [v.name for v in VALUES] + list(HOST_VALUES):
        if name in names:
            number = _read_number(os.path.join(directory, name))
            if number is not None:
                values[name] = number
    if not any(name in values for name in COUNTERS):
        raise StatusError(f"{directory} holds none of the KSM counters: not a cuse-ksm control directory")
    processes = []
    procdir = os.path.join(directory, "processes")
    try:
        pids = sorted(int(p) for p in os.listdir(procdir) if p.isdigit())
    except OSError:
        pids = []  # a kernel's /sys/kernel/mm/ksm has no such directory
    for pid in pids:
        proc = _read_process(os.path.join(procdir, str(pid)), pid)
        if proc is not None:
            processes.append(proc)
    emulator = {}
    if "emulator_memory" in names:
        try:
            with open(os.path.join(directory, "emulator_memory")) as f:
                emulator = parse_stat(f.read())
        except OSError:
            pass  # the daemon went away meanwhile: the report goes without it
    return Snapshot(directory, clock(), values, processes, emulated="processes" in names, emulator=emulator)


def mib(pages: int) -> str:
    return f"{pages * abi.PAGE_SIZE / (1 << 20):.2f}"


def mib_of_bytes(n: int) -> str:
    return f"{n / (1 << 20):.2f}"


def _profit_lines(snap: Snapshot) -> list[str]:
    """general_profit (today's kernel's formula) and, from emulator_memory, the profit net of the emulator's cost."""
    v = snap.values
    if "general_profit" not in v:
        return []
    profit, sharing = v["general_profit"], v.get("pages_sharing", 0)
    if not snap.emulated:  # a kernel's own: real, and its zero pages count too
        return [f"profit: {mib_of_bytes(profit)} MiB (general_profit)"]
    # The files show no rmap count; the formula gives it back (no zero pages in 2009).
    items = (sharing * abi.PAGE_SIZE - profit) // RMAP_ITEM_BYTES
    lines = [
        f"profit, today's kernel's formula: would be {mib_of_bytes(profit)} MiB "
        f"(general_profit: {sharing} pages saved less {RMAP_ITEM_BYTES} B for each of {items} rmap items)"
    ]
    m = snap.emulator
    if "emulator_profit" in m and "metadata" in m:
        lines.append(
            f"profit, the emulator's real cost: would be {mib_of_bytes(int(m['emulator_profit']))} MiB "
            f"(emulator_profit: {sharing} pages saved less {mib_of_bytes(int(m['metadata']))} MiB of metadata, "
            f"{m.get('metadata_per_page', '?')} B per registered page; see emulator_memory)"
        )
    return lines


def _scanner_line(v: dict[str, int]) -> str:
    run, sleep, pages = v.get("run"), v.get("sleep"), v.get("pages_to_scan")
    if sleep is None and "sleep_millisecs" in v:
        sleep = v["sleep_millisecs"] * 1000
    pace = f"{pages} pages every {sleep} us" if pages is not None and sleep is not None else "pace unknown"
    if run == 1 and pages == 0:
        state = "set to run, but idle: pages_to_scan is 0"
    elif run == 1:
        state = "running"
    elif run == 0:
        state = "stopped"
    else:
        state = "state unknown"
    line = f"scanner: {state} ({pace})"
    limit = v.get("max_kernel_pages")
    if limit is not None:
        line += f", max_kernel_pages {limit or 'unlimited'}"
    return line


def render(snap: Snapshot, previous: Snapshot | None = None) -> str:
    """The report for one snapshot; with ``previous``, a /s column of rates since it."""
    v = snap.values
    dt = snap.when - previous.when if previous is not None else 0.0
    lines = [f"cuse-ksm status of {snap.directory}", _scanner_line(v), ""]
    rate_head = f" {'/s':>10}" if previous is not None else ""
    lines.append(f"  {'':<16} {'pages':>12} {'MiB':>10}{rate_head}")
    for name in COUNTERS:
        if name not in v:
            continue
        size = "" if name in NOT_PAGES else mib(v[name])
        rate = ""
        if previous is not None:
            before = previous.values.get(name)
            rate = f" {(v[name] - before) / dt:>10.1f}" if before is not None and dt > 0 else f" {'-':>10}"
        lines.append(f"  {name:<16} {v[name]:>12} {size:>10}{rate}".rstrip())
    shared, sharing = v.get("pages_shared", 0), v.get("pages_sharing", 0)
    kept = "1 shared page" if shared == 1 else f"{shared} shared pages"
    lines.append("")
    if snap.emulated:
        # Emulated figures: what the 2009 driver would have saved.  Nothing is shared by them.
        lines.append(f"would save: {mib(sharing)} MiB ({sharing} pages: pages_sharing)")
        lines.append(f"would cost: {mib(shared)} MiB ({kept} kept: pages_shared)")
    else:
        lines.append(f"saved: {mib(sharing)} MiB ({sharing} pages: pages_sharing)")
        lines.append(f"cost:  {mib(shared)} MiB ({kept} kept: pages_shared)")
    if shared:
        lines.append(f"sharing ratio: {sharing / shared:.1f} sites per shared page")
    lines += _profit_lines(snap)
    host = "host_pages_sharing" in v
    if host and not v.get("cross_check", 1):
        lines.append("(the emulated scanner is paused in kernel mode, so these stay 0: --cross-check runs it)")
    if host:
        merging = v.get("host_ksm_merging_pages", 0)
        h_shared, h_sharing = v.get("host_pages_shared", 0), v.get("host_pages_sharing", 0)
        lines.append("")
        lines.append(f"really shared (host KSM): {merging} pages ({mib(merging)} MiB) of the registered processes")
        lines.append(
            f"  host-wide: pages_shared {h_shared}, pages_sharing {h_sharing}: {mib(h_sharing)} MiB saved, "
            "counting every user of KSM on the host"
        )
        if "host_general_profit" in v:
            host_profit = mib_of_bytes(v["host_general_profit"])
            lines.append(f"  host-wide profit: {host_profit} MiB (the host's general_profit)")
    elif snap.emulated:
        lines.append("no memory is shared: these are the emulator's figures (--merge kernel shares for real)")
    if snap.processes:
        lines.append("")
        lines.append(f"processes ({len(snap.processes)}):")
        head = f"  {'pid':>8} {'regions':>8} {'pages':>10} {'merged':>10} {'MiB merged':>11}"
        lines.append(head + (f" {'host merged':>12}" if host else ""))
        for p in snap.processes:
            row = f"  {p.pid:>8} {p.regions:>8} {p.pages:>10} {p.merged:>10} {mib(p.merged):>11}"
            if host:
                row += f" {p.host_merged if p.host_merged is not None else '-':>12}"
            lines.append(row)
    return "\n".join(lines) + "\n"


CLEAR = "\x1b[H\x1b[2J"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"the control directory (default: {DEFAULT_DIR})")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) with rates per second, until interrupted",
    )
    p.add_argument("--count", type=int, default=0, metavar="N", help="with --watch, stop after N reports")


def run(args: argparse.Namespace, out: Callable[[str], object] | None = None) -> int:
    """Print one report, or with --watch a report every interval; returns the exit status."""
    write = out or sys.stdout.write
    in_place = out is None and sys.stdout.isatty()
    previous: Snapshot | None = None
    frames = 0
    try:
        while True:
            snap = read_snapshot(args.dir)
            text = render(snap, previous)
            write((CLEAR + text) if in_place else text if previous is None else "\n" + text)
            sys.stdout.flush()
            frames += 1
            if args.watch is None or (args.count and frames >= args.count):
                return 0
            previous = snap
            time.sleep(max(args.watch, 0.05))
    except StatusError as e:
        print(f"cuse-ksm status: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
