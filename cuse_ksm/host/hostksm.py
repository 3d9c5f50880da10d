"""The host kernel's KSM, for ``--merge kernel``: its settings, its counters, what it merged.

In kernel mode the 2009 ioctls drive the real kernel's KSM instead of our
scanner: the registering processes madvise(MADV_MERGEABLE) their memory, and
KSM_START_STOP_KTHREAD becomes writes to /sys/kernel/mm/ksm.  Those settings
belong to the whole machine, so each one is saved before our first write and
put back when the daemon stops.  /proc tells what the kernel made of a
process: which of its pages are marked mergeable (smaps), how many it merges.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Final

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.host import procfs

log = logging.getLogger(__name__)

KSM_DIR: Final = "/sys/kernel/mm/ksm"
KNOBS: Final = ("run", "pages_to_scan", "sleep_millisecs")  # the host settings kernel mode drives, saved and restored
# The rate before the switch, on the way in and on the way out: a ksmd that
# starts (or restarts) then runs at the rate meant for it from its first round.
_WRITE_ORDER: Final = ("sleep_millisecs", "pages_to_scan", "run")
# run=2 unmerges every page on the host and leaves ksmd stopped.  We never
# write it: a saved 2 is put back as the state it left, stopped.
_RUN_UNMERGE: Final = 2
# The first character of a mapping's header line in smaps ("start-end perms
# ..."); every other line starts with a capitalised key ("Rss:", "VmFlags:").
_HEX: Final = frozenset("0123456789abcdef")


class NoHostKsm(RuntimeError):
    """This host cannot merge for real: one clear sentence saying why and what to do."""


def sleep_millisecs(sleep_us: int) -> int:
    """The 2009 struct's sleep (microseconds) as the kernel's sleep_millisecs: rounded UP to whole ms.

    0 stays 0; 1..1000 us is 1 ms.  The 2009 kthread slept
    usecs_to_jiffies(sleep), which also rounds up, and rounding down would
    turn a short pause into a busy ksmd.
    """
    return -(-sleep_us // 1000)


@dataclass(frozen=True)
class HostCounters:
    """The kernel's global counters: they count every mergeable process on the host, not only ours."""

    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    full_scans: int


class HostKsm:
    """The host kernel's KSM settings and counters (/sys/kernel/mm/ksm)."""

    def __init__(self, directory: str = KSM_DIR) -> None:
        self.directory = directory
        # The KNOBS as save() found them, which restore() puts back once we wrote any.
        self._saved: dict[str, int] = {}
        self._wrote = False

    @classmethod
    def open(cls, directory: str = KSM_DIR) -> HostKsm:
        """Check that the host can merge, or raise NoHostKsm saying why and what to do."""
        run = os.path.join(directory, "run")
        if not os.path.exists(directory):
            raise NoHostKsm(
                f"{directory} does not exist: this kernel has no KSM (CONFIG_KSM); "
                "--merge kernel needs it (the default, --merge emulate, does not)"
            )
        if not os.path.exists(run):
            raise NoHostKsm(f"{run} does not exist: {directory} is not a kernel's KSM directory")
        # os.access rather than the mode bits: it also sees a read-only mount.
        if not os.access(run, os.W_OK):
            raise NoHostKsm(
                f"{run} is not writable (not root, or a read-only /sys in a container); "
                "--merge kernel must be able to start and stop the kernel's scanner"
            )
        return cls(directory)

    def read(self, name: str) -> int:
        """One number file."""
        with open(os.path.join(self.directory, name), encoding="ascii") as f:
            return int(f.read())

    def settings(self) -> dict[str, int]:
        """The KNOBS now."""
        return {name: self.read(name) for name in KNOBS}

    def save(self) -> dict[str, int]:
        """Take the KNOBS as they are now as what restore() puts back, and return them.

        The daemon saves at start: a program or another daemon that moves
        the knobs later (the benchmark's madvise runs do) must not become
        what this one restores.  apply() and stop() save by themselves if
        nothing was saved yet.
        """
        self._saved = self.settings()
        return dict(self._saved)

    def apply(self, run: bool, pages_to_scan: int, sleep_us: int) -> None:
        """Make the host's ksmd follow KSM_START_STOP_KTHREAD's values, saving the KNOBS before the first write.

        Only values that differ from the file's are written: writing
        sleep_millisecs or run=1 wakes ksmd early, and a host whose
        pages_to_scan is managed (advisor_mode) refuses any write of it, even
        of the same value.  A refused write raises OSError naming the file
        and the value.
        """
        now = self.settings()
        wanted = {"sleep_millisecs": sleep_millisecs(sleep_us), "pages_to_scan": pages_to_scan, "run": int(run)}
        for name in _WRITE_ORDER:
            if now[name] != wanted[name]:
                self._change(name, wanted[name])

    def stop(self) -> None:
        """Stop the host's ksmd (run=0), saving the KNOBS first as apply() does, and leave its pace alone.

        A 2009 STOP carries zeros in its other fields; the pace of a stopped
        scanner is moot, and other users of the host's KSM keep theirs.
        """
        if self.read("run") != 0:
            self._change("run", 0)

    def restore(self) -> dict[str, int]:
        """Put back every knob saved; what was put back ({} if we never wrote one, or on a second call).

        Called on the way out, so it never raises for one knob: it tries
        all of them, logs each failure and leaves that knob out of the result.
        """
        saved = self._saved if self._wrote else {}
        self._saved, self._wrote = {}, False
        restored = {}
        for name in _WRITE_ORDER if saved else ():
            value = 0 if name == "run" and saved[name] == _RUN_UNMERGE else saved[name]
            try:
                if self.read(name) != value:
                    self._write(name, value)
            except (OSError, ValueError) as err:
                log.error("could not restore %s to %d: %s", os.path.join(self.directory, name), value, err)
            else:
                restored[name] = value
        return restored

    def counters(self) -> HostCounters:
        """The counters now."""
        return HostCounters(**{field.name: self.read(field.name) for field in fields(HostCounters)})

    def general_profit(self) -> int | None:
        """The kernel's general_profit in bytes (signed), or None on kernels before 6.4, which have none."""
        try:
            return self.read("general_profit")
        except FileNotFoundError:
            return None

    def _change(self, name: str, value: int) -> None:
        """Write a knob for our caller: saved first if nothing was, and restore() will put it back."""
        if not self._saved:
            self.save()
        self._write(name, value)
        self._wrote = True

    def _write(self, name: str, value: int) -> None:
        path = os.path.join(self.directory, name)
        try:
            # No O_CREAT: a missing knob is an error, not a new file.  O_TRUNC
            # for plain files (the tests' directories); sysfs ignores it.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, b"%d\n" % value)  # one write(): sysfs takes a value in one store
            finally:
                os.close(fd)
        except OSError as err:
            raise OSError(err.errno, f"cannot write {value} to {path}: {err.strerror}") from err


