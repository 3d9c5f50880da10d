"""Device semantics: the ioctl table of /dev/ksm and of SMA files, quirks included.

Every open of the device node is a :class:`DeviceFile` unless it is the open
that the fd hand-out injected into a CREATE_SHARED_MEMORY_AREA caller, which
becomes that SMA's :class:`SmaFile`, or into a KSM_CREATE_SCAN caller, which
becomes a :class:`ScanFile` (the session, which borrowed that caller, says
which open that is).  They live behind the FUSE file handle the kernel gives
back with every request.

Both 2009 ABIs are answered (abi.py): the March patch's and the January kvm
tree's, whose numbers never collide.  Their drivers behaved alike where they
share a call; what only January had: 12- and 16-byte structs, and scan fds,
on which every ioctl returns positive 22 (that driver's KSM_SCAN was
commented out, leaving only its default ``r = EINVAL``).

This layer decides *what* each call does and returns; it performs no I/O of
its own.  What it needs from the outside is injected: the engine (the
state the calls change), ``open_space``, which pins a caller's memory, and
in kernel mode a :class:`HostView`, which tells a thread's process and
what the host kernel made of a range.  CREATE_SHARED_MEMORY_AREA and KSM_CREATE_SCAN cannot finish here - only
the caller can open an fd in its own process - so they yield a
:class:`HandOut` for the session (:mod:`cuse_ksm.session`) to carry out.

With ``merge_kernel`` (``--merge kernel``), REGISTER and REMOVE also yield
an :class:`Advise`: the caller must madvise() its own memory so that the
host kernel's KSM merges what the 2009 ABI registered, and stops where it
no longer is.  The ioctl still returns what the 2009 driver returned.
What each region's madvise achieved is kept on its slot
(``Slot.host_advice``) for the control files.

Quirks of the 2009 driver reproduced on purpose (see README, "Quirks"):

* GET_INFO_KTHREAD is encoded ``_IOW`` but copies the structure *out*.
* START_STOP_KTHREAD with the run flag and ``pages_to_scan == 0`` returns
  positive 1 (``EPERM`` without its minus): the caller sees success, and
  nothing changes.
* An unknown command on an SMA fd returns positive 22 (``EINVAL`` without its
  minus); on the device fd it is a proper -EINVAL.  On a January scan fd,
  every command, KSM_SCAN included, returns positive 22 and reads nothing.
* REGISTER validates nothing: npages 0, unaligned or unmapped addresses,
  garbage in ``pad`` and ``reserved_bits`` are all accepted.
* REMOVE drops every region of the SMA, not one.
* The March driver had no ``compat_ioctl``: 32-bit callers get -ENOTTY.
  (The January driver had one; it is not served, README "The January 2009
  ABI" says why.)
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from cuse_ksm import abi
from cuse_ksm.engine import AddressSpace, Engine, Slot, Sma
from cuse_ksm.host.hostksm import HostCounters
from cuse_ksm.host.syscall import MADV_MERGEABLE, MADV_UNMERGEABLE


@dataclass(frozen=True)
class Fetch:
    """Call again with the caller's memory: the command reads ``copy_in`` bytes at its pointer, writes ``copy_out``.

    The 2009 driver did its own copy_from_user()/copy_to_user().  Here the
    transport must fetch the bytes first (CUSE's unrestricted-ioctl RETRY:
    the first call carries none), so a command that touches the caller's
    memory answers this until it has them.
    """

    copy_in: int = 0
    copy_out: int = 0


# What each command copies, by kind of file.  Commands absent copy nothing;
# an unknown command on either kind of file copies nothing either.
_DEVICE_MEMORY = {
    abi.KSM_START_STOP_KTHREAD: Fetch(copy_in=abi.STRUCT_SIZE),
    abi.KSM_GET_INFO_KTHREAD: Fetch(copy_out=abi.STRUCT_SIZE),
    abi.KSM_START_STOP_KTHREAD_2009_01: Fetch(copy_in=abi.KthreadInfo2009Jan.FORMAT.size),
    abi.KSM_GET_INFO_KTHREAD_2009_01: Fetch(copy_out=abi.KthreadInfo2009Jan.FORMAT.size),
}
_SMA_MEMORY = {
    abi.KSM_REGISTER_MEMORY_REGION: Fetch(copy_in=abi.STRUCT_SIZE),
    abi.KSM_REGISTER_MEMORY_REGION_2009_01: Fetch(copy_in=abi.MemoryRegion2009Jan.FORMAT.size),
}
# The structs START_STOP_KTHREAD and REGISTER_MEMORY_REGION read, by ABI.
_KTHREAD_IN: dict[int, type[abi.KthreadInfo] | type[abi.KthreadInfo2009Jan]] = {
    abi.KSM_START_STOP_KTHREAD: abi.KthreadInfo,
    abi.KSM_START_STOP_KTHREAD_2009_01: abi.KthreadInfo2009Jan,
}
_REGION_IN: dict[int, type[abi.MemoryRegion] | type[abi.MemoryRegion2009Jan]] = {
    abi.KSM_REGISTER_MEMORY_REGION: abi.MemoryRegion,
    abi.KSM_REGISTER_MEMORY_REGION_2009_01: abi.MemoryRegion2009Jan,
}


@dataclass(frozen=True)
class DeviceFile:
    """An open of /dev/ksm by a program."""

    fh: int
    memory: ClassVar[dict[int, Fetch]] = _DEVICE_MEMORY


@dataclass(frozen=True)
class SmaFile:
    """The open file behind an SMA fd; its release ends the SMA."""

    fh: int
    sma: Sma
    memory: ClassVar[dict[int, Fetch]] = _SMA_MEMORY


@dataclass(frozen=True)
class Scan:
    """A January 2009 scanner handle (KSM_CREATE_SCAN).

    That driver gave each scan fd its own cursor for a user-space scanner
    driven by KSM_SCAN, then commented KSM_SCAN out: a scan fd does
    nothing, so it holds nothing but its number.
    """

    id: int


@dataclass(frozen=True)
class ScanFile:
    """The open file behind a January scan fd: every ioctl on it returns positive 22, copying nothing."""

    fh: int
    scan: Scan
    memory: ClassVar[dict[int, Fetch]] = {}


OpenFile = DeviceFile | SmaFile | ScanFile


@dataclass(frozen=True, slots=True)
class Done:
    """Answer the ioctl: ``result`` is what the caller's ioctl() returns; ``out`` is copied out.

    ``note``: one sentence the user should read in the log, though the call
    succeeds (REGISTER of a range mostly unmapped).
    """

    result: int
    out: bytes = b""
    note: str = ""


# The answers the busiest calls always give, built once rather than per call.
_API_VERSION = Done(abi.KSM_API_VERSION)
_SUCCESS = Done(0)


@dataclass(frozen=True)
class HandOut:
    """The daemon must give the caller a new fd bound to ``target``.

    An :class:`Sma` (CREATE_SHARED_MEMORY_AREA) or a :class:`Scan` (KSM_CREATE_SCAN).
    """

    target: Sma | Scan

    @property
    def label(self) -> str:
        """How logs and ``--trace`` name the file: ``sma#N`` or ``scan#N``."""
        return file_label(self.target)


