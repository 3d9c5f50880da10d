"""The control tree: the engine's counters and knobs as files, like /sys/kernel/mm/ksm, without FUSE.

The 2009 driver had no sysfs directory (its reviewers asked for one; the v4
patch and later kernels added it), so a 2009 program can only steer the
scanner through START_STOP_KTHREAD.  An administrator wants what later
kernels give: ``cat pages_sharing``, ``echo 100 > pages_to_scan``.  This
module is everything about those files that is not a mount: which files
exist, what a read returns and what a write does.  It imports neither
pyfuse3 nor trio, so ``cuse-ksm status`` (which parses the same files) runs
where pyfuse3 is not installed, and the tests need no mount and no root.
:mod:`cuse_ksm.controlfs` serves this tree through FUSE.

Two layers, each usable without the next:

* :data:`VALUES`, the table: each file name with its getter and, for the
  read-write ones, its setter over an :class:`~cuse_ksm.engine.Engine`.
  :func:`read_value` and :func:`write_value` add the text format (one
  number and a newline) and the refusal of bad writes (EINVAL, nothing
  changed).
* :class:`ControlTree`: the directory tree (the values, plus ``processes/``
  with a directory per registered process) as inode numbers, names, modes and
  contents, computed from the engine on every call.

Beside the counters, the profit figures of today's kernel for the emulated
scanner (``general_profit``, ``processes/PID/ksm_stat``) and what the
emulator itself spends (``emulator_memory``, :data:`TEXT_FILES`).

With ``--merge kernel`` the tree also shows the host kernel's own figures
beside the emulated ones (:data:`HOST_VALUES`, ``processes/PID/
host_ksm_merging_pages`` and ``host_ksm_stat``, two more columns in ``regions``), read through a
:class:`~cuse_ksm.device.HostView` at every read: the emulated counters stay
the 2009 driver's, the ``host_`` ones say what is really shared.

Writes act on the engine exactly as START_STOP_KTHREAD does: the new
parameters are built as an :class:`~cuse_ksm.abi.KthreadInfo` (which refuses
values that do not fit its ``__u32`` fields) and stored with
:meth:`Engine.set_kthread`, which wakes the scanner.  One deliberate
difference from the ioctl: writing 1 to ``run`` while ``pages_to_scan`` is 0
is accepted and stored (later kernels do the same), whereas the 2009 ioctl
returns +1 and changes nothing; the scanner stays idle either way, since it
only scans while the run flag is set *and* pages_to_scan is not 0.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cuse_ksm import abi

if TYPE_CHECKING:
    # Only for annotations: importing the engine would import what it needs
    # to run (trio, xxhash, ...), and ``cuse-ksm status`` needs none of it.
    from cuse_ksm.device import HostView
    from cuse_ksm.engine import Engine, PageSurvey, Slot

DEFAULT_ROOT = "/run/cuse-ksm"

# Longest write we parse: a 20-digit u64 plus a newline fits with room to spare.
MAX_WRITE = 64


def default_dir(devname: str) -> str:
    """Where the daemon serving /dev/NAME mounts its control files: /run/cuse-ksm/NAME.

    One directory per device name, so that a second daemon (another
    ``--name``) does not collide with the first.
    """
    return os.path.join(DEFAULT_ROOT, devname)


# -- the table of values ------------------------------------------------------------


def parse_number(data: bytes) -> int:
    """The number in a write: decimal ASCII digits, surrounding whitespace (``echo``'s newline) ignored.

    Anything else (a sign, hex, a second word, an empty write) is a
    ValueError, which the filesystem turns into EINVAL.
    """
    text = data.strip()
    if not text or not text.isdigit():  # bytes.isdigit is ASCII-only: no '+', '-', '٣'
        raise ValueError(f"{data[:MAX_WRITE]!r} is not a decimal number")
    return int(text)


def _store_kthread(engine: Engine, **changes: int) -> None:
    """Change some kthread parameters, keeping the others: the ioctl's own path.

    ``dataclasses.replace`` builds a new KthreadInfo, whose range check runs
    before anything is stored; then :meth:`Engine.set_kthread` stores it and
    wakes the scanner, as KSM_START_STOP_KTHREAD does.
    """
    info = dataclasses.replace(engine.kthread, **changes)
    engine.set_kthread(info.sleep, info.pages_to_scan, info.flags)


def _set_run(engine: Engine, value: int) -> None:
    # Later kernels also take 2 (unmerge everything); the 2009 driver has no
    # such operation, so 2 is refused like any other value.
    if value not in (0, 1):
        raise ValueError(f"run must be 0 or 1, not {value} (2, unmerge, is not part of the 2009 driver)")
    flags = engine.kthread.flags & ~abi.KSM_CONTROL_FLAGS_RUN
    _store_kthread(engine, flags=flags | (abi.KSM_CONTROL_FLAGS_RUN if value else 0))


def _set_sleep_millisecs(engine: Engine, value: int) -> None:
    if value * 1000 > abi.U32_MAX:
        raise ValueError(f"sleep_millisecs {value} is too large: sleep is a __u32 number of microseconds")
    _store_kthread(engine, sleep=value * 1000)


def _set_max_kernel_pages(engine: Engine, value: int) -> None:
    if value > abi.U64_MAX:  # the v4 patch's unsigned long
        raise ValueError(f"max_kernel_pages {value} does not fit in an unsigned long")
    engine.max_kernel_pages = value


@dataclass(frozen=True)
class Value:
    """One file of the control directory: a number read from (and maybe written to) the engine."""

    name: str
    get: Callable[[Engine], int]
    set: Callable[[Engine, int], None] | None
    doc: str

    @property
    def writable(self) -> bool:
        return self.set is not None


VALUES: tuple[Value, ...] = (
    Value(
        "run",
        lambda e: e.kthread.flags & abi.KSM_CONTROL_FLAGS_RUN,
        _set_run,
        "1 while the run flag is set, 0 when stopped (flags bit 0 of GET_INFO_KTHREAD)",
    ),
    Value(
        "sleep",
        lambda e: e.kthread.sleep,
        lambda e, v: _store_kthread(e, sleep=v),
        "microseconds between two rounds (the 2009 struct's unit)",
    ),
    Value(
        "sleep_millisecs",
        lambda e: e.kthread.sleep // 1000,
        _set_sleep_millisecs,
        "the same pause in milliseconds, as later kernels show it (rounded down)",
    ),
    Value(
        "pages_to_scan",
        lambda e: e.kthread.pages_to_scan,
        lambda e, v: _store_kthread(e, pages_to_scan=v),
        "pages scanned per round",
    ),
    Value(
        "max_kernel_pages",
        lambda e: e.max_kernel_pages,
        _set_max_kernel_pages,
        "limit on shared pages, 0 = none",
    ),
    Value("kernel_pages_allocated", lambda e: e.counters().kernel_pages_allocated, None, "the v4 name of pages_shared"),
    Value("pages_shared", lambda e: e.counters().pages_shared, None, "shared pages in use"),
    Value("pages_sharing", lambda e: e.counters().pages_sharing, None, "more sites mapping them: pages saved"),
    Value("pages_unshared", lambda e: e.counters().pages_unshared, None, "pages unique so far"),
    Value("pages_volatile", lambda e: e.counters().pages_volatile, None, "pages changing too fast to merge"),
    Value("full_scans", lambda e: e.counters().full_scans, None, "completed passes over all registered memory"),
    Value("pages_scanned", lambda e: e.counters().pages_scanned, None, "pages looked at since start"),
    Value(
        "general_profit",
        lambda e: e.counters().general_profit,
        None,
        "today's kernel's formula, in bytes: pages_sharing pages less 64 per rmap item (may be negative)",
    ),
)
BY_NAME: dict[str, Value] = {v.name: v for v in VALUES}


def read_value(engine: Engine, name: str) -> bytes:
    """The contents of file ``name``: one number and a newline."""
    return b"%d\n" % BY_NAME[name].get(engine)


def write_value(engine: Engine, name: str, data: bytes) -> None:
    """Apply a write to file ``name``, or raise OSError and change nothing.

    EACCES for a read-only value, EINVAL for text that is not a number or a
    number out of the value's range (the same rule as the struct's fields).
    """
    value = BY_NAME[name]
    if value.set is None:
        raise OSError(errno.EACCES, f"{name} is read-only")
    try:
        if len(data) > MAX_WRITE:
            raise ValueError(f"a write of {len(data)} bytes is no number of ours")
        value.set(engine, parse_number(data))
    except ValueError as e:
        raise OSError(errno.EINVAL, f"{name}: {e}") from None


# -- the per-process files -----------------------------------------------------------

REGIONS_HEADER = "sma addr npages merged mapped\n"
HOST_REGIONS_HEADER = "sma addr npages merged mapped madvise mergeable\n"


def regions_text(engine: Engine, slots: list[Slot], host: HostView | None = None) -> bytes:
    """``processes/<pid>/regions``: a header line, then one line per region.

    ``merged`` counts the region's pages that currently map a shared page
    (the engine's own per-region counter); ``mapped`` how many of its pages
    are inside a mapping of the process now (read from it for each line;
    ``-`` once the process is gone): a region mostly unmapped, which
    REGISTER accepts, shows here.  In kernel mode two more
    columns: ``madvise``, what the caller's MADV_MERGEABLE of the region
    returned ("ok", "pending", or the errno's name, e.g. ENOMEM), and
    ``mergeable``, how many of its pages the host kernel will merge now
    (those in mappings marked VM_MERGEABLE: a MAP_SHARED region shows 0
    after an "ok", because the kernel ignores the advice there).
    """
    columns = [f"{s.sma.id} {s.addr:#x} {s.npages} {s.pages_merged} {_or_dash(engine.mapped_pages(s))}" for s in slots]
    if host is None:
        return "".join([REGIONS_HEADER, *(f"{c}\n" for c in columns)]).encode()
    lines = [HOST_REGIONS_HEADER]
    # The slots of one process file: one read of its smaps for all of them.
    tgid = slots[0].space.tgid if slots else 0
    seen = host.mergeable_pages(tgid, [(s.base, s.npages) for s in slots]) if slots else []
    for s, c, (_, mergeable) in zip(slots, columns, seen, strict=True):
        lines.append(f"{c} {s.host_advice or '-'} {mergeable}\n")
    return "".join(lines).encode()


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def ksm_stat_text(engine: Engine, tgid: int) -> bytes:
    """``processes/<pid>/ksm_stat``: the lines of today's /proc/PID/ksm_stat, for the emulated scanner.

    Same names, order and format as the kernel's (6.18).  ``ksm_zero_pages``
    is always 0: the 2009 driver never merged into the zero page (no
    use_zero_pages).  ``ksm_merge_any: no``: the 2009 ABI registers regions,
    never a whole process (prctl PR_SET_MEMORY_MERGE).  ``ksm_mergeable:
    yes``: the directory exists only while the process registers a region.
    """
    st = engine.process_stat(tgid)
    return (
        f"ksm_rmap_items {st.rmap_items}\n"
        f"ksm_zero_pages {st.zero_pages}\n"
        f"ksm_merging_pages {st.merging_pages}\n"
        f"ksm_process_profit {st.profit}\n"
        "ksm_merge_any: no\n"
        "ksm_mergeable: yes\n"
    ).encode()


def emulator_memory_text(engine: Engine) -> bytes:
    """``emulator_memory``: what the engine spends, in bytes per part, and the profit net of it.

    One ``name value`` line each (see :class:`~cuse_ksm.engine.EngineMemory`):
    the parts, ``metadata`` (their sum), ``shared_copies`` (apart: they
    stand for the shared pages), the pages they serve, bytes per registered
    page and per rmap item (the read buffer apart, as ``make bench`` counts),
    and ``emulator_profit``: pages_sharing pages less ``metadata``, the
    counterpart of general_profit with the engine's real cost in place of
    64 bytes per rmap item.
    """
    m = engine.memory()
    return (
        f"rmap_chunks {m.rmap}\n"
        f"unstable_table {m.unstable}\n"
        f"stable_pages {m.stable}\n"
        f"slots {m.slots}\n"
        f"read_buffer {m.buffer}\n"
        f"metadata {m.metadata}\n"
        f"shared_copies {m.copies}\n"
        f"registered_pages {m.registered_pages}\n"
        f"rmap_items {m.rmap_items}\n"
        f"metadata_per_page {m.per_registered_page:.1f}\n"
        f"metadata_per_rmap_item {m.per_rmap_item:.1f}\n"
        f"emulator_profit {m.profit}\n"
    ).encode()


def parse_stat(text: str) -> dict[str, str]:
    """``name value`` or ``name: value`` lines (ksm_stat, emulator_memory) as a dict of strings."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value:
            out[name.rstrip(":")] = value.strip()
    return out


# Top-level files that are not one number.
TEXT_FILES: dict[str, Callable[[Engine], bytes]] = {"emulator_memory": emulator_memory_text}


# ``processes/<pid>/pages`` and ``page_runs``: each page's state (engine/pages.py).
# The state names come from the engine (STATE_NAMES), in its order.
PAGES_SHARED_SHOWN = 16  # shared pages listed per region in ``pages``, most pages first


def region_line(slot: Slot) -> str:
    """The line that opens a region's block in ``pages`` and ``page_runs``."""
    return f"region {slot.sma.id} {slot.addr:#x} {slot.npages}\n"


def pages_text(survey: PageSurvey) -> str:
    """A region's block of ``processes/<pid>/pages``, from a finished survey.

    ``region SMA ADDR NPAGES``; ``state NAME PAGES`` for every state;
    ``shared_pages N``, the shared pages the region maps; then up to
    PAGES_SHARED_SHOWN lines ``shared ID SHARERS PAGES [zeros]``: the shared
    page's id, how many pages map it in all, how many of them are in this
    region, and ``zeros`` when its content is all zeros.
    """
    from cuse_ksm.engine import STATE_NAMES

    lines = [region_line(survey.slot)]
    lines += [f"state {STATE_NAMES[state]} {n}\n" for state, n in survey.counts.items()]
    lines.append(f"shared_pages {len(survey.shared)}\n")
    top = sorted(survey.shared.items(), key=lambda kv: (-kv[1], kv[0]))[:PAGES_SHARED_SHOWN]
    for kid, here in top:
        page = survey.shared_page(kid)
        if page is not None:  # else freed since its chunk was surveyed
            lines.append(f"shared {kid} {page[0]} {here}{' zeros' if page[1] else ''}\n")
    return "".join(lines)


RUNS_PER_PIECE = 1024  # lines of ``page_runs`` formatted between two chances for the scanner to run


def page_runs_text(survey: PageSurvey) -> Iterator[str]:
    """A region's block of ``processes/<pid>/page_runs``, from a finished survey with runs, in pieces.

    ``region SMA ADDR NPAGES``, then ``run ADDR NPAGES STATE`` per run of
    pages in one state, in address order; a merged run adds ``ID SHARERS``
    of its shared page, and ``zeros`` when its content is all zeros.
    """
    from cuse_ksm.engine import STATE_NAMES

    slot = survey.slot
    yield region_line(slot)
    runs = survey.runs
    for at in range(0, len(runs), RUNS_PER_PIECE):
        lines = []
        for r in runs[at : at + RUNS_PER_PIECE]:
            line = f"run {slot.base + r.start * abi.PAGE_SIZE:#x} {r.npages} {STATE_NAMES[r.state]}"
            page = survey.shared_page(r.kpage) if r.kpage else None
            if page is not None:
                line += f" {r.kpage} {page[0]}" + (" zeros" if page[1] else "")
            elif r.kpage:
                line += f" {r.kpage} 0"  # freed since its chunk was surveyed: no sharer left
            lines.append(line + "\n")
        yield "".join(lines)


# -- the host kernel's figures (kernel mode) ----------------------------------------

HostValue = Callable[["ControlTree", "HostView"], int]
HOST_VALUES: dict[str, HostValue] = {
    # The host kernel's counters are global: other users of KSM on the host count too.
    "host_pages_shared": lambda tree, host: host.counters().pages_shared,
    "host_pages_sharing": lambda tree, host: host.counters().pages_sharing,
    # Only the registered processes: what /dev/ksm's users really got.
    "host_ksm_merging_pages": lambda tree, host: sum(host.merging_pages(t) or 0 for t in tree.tgids()),
    # 1 when the emulated scanner runs beside ksmd (--cross-check); 0: the emulated counters stand still.
    "cross_check": lambda tree, host: int(tree.cross_check),
    # The host kernel's general_profit (6.4+), only where it has one: the
    # tree leaves the file out when host.general_profit() is None.
    "host_general_profit": lambda tree, host: host.general_profit() or 0,
}


# -- the tree --------------------------------------------------------------------------

# FUSE_ROOT_ID: the number by which the kernel asks for the mount's root
# (pyfuse3.ROOT_INODE, which the adapter's test checks against this).
ROOT_INODE = 1
PROCESSES_INODE = 2
_VALUE_INODES = {v.name: 16 + i for i, v in enumerate(VALUES)}
_INODE_VALUES = {ino: BY_NAME[name] for name, ino in _VALUE_INODES.items()}
_HOST_INODES = {name: 64 + i for i, name in enumerate(HOST_VALUES)}
_INODE_HOST = {ino: name for name, ino in _HOST_INODES.items()}
_TEXT_INODES = {name: 96 + i for i, name in enumerate(TEXT_FILES)}
_INODE_TEXT = {ino: name for name, ino in _TEXT_INODES.items()}
# Per-process inodes are computed from the tgid, so they need no table and
# stay valid for as long as the process is registered.
_PROC_BASE = 1 << 32
_PROC_STRIDE = 8
# The host_ ones in kernel mode only (host_ksm_stat where the host kernel has /proc/PID/ksm_stat).
PROCESS_FILES = (
    "ksm_merging_pages",
    "regions",
    "ksm_stat",
    "pages",
    "page_runs",
    "host_ksm_merging_pages",
    "host_ksm_stat",
)


@dataclass(frozen=True)
class Node:
    """What the filesystem shows for one inode."""

    inode: int
    mode: int  # type and permission bits

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


_DIR_MODE = stat.S_IFDIR | 0o755
_RW_MODE = stat.S_IFREG | 0o644
_RO_MODE = stat.S_IFREG | 0o444


class ControlTree:
    """The directory tree over one engine: names, inodes, modes and contents, computed on demand.

    Nothing is cached: every lookup and read asks the engine, so a process
    directory appears with its first REGISTER and vanishes with its last
    REMOVE.  Per-process figures are the engine's
    (:meth:`Engine.merged_pages_by_tgid`, ``Slot.pages_merged``); the tree
    only groups the registered regions by process to lay out directories.
    """

    def __init__(self, engine: Engine, host: HostView | None = None, *, cross_check: bool = False) -> None:
        """``host`` given: kernel mode, with the host kernel's figures beside the emulated ones.

        ``cross_check``: in kernel mode, whether the emulated scanner runs too.
        """
        self.engine = engine
        self.host = host
        self.cross_check: bool = cross_check
        self._process_files = tuple(n for n in PROCESS_FILES if host is not None or not n.startswith("host_"))
        self._host_inodes = _HOST_INODES if host is not None else {}
        if host is not None and host.general_profit() is None:  # kernels before 6.4
            self._host_inodes = {n: i for n, i in _HOST_INODES.items() if n != "host_general_profit"}
        if host is not None and host.ksm_stat(os.getpid()) is None:  # kernels before 6.1
            self._process_files = tuple(n for n in self._process_files if n != "host_ksm_stat")

    # the processes --------------------------------------------------------------

    def tgids(self) -> list[int]:
        """The processes with registered memory, by pid: the directories under ``processes/``."""
        return sorted({slot.space.tgid for slot in self.engine.slots})

    def regions(self, tgid: int) -> list[Slot]:
        """The regions registered in process ``tgid``, in registration order (none if it has none)."""
        return [slot for slot in self.engine.slots if slot.space.tgid == tgid]

    # inode layout ---------------------------------------------------------------

    @staticmethod
    def process_inode(tgid: int, index: int = -1) -> int:
        """The directory of ``tgid`` (index -1) or its file ``PROCESS_FILES[index]``."""
        return _PROC_BASE + tgid * _PROC_STRIDE + 1 + index

    @staticmethod
    def _split_process_inode(inode: int) -> tuple[int, int]:
        tgid, k = divmod(inode - _PROC_BASE, _PROC_STRIDE)
        return tgid, k - 1

    def node(self, inode: int) -> Node | None:
        """The node behind ``inode``, or None if it does not exist (any more)."""
        if inode in (ROOT_INODE, PROCESSES_INODE):
            return Node(inode, _DIR_MODE)
        value = _INODE_VALUES.get(inode)
        if value is not None:
            return Node(inode, _RW_MODE if value.writable else _RO_MODE)
        if _INODE_HOST.get(inode) in self._host_inodes or inode in _INODE_TEXT:
            return Node(inode, _RO_MODE)
        if inode >= _PROC_BASE:
            tgid, k = self._split_process_inode(inode)
            if (k == -1 or (k < len(PROCESS_FILES) and PROCESS_FILES[k] in self._process_files)) and self.regions(tgid):
                return Node(inode, _DIR_MODE if k == -1 else _RO_MODE)
        return None

    def entries(self, inode: int) -> list[tuple[str, int]]:
        """(name, inode) of the children of directory ``inode``, in a stable order."""
        if inode == ROOT_INODE:
            values = [(v.name, _VALUE_INODES[v.name]) for v in VALUES]
            return [*values, *_TEXT_INODES.items(), *self._host_inodes.items(), ("processes", PROCESSES_INODE)]
        if inode == PROCESSES_INODE:
            return [(str(tgid), self.process_inode(tgid)) for tgid in self.tgids()]
        node = self.node(inode)
        if node is not None and node.is_dir:
            tgid, _ = self._split_process_inode(inode)
            return [(name, self.process_inode(tgid, PROCESS_FILES.index(name))) for name in self._process_files]
        raise OSError(errno.ENOTDIR, "not a directory")

    def lookup(self, parent: int, name: str) -> int | None:
        for child, inode in self.entries(parent):
            if child == name:
                return inode
        return None

    def path(self, path: str) -> int | None:
        """The inode at a relative path such as ``processes/42/regions`` (tests, tools)."""
        inode: int | None = ROOT_INODE
        for part in filter(None, path.split("/")):
            if inode is None:
                return None
            inode = self.lookup(inode, part)
        return inode

    # contents -----------------------------------------------------------------

    def read(self, inode: int) -> bytes:
        return b"".join(self.read_parts(inode))

    def read_parts(self, inode: int) -> Iterator[bytes]:
        """The contents of ``inode``, in pieces: between two pieces the caller may let the scanner run.

        Most files are one piece.  ``pages`` and ``page_runs`` are built a
        chunk of a region at a time (:meth:`PageSurvey.steps`), yielding an
        empty piece after each step, so that a read of a multi-GiB region
        never holds the daemon's loop for long (controlfs checkpoints
        between pieces).
        """
        value = _INODE_VALUES.get(inode)
        if value is not None:
            yield read_value(self.engine, value.name)
            return
        node = self.node(inode)
        if node is None:
            raise OSError(errno.ENOENT, "no such file")
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        host = self.host
        if inode in _INODE_HOST and host is not None:
            yield b"%d\n" % HOST_VALUES[_INODE_HOST[inode]](self, host)
            return
        if inode in _INODE_TEXT:
            yield TEXT_FILES[_INODE_TEXT[inode]](self.engine)
            return
        tgid, k = self._split_process_inode(inode)
        name = PROCESS_FILES[k]
        if name in ("pages", "page_runs"):
            runs = name == "page_runs"
            for slot in self.regions(tgid):
                survey = self.engine.survey(slot, runs=runs)
                for _ in survey.steps():
                    yield b""
                for text in page_runs_text(survey) if runs else [pages_text(survey)]:
                    yield text.encode()
            return
        if name == "ksm_merging_pages":
            yield b"%d\n" % self.engine.merged_pages_by_tgid().get(tgid, 0)
        elif name == "ksm_stat":
            yield ksm_stat_text(self.engine, tgid)
        elif name == "host_ksm_merging_pages" and host is not None:
            yield b"%d\n" % (host.merging_pages(tgid) or 0)
        elif name == "host_ksm_stat" and host is not None:
            yield (host.ksm_stat(tgid) or "").encode()
        else:
            yield regions_text(self.engine, self.regions(tgid), host)

    def write(self, inode: int, data: bytes) -> None:
        value = _INODE_VALUES.get(inode)
        if value is None:
            raise OSError(errno.EACCES, "read-only")
        write_value(self.engine, value.name, data)