def merging_pages(tgid: int) -> int | None:
    """Pages of process tgid that KSM currently merges (/proc/PID/ksm_merging_pages).

    None when the process is gone, or when the kernel is older than 5.19 and
    has no such file.  (/proc/PID/ksm_stat, 6.1, came after it: it is never
    the only one there.)
    """
    text = procfs.read(tgid, "ksm_merging_pages")
    # A zombie's file is empty: its memory, and with it any merging, is gone.
    return int(text) if text else None


def ksm_stat(tgid: int) -> str | None:
    """The text of /proc/PID/ksm_stat; None when the process is gone or the kernel (before 6.1) has none.

    Its lines grew with the kernel (6.1: ksm_rmap_items only; later
    ksm_merging_pages, ksm_process_profit, ksm_zero_pages, ksm_merge_any,
    ksm_mergeable): passed on as the host wrote it.
    """
    return procfs.read(tgid, "ksm_stat")


def mergeable_pages(tgid: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(mapped, mergeable) pages of each (addr, npages) range in process tgid, from /proc/PID/smaps.

    mapped: pages of the range inside any mapping; mergeable: those inside
    mappings whose VmFlags include ``mg`` (VM_MERGEABLE).  This is the truth
    after madvise: MADV_MERGEABLE returns 0 yet silently ignores MAP_SHARED
    mappings, and a partly unmapped range fails with ENOMEM after marking
    the mapped parts.  (0, 0) for each range if the process is gone.  Ranges
    are intersected with each mapping arithmetically, so any npages and addr
    cost the same; addr is page-aligned, as madvise requires.

    One read of smaps serves every range: the kernel computes each
    mapping's resident-set figures for it (a page-table walk, ~10 ms per
    GiB resident), and the daemon's loop waits meanwhile.
    """
    text = procfs.read(tgid, "smaps") or ""
    mappings: list[tuple[int, int, bool]] = []  # (low, high, VM_MERGEABLE)
    for line in text.splitlines():
        if line[:1] in _HEX:
            start, _, rest = line.partition("-")
            mappings.append((int(start, 16), int(rest[: rest.index(" ")], 16), False))
        elif mappings and line.startswith("VmFlags:") and "mg" in line.split():
            low, high, _ = mappings[-1]
            mappings[-1] = (low, high, True)
    out = []
    for addr, npages in ranges:
        end = addr + npages * PAGE_SIZE
        mapped = mergeable = 0
        for low, high, mg in mappings:
            if low >= end:  # mappings come in address order: none further can overlap
                break
            inside = max(0, min(high, end) - max(low, addr))
            mapped += inside
            mergeable += inside if mg else 0
        out.append((mapped // PAGE_SIZE, mergeable // PAGE_SIZE))
    return out