def file_label(target: Sma | Scan) -> str:
    """``sma#N`` or ``scan#N``: a handed-out file as the daemon knows it (the caller's fd number is not known)."""
    return f"sma#{target.id}" if isinstance(target, Sma) else f"scan#{target.id}"


@dataclass(frozen=True)
class Advise:
    """Kernel mode: the caller must ``madvise(addr, length, advice)`` each of ``ranges`` in its own memory.

    REGISTER asks for MADV_MERGEABLE on its region (``slot``), REMOVE for
    MADV_UNMERGEABLE on what the process no longer registers.  The ioctl
    returns ``result`` whatever madvise says; the session reports each
    call's result to :meth:`KsmDevice.advised`.
    """

    ranges: tuple[tuple[int, int], ...]  # (addr, length in bytes)
    advice: int
    tgid: int
    slot: Slot | None = None  # REGISTER's region
    result: int = 0
    note: str = ""  # as Done's: logged when the ioctl is served


# What madvise achieves, as Slot.host_advice and processes/PID/regions show it:
# "pending" until the caller's madvise returned, then "ok" or the errno's name.
ADVICE_PENDING = "pending"
ADVICE_OK = "ok"


@dataclass(frozen=True)
class HostView:
    """What kernel mode reads from the host: the OS adapters (host.procfs, host.hostksm), chosen in cli.py.

    The device uses the first two, the control files (controltree.py) the others.
    """

    tgid: Callable[[int], int]  # the process of a thread; ProcessLookupError once it is gone
    # (mapped, mergeable) pages of each (addr, npages) range in process tgid, as the host kernel sees them now.
    mergeable_pages: Callable[[int, Sequence[tuple[int, int]]], list[tuple[int, int]]]
    # Pages of process tgid the host kernel merges now (None: gone, or not reported).
    merging_pages: Callable[[int], int | None]
    counters: Callable[[], HostCounters]  # the host kernel's own, for the whole host
    # The host kernel's general_profit in bytes (None: before 6.4 it has none).
    general_profit: Callable[[], int | None] = lambda: None
    # The text of /proc/PID/ksm_stat (None: process gone, or a kernel before 6.1).
    ksm_stat: Callable[[int], str | None] = lambda tgid: None


