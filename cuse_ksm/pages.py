"""``cuse-ksm pages PID [ADDR[-END]]``: why are this process's pages merged, or not?

It reads ``processes/PID/pages`` (counts per state and the shared pages of
each region) or, for ``-v``, ``--map`` or an address range,
``processes/PID/page_runs`` (runs of pages in one state) from the daemon's
control directory, as ``cuse-ksm status`` reads the counters: no
connection to the daemon, no scanning.  The states and what to do about
each are in README.md ("cuse-ksm pages"); the daemon names them
(cuse_ksm/engine/pages.py), this module only shows them.

Parsing (:func:`parse_pages`) and rendering (:func:`render_summary`,
:func:`render_runs`, :func:`render_map`) are pure functions of the files'
text; :func:`run` does the reading and printing.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cuse_ksm import abi
from cuse_ksm.status import DEFAULT_DIR, StatusError, list_directory, mib


@dataclass(frozen=True)
class Look:
    """How a state is shown: a map glyph, an ANSI colour, and what it means for the user."""

    glyph: str
    colour: str
    why: str


# Keyed by the names the daemon writes (engine/pages.py, STATE_NAMES), in its order.
LOOKS: dict[str, Look] = {
    "merged": Look("#", "32", "maps a shared page with identical pages"),
    "unstable": Look("+", "36", "unique so far: unchanged for a pass, no identical page found yet"),
    "volatile": Look("~", "33", "changed since the scanner's previous look: written too often to merge"),
    "seen_once": Look("o", "34", "seen once: compared at its next look if unchanged by then"),
    "written": Look("w", "35", "was merged, then written (copy on write): starts over at its next look"),
    "at_limit": Look("L", "31", "an identical page was found, but max_kernel_pages was reached"),
    "not_present": Look(".", "2", "not in RAM: never touched, swapped out, or unmapped"),
    "zero_page": Look("0", "37", "only ever read: maps the kernel's zero page, costs no memory"),
    "unreadable": Look("X", "1;31", "could not be read: its process is gone, or it is I/O memory"),
    "not_scanned": Look("?", "2", "the scanner has not reached it since registration"),
}
UNKNOWN = Look("*", "0", "")
MAP_ROWS = 16  # most lines a region's strip takes: one cell stands for more pages before it takes more


class PagesError(Exception):
    """The pages cannot be read; the message says why."""


@dataclass(frozen=True)
class Shared:
    """A shared page that pages of a region map."""

    id: int
    sharers: int  # pages that map it, in all regions
    here: int  # of them, in this region (or range)
    zeros: bool  # its content is all zeros


@dataclass(frozen=True)
class PageRun:
    """``npages`` pages from ``addr``, in one state; merged runs map one shared page."""

    addr: int
    npages: int
    state: str
    kpage: int = 0
    sharers: int = 0
    zeros: bool = False


@dataclass
class Region:
    """One registered region (or the part of it within the asked range), as the files describe it."""

    sma: int
    addr: int  # as registered (may be unaligned)
    npages: int
    counts: dict[str, int] = field(default_factory=dict)
    shared_pages: int = 0
    shared: list[Shared] = field(default_factory=list)
    runs: list[PageRun] | None = None

    @property
    def base(self) -> int:
        return self.addr & ~(abi.PAGE_SIZE - 1)

    @property
    def end(self) -> int:
        return self.base + self.npages * abi.PAGE_SIZE


# -- arguments ----------------------------------------------------------------------


def parse_pid(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)


def _hex(text: str) -> int:
    digits = text[2:] if text[:2].lower() == "0x" else text
    try:
        if not digits or digits.strip() != digits:
            raise ValueError
        return int(digits, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal address") from None


def parse_range(text: str) -> tuple[int, int]:
    """``ADDR`` (the page holding it) or ``ADDR-END`` (END excluded, as /proc/PID/maps writes ranges), hex."""
    first, dash, last = text.partition("-")
    lo = _hex(first)
    if not dash:
        lo &= ~(abi.PAGE_SIZE - 1)
        return lo, lo + abi.PAGE_SIZE
    hi = _hex(last)
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"{text!r}: the end must lie above the start")
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pid", type=parse_pid, metavar="PID", help="a process with registered memory")
    p.add_argument(
        "range",
        nargs="?",
        type=parse_range,
        metavar="ADDR[-END]",
        help="only the page at ADDR, or the pages of [ADDR, END); hexadecimal, 0x optional (as in /proc/PID/maps)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="list the address ranges of each state")
    p.add_argument("--map", action="store_true", help="draw each region as a strip of cells, one glyph per state")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"the control directory (default: {DEFAULT_DIR})")


# -- the files ------------------------------------------------------------------------


def parse_pages(text: str) -> list[Region]:
    """The regions of a ``pages`` or ``page_runs`` file (lines of other kinds are ignored)."""
    regions: list[Region] = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        kind, rest = words[0], words[1:]
        if kind == "region":
            regions.append(Region(int(rest[0]), int(rest[1], 16), int(rest[2])))
            continue
        if not regions:
            raise ValueError(f"{line!r} before any region line")
        region = regions[-1]
        if kind == "state":
            region.counts[rest[0]] = int(rest[1])
        elif kind == "shared_pages":
            region.shared_pages = int(rest[0])
        elif kind == "shared":
            region.shared.append(Shared(int(rest[0]), int(rest[1]), int(rest[2]), rest[3:4] == ["zeros"]))
        elif kind == "run":
            run = PageRun(int(rest[0], 16), int(rest[1]), rest[2])
            if len(rest) > 3:
                run = replace(run, kpage=int(rest[3]), sharers=int(rest[4]), zeros=rest[5:6] == ["zeros"])
            if region.runs is None:
                region.runs = []
            region.runs.append(run)
    return regions


def within(region: Region, lo: int, hi: int) -> Region | None:
    """The part of ``region`` (read with its runs) in [lo, hi), counts recomputed from the runs; None if none."""
    start, end = max(lo, region.base), min(hi, region.end)
    if start >= end:
        return None
    first = (start - region.base) // abi.PAGE_SIZE
    last = (end - region.base + abi.PAGE_SIZE - 1) // abi.PAGE_SIZE
    part = Region(region.sma, region.base + first * abi.PAGE_SIZE, last - first, runs=[])
    part.counts = dict.fromkeys(LOOKS, 0)
    here: dict[int, Shared] = {}
    assert part.runs is not None
    for r in region.runs or []:
        a = max(r.addr, part.base)
        b = min(r.addr + r.npages * abi.PAGE_SIZE, part.end)
        if a >= b:
            continue
        n = (b - a) // abi.PAGE_SIZE
        part.runs.append(replace(r, addr=a, npages=n))
        part.counts[r.state] = part.counts.get(r.state, 0) + n
        if r.kpage:
            old = here.get(r.kpage)
            here[r.kpage] = Shared(r.kpage, r.sharers, n + (old.here if old else 0), r.zeros)
    part.shared = sorted(here.values(), key=lambda s: (-s.here, s.id))
    part.shared_pages = len(here)
    return part


# -- rendering --------------------------------------------------------------------------


def _shared_text(s: Shared) -> str:
    zeros = ", zeros" if s.zeros else ""
    return f"#{s.id} ({_sharers(s.sharers)}, {s.here} here{zeros})"


def _sharers(n: int) -> str:
    return "1 sharer" if n == 1 else f"{n} sharers"


def _size(pages: int) -> str:
    kib = pages * abi.PAGE_SIZE // 1024
    return f"{kib} KiB" if kib < 1024 else f"{mib(pages)} MiB"


def render_summary(pid: int, directory: str, regions: list[Region], *, shown: int = 3) -> str:
    """Per region: its pages in each state (those with any), what each means, and the shared pages it maps."""
    lines = [f"cuse-ksm pages of process {pid} ({directory})"]
    for r in regions:
        lines.append("")
        lines.append(
            f"region {r.base:#x}-{r.end:#x}: sma {r.sma}, {r.npages} pages ({_size(r.npages)})"
            + (f", registered at {r.addr:#x}" if r.addr != r.base else "")
        )
        for state, n in r.counts.items():
            if not n:
                continue
            share = f"{100 * n / r.npages:5.1f}%" if r.npages else ""
            lines.append(f"  {state:<12} {n:>10} {share:>6}  {LOOKS.get(state, UNKNOWN).why}")
            if state == "merged" and r.shared:
                more = r.shared_pages - min(shown, len(r.shared))
                tail = f" and {more} more" if more > 0 else ""
                top = ", ".join(_shared_text(s) for s in r.shared[:shown])
                lines.append(f"  {'':<12} {'':>10} {'':>6}  into {r.shared_pages} shared pages: {top}{tail}")
    return "\n".join(lines) + "\n"


def render_runs(region: Region) -> str:
    """``-v``: one line per run of pages in one state, with its address range."""
    lines = []
    for run in region.runs or []:
        end = run.addr + run.npages * abi.PAGE_SIZE
        what = run.state
        if run.kpage:
            what += f" into #{run.kpage} ({_sharers(run.sharers)}{', zeros' if run.zeros else ''})"
        lines.append(f"  {run.addr:#x}-{end:#x} {run.npages:>10} {what}")
    return "\n".join(lines) + "\n"


def map_cells(region: Region, per_cell: int) -> list[str]:
    """The dominant state of each cell of ``per_cell`` pages (ties go to the state shown first)."""
    ncells = math.ceil(region.npages / per_cell)
    tally: list[dict[str, int]] = [{} for _ in range(ncells)]
    for run in region.runs or []:
        start = (run.addr - region.base) // abi.PAGE_SIZE
        end = start + run.npages
        cell = start // per_cell
        while cell < ncells and cell * per_cell < end:
            n = min(end, (cell + 1) * per_cell) - max(start, cell * per_cell)
            tally[cell][run.state] = tally[cell].get(run.state, 0) + n
            cell += 1
    order = {name: i for i, name in enumerate(LOOKS)}
    return [
        min(t.items(), key=lambda kv: (-kv[1], order.get(kv[0], len(order))))[0] if t else "not_scanned" for t in tally
    ]


def render_map(region: Region, width: int, colour: bool) -> str:
    """``--map``: the region as lines of cells (one glyph per cell), fitted to ``width`` columns, and a legend."""
    label = len(f"{region.end:#x}")
    per_line = max(8, width - label - 3)  # "  ADDR " before the cells
    per_cell = max(1, math.ceil(region.npages / (per_line * MAP_ROWS)))
    cells = map_cells(region, per_cell)

    def paint(state: str, text: str) -> str:
        return f"\x1b[{LOOKS.get(state, UNKNOWN).colour}m{text}\x1b[0m" if colour else text

    unit = "page" if per_cell == 1 else "pages"
    lines = [f"  1 cell = {per_cell} {unit} ({_size(per_cell)})"]
    for at in range(0, len(cells), per_line):
        row = "".join(paint(s, LOOKS.get(s, UNKNOWN).glyph) for s in cells[at : at + per_line])
        lines.append(f"  {region.base + at * per_cell * abi.PAGE_SIZE:#0{label}x} {row}")
    seen = [s for s in LOOKS if s in cells] + sorted({s for s in cells if s not in LOOKS})
    legend = "  ".join(f"{paint(s, LOOKS.get(s, UNKNOWN).glyph)} {s}" for s in seen)
    lines.append(f"  legend: {legend}")
    return "\n".join(lines) + "\n"


# -- reading and printing ---------------------------------------------------------------------


def read_regions(directory: str, pid: int, *, runs: bool) -> list[Region]:
    """The regions of ``pid`` from ``pages`` (or ``page_runs``) under ``directory``."""
    list_directory(directory)  # no daemon, a stale mount...: the messages of `cuse-ksm status`
    name = "page_runs" if runs else "pages"
    path = os.path.join(directory, "processes", str(pid), name)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        if os.path.isdir(os.path.join(directory, "processes", str(pid))):
            raise PagesError(f"{path} is missing: the daemon is older than `cuse-ksm pages`") from None
        raise PagesError(f"process {pid} has no registered memory (no {os.path.dirname(path)})") from None
    except OSError as e:
        raise PagesError(f"{path}: {e.strerror}") from None
    try:
        return parse_pages(text)
    except (ValueError, IndexError) as e:
        raise PagesError(f"{path}: not the format of cuse-ksm's {name} file ({e})") from None


def run(args: argparse.Namespace, out: Callable[[str], object] | None = None, *, width: int | None = None) -> int:
    """Print the report; returns the exit status (1 when the pages cannot be read or the range holds none)."""
    write = out or sys.stdout.write
    colour = out is None and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    try:
        regions = read_regions(args.dir, args.pid, runs=bool(args.verbose or args.map or args.range))
    except (StatusError, PagesError) as e:
        print(f"cuse-ksm pages: {e}", file=sys.stderr)
        return 1
    if args.range:
        lo, hi = args.range
        regions = [part for r in regions if (part := within(r, lo, hi)) is not None]
        if not regions:
            print(f"cuse-ksm pages: process {args.pid} registered no page in {lo:#x}-{hi:#x}", file=sys.stderr)
            return 1
    elif args.verbose or args.map:
        # Read from page_runs, which has no counts: they come from the runs, as for a range.
        regions = [within(r, r.base, r.end) or r for r in regions]
    write(render_summary(args.pid, args.dir, regions))
    columns = width or shutil.get_terminal_size().columns
    for r in regions:
        if args.verbose or args.map:
            write(f"\nregion {r.base:#x}-{r.end:#x}:\n")
        if args.verbose:
            write(render_runs(r))
        if args.map:
            write(render_map(r, columns, colour))
    return 0