Outcome = Done | HandOut | Fetch | Advise

# Positive results returned by the 2009 driver's code where a negative errno was meant.
QUIRK_START_RUN_WITHOUT_PAGES = errno.EPERM  # +1
QUIRK_SMA_UNKNOWN_COMMAND = errno.EINVAL  # +22
QUIRK_SCAN_COMMAND = errno.EINVAL  # +22, for every command on a January scan fd


class KsmDevice:
    """The open files of /dev/ksm and what each ioctl does to the engine."""

    def __init__(
        self,
        engine: Engine,
        open_space: Callable[[int], AddressSpace],
        *,
        host: HostView | None = None,
    ) -> None:
        """``host`` given: kernel mode (``--merge kernel``), see the module docstring."""
        self.engine = engine
        self._open_space = open_space
        self.host = host
        self.files: dict[int, OpenFile] = {}
        self._fhs = itertools.count(1)
        self._scan_ids = itertools.count(1)
        # GET_INFO_KTHREAD's answers by ABI, and the engine's struct they were built from.
        self._info_of: abi.KthreadInfo | None = None
        self._infos: dict[int, Done] = {}

    # -- opens and releases ---------------------------------------------------

    def open(self, *, handed: Sma | Scan | None = None) -> OpenFile:
        """A FUSE_OPEN: a plain device open, or the open that hands out ``handed``'s fd."""
        fh = next(self._fhs)
        file: OpenFile
        if handed is None:
            file = DeviceFile(fh)
        elif isinstance(handed, Sma):
            file = SmaFile(fh, handed)
        else:
            file = ScanFile(fh, handed)
        self.files[fh] = file
        return file

    def release(self, fh: int) -> OpenFile | None:
        """The last reference to an open file went away (FUSE_RELEASE)."""
        file = self.files.pop(fh, None)
        if isinstance(file, SmaFile):
            self.engine.release_sma(file.sma)
        return file

    def hand_out_failed(self, target: Sma | Scan) -> None:
        """The fd of ``target`` never reached its caller: an SMA ends now (a scan holds nothing).

        If the injected open did arrive, its file stays until the kernel
        releases it, but its ioctls fail with EBADF (see :meth:`_sma_ioctl`).
        """
        if isinstance(target, Sma):
            self.engine.release_sma(target)

    # -- ioctls -----------------------------------------------------------------

    def ioctl(self, fh: int, cmd: int, tid: int, data: bytes, out_size: int = 0, compat: bool = False) -> Outcome:
        """Carry out ``cmd`` from thread ``tid``.

        ``data`` holds the bytes copied in from the caller's pointer and
        ``out_size`` how many may be copied out to it; a command that needs
        more answers :class:`Fetch`.
        """
        file = self.files.get(fh)
        if file is None:
            return Done(-errno.EBADF)
        if compat:
            # No compat_ioctl in the 2009 driver: the kernel answered -ENOTTY
            # without calling it, so without touching the caller's memory.
            return Done(-errno.ENOTTY)
        memory = file.memory.get(cmd)
        if memory is not None and (len(data) < memory.copy_in or out_size < memory.copy_out):
            return memory
        if isinstance(file, SmaFile):
            return self._sma_ioctl(file.sma, cmd, tid, data)
        if isinstance(file, ScanFile):
            # January's ksm_scan_ioctl: KSM_SCAN's case is commented out, so
            # every command falls to its default, r = EINVAL without the
            # minus, before touching the caller's pointer.
            return Done(QUIRK_SCAN_COMMAND)
        return self._device_ioctl(cmd, data)

    def _device_ioctl(self, cmd: int, data: bytes) -> Outcome:
        if cmd == abi.KSM_GET_API_VERSION:
            return _API_VERSION  # 1 in both ABIs
        if cmd == abi.KSM_CREATE_SHARED_MEMORY_AREA:
            return HandOut(self.engine.new_sma())
        if cmd in _KTHREAD_IN:
            cls = _KTHREAD_IN[cmd]
            info = cls.unpack(data[: cls.FORMAT.size])
            if info.running and info.pages_to_scan == 0:
                # Both drivers set r = EPERM without the minus and change nothing.
                return Done(QUIRK_START_RUN_WITHOUT_PAGES)
            self.engine.set_kthread(info.sleep, info.pages_to_scan, info.flags)
            return _SUCCESS
        if cmd == abi.KSM_GET_INFO_KTHREAD or cmd == abi.KSM_GET_INFO_KTHREAD_2009_01:
            # One scanner, whichever ABI set it: the answer is the engine's
            # three fields in the caller's ABI's struct (12 bytes in January,
            # 24 with pad and reserved_bits 0 in March).  The engine's struct
            # is frozen: an answer built from one stays right while the
            # engine holds that object (8 % of a GET_INFO_KTHREAD's
            # instructions, bench/instructions.sh).
            kthread = self.engine.kthread
            if kthread is not self._info_of:
                self._info_of, self._infos = kthread, {}
            answer = self._infos.get(cmd)
            if answer is None:
                if cmd == abi.KSM_GET_INFO_KTHREAD:
                    out = kthread.pack()
                else:
                    out = abi.KthreadInfo2009Jan(kthread.sleep, kthread.pages_to_scan, kthread.flags).pack()
                answer = self._infos[cmd] = Done(0, out)
            return answer
        if cmd == abi.KSM_CREATE_SCAN:
            return HandOut(Scan(next(self._scan_ids)))
        return Done(-errno.EINVAL)

    def _sma_ioctl(self, sma: Sma, cmd: int, tid: int, data: bytes) -> Outcome:
        if sma.id not in self.engine.smas:
            return Done(-errno.EBADF)  # an SMA whose hand-out failed
        if cmd in _REGION_IN:
            cls = _REGION_IN[cmd]
            region = cls.unpack(data[: cls.FORMAT.size])
            try:
                space = self._open_space(tid)
            except ProcessLookupError:
                # get_task_mm() returned NULL: the caller has no mm (it is exiting).
                return Done(-errno.EPERM)
            except MemoryError:
                return Done(-errno.ENOMEM)
            except OSError as e:
                return Done(-(e.errno or errno.EPERM))
            try:
                slot = self.engine.register(sma, space, region.addr, region.npages)
            except BaseException:
                space.close()
                raise
            note = self._holes_note(slot)
            if self.host is None or not region.npages:
                # Emulation, or nothing to advise (madvise of 0 bytes is a no-op).
                return Done(0, note=note) if note else _SUCCESS
            # From the page that holds addr, as the scanner reads it (Slot.base):
            # madvise wants an aligned start, the 2009 driver did not.
            slot.host_advice = ADVICE_PENDING
            start, end = _span(slot)
            return Advise(((start, end - start),), MADV_MERGEABLE, space.tgid, slot, note=note)
        if cmd == abi.KSM_REMOVE_MEMORY_REGION:
            gone = list(sma.slots)
            self.engine.remove_regions(sma)
            if self.host is None or not gone:
                return _SUCCESS
            return self._unmerge(tid, gone) or _SUCCESS
        return Done(QUIRK_SMA_UNKNOWN_COMMAND)

    def _holes_note(self, slot: Slot) -> str:
        """What to tell the user of a region mostly unmapped (fewer than half its pages), or wrapping the address space.

        The 2009 driver validated nothing and returned 0, and so do we; but
        a range the program did not mean (a wrong length, an address never
        mapped) would otherwise only show as memory that never merges.  The
        scanner passes over its holes (engine/scanner.py); ``regions``
        shows the mapped count at any time.
        """
        if not slot.npages:
            return ""
        start, end = _span(slot)
        wraps = start + slot.npages * abi.PAGE_SIZE > end
        mapped = self.engine.mapped_pages(slot)
        if mapped is None or (2 * mapped >= slot.npages and not wraps):
            return ""
        what = "wraps the address space" if wraps else "is mostly unmapped"
        return (
            f"the region at {slot.addr:#x} of {slot.npages} pages {what}: {mapped} of its pages are mapped "
            "(REGISTER returns 0 as the 2009 driver did; the scanner passes over the rest)"
        )

    # -- kernel mode ------------------------------------------------------------

    def _unmerge(self, tid: int, gone: list[Slot]) -> Advise | None:
        """MADV_UNMERGEABLE for the caller's removed regions, except what its process still registers.

        Only the caller's own process can be advised.  An SMA fd may have
        been inherited or passed on, so REMOVE may drop regions of other
        processes too: those stay mergeable in the host kernel until their
        process exits, as after the last close (README, "Really merging").
        The host kernel keeps one VM_MERGEABLE flag per mapping, not a
        count: a range that another region of the same process (through
        this SMA or another) still registers must stay mergeable.
        """
        assert self.host is not None
        try:
            tgid = self.host.tgid(tid)
        except ProcessLookupError:
            return None  # the caller is gone: the kernel forgets its memory anyway
        kept = [_span(s) for s in self.engine.slots if s.space.tgid == tgid]
        ranges = _subtract([_span(s) for s in gone if s.npages and s.space.tgid == tgid], kept)
        if not ranges:
            return None
        return Advise(tuple((start, end - start) for start, end in ranges), MADV_UNMERGEABLE, tgid)

    def advised(self, advise: Advise, results: tuple[int, ...]) -> list[str]:
        """The caller's madvise calls returned ``results`` (-errno each, or 0): record them on the slot.

        Returns what the user should know about it, one sentence each: a
        failed call, and a call that succeeded while the host kernel still
        will not merge part of the range (MADV_MERGEABLE returns 0 but
        ignores shared mappings).
        """
        notes = []
        for (addr, length), result in zip(advise.ranges, results, strict=True):
            if result < 0:
                name = errno.errorcode.get(-result, str(-result))
                hint = _MADVISE_ERRORS.get(-result, "")
                notes.append(f"madvise({addr:#x}, {length:#x}) failed with {name}{hint}")
        slot = advise.slot
        if slot is not None and slot.gone and results[0] == 0:
            # Another thread of the process removed the region (or the last
            # close came) while this thread was on its way to its madvise.
            # If REMOVE's MADV_UNMERGEABLE ran first, this advice outlives
            # the region, and no thread is left to take it back.
            notes.append(
                f"the region at {slot.addr:#x} was removed while its madvise ran: "
                "the host kernel may keep it mergeable until the process exits"
            )
        elif slot is not None:
            slot.host_advice = ADVICE_OK if results[0] == 0 else errno.errorcode.get(-results[0], str(-results[0]))
            if results[0] == 0 and self.host is not None:
                # Read after the caller went on: pages it unmapped since then
                # are no fault of the advice, pages mapped and not mergeable are.
                [(mapped, mergeable)] = self.host.mergeable_pages(advise.tgid, [(slot.base, slot.npages)])
                if mergeable < mapped:
                    notes.append(
                        f"only {mergeable} of the region's {slot.npages} pages are mergeable "
                        f"({mapped} mapped): the host kernel ignores MADV_MERGEABLE on shared "
                        "mappings (MAP_SHARED, shmem) and special ones (VM_PFNMAP, VM_IO, hugetlbfs)"
                    )
        return notes


# What a failing madvise() of a registered range means, for its log line.
_MADVISE_ERRORS = {
    errno.ENOMEM: " (part of the range is not mapped; the mapped parts were advised)",
    errno.EINVAL: " (the range wraps the address space)",
    errno.EAGAIN: " (the host kernel was short of memory)",
}


def _span(slot: Slot) -> tuple[int, int]:
    """[start, end) of the pages a slot registered, clipped to the 64-bit address space."""
    return slot.base, min(slot.base + slot.npages * abi.PAGE_SIZE, 1 << 64)


def _subtract(ranges: Iterable[tuple[int, int]], holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` (merged, sorted) that no range of ``holes`` covers."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    for h_start, h_end in holes:
        cut: list[tuple[int, int]] = []
        for start, end in out:
            if h_end <= start or end <= h_start:
                cut.append((start, end))
                continue
            if start < h_start:
                cut.append((start, h_start))
            if h_end < end:
                cut.append((h_end, end))
        out = cut
    return out
