"""The memory of a registered process, pinned to its address space.

At REGISTER the caller's thread is blocked in our ioctl, so it is alive and
its tid names it without ambiguity.  We open, in this order:

1. a pidfd of its thread group: it names the process, not a number, and
   polls readable once the process has exited;
2. ``/proc/<tid>/pagemap``, ``/proc/<tid>/mem`` and ``/proc/<tid>/maps``:
   opening each takes a reference on the process's ``mm_struct``
   (``proc_mem_open``), and reads through these fds see that mm or nothing -
   never another process's memory, even after pid reuse or exec.

Then we check the pidfd once more: if the process died between the opens,
the fds might belong to a successor with the same pid, so we refuse.  From
then on the fds, not the pid, identify the memory.

Reading (the scanner's side)
----------------------------

Before a pass enters a region, the scanner asks which parts of it are
mapped (:meth:`ProcessMemory.mapped`), through the pinned maps fd, so
that holes - addresses in no mapping - are passed over without a pagemap
read, as today's kernel walks VMAs.

For each batch the scanner asks for, we first read the batch's pagemap
entries through the pinned fd.  Only pages whose "present" bit is set are
copied: reading a page that is not in RAM would fault it in (or read it back
from swap), which the kernel's scanner never does.  A page can still be
swapped out between the two steps; the copy then faults it back in, a rare
and harmless cost.

The copy is one preadv() of the pinned ``/proc/<tid>/mem`` fd per run of
present pages.  Reading must not change what it reads, which rules out the
faster process_vm_readv(2): it pins each page (FOLL_PIN), and since Linux
5.19 a read-only pin of an anonymous page that is not exclusive to its
process makes the kernel copy it first (FAULT_FLAG_UNSHARE).  Pages a fork
left shared between parent and child are not exclusive, nor is any page
KSM merged: process_vm_readv would give a forked client private copies of
its shared memory (it uses *more* memory once scanned), and with
``--merge kernel`` undo on every pass what the host kernel merged
(tests/host/test_procmem.py shows both).  /proc/<tid>/mem reads take the
page without a pin and leave it shared, at ~25 % more time per byte
(docs/benchmarks.md).

The copy of a single run of present pages started by
:meth:`ProcessMemory.start_read` (the scanner reading its next window
ahead) is made by the kernel through io_uring (cuse_ksm/host/uring.py):
one of its io-wq workers runs the pread while the main thread works on
the pages it read before, with no thread and no GIL of ours involved.
Everything else stays on the main thread: pagemap is read and the runs
planned before the copy, and the checks below run when the scanner
collects the read, after the copy.  A copy that comes back short is made
again synchronously, so that an unreadable page is found and marked
exactly as a synchronous read finds it.  Every read has an owner that
collects it, and :meth:`close` waits for a read in flight before it
closes the fds (else the worker could read an fd number reused meanwhile).

The mem fd reads the mm it pinned or nothing, so a pid reused meanwhile
cannot redirect it.  An exec'd process keeps its pid but its old mm dies:
reads then return 0 bytes, and the check after every copy tells that from
an unreadable page: the pidfd has not polled readable (not exited) and
the pinned pagemap fd still returns data (the mm still has users).  The
check runs *after* the copy, so nothing that happens during the copy can
slip past it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import select
import struct
from dataclasses import dataclass, field

from cuse_ksm.abi import PAGE_COPIED, PAGE_SIZE, PAGE_UNREADABLE, PAGE_ZERO
from cuse_ksm.engine.registry import PendingRead, ReadDone
from cuse_ksm.host import procfs, uring

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
PM_ENTRY = 8  # bytes per pagemap entry
# Bit 63 of a pagemap entry: the page is present in RAM.  It is the top bit
# of the entry's last byte (little-endian), so the presence of n pages is
# pm[7::8] mapped through this table: one byte per page, 1 or 0, in C.
_PRESENT = bytes(1 if b & 0x80 else 0 for b in range(256))
_RUNS = re.compile(rb"\x01+")
PM_PRESENT = 1 << 63
PM_SOFT_DIRTY = 1 << 55
PM_PFN_MASK = (1 << 55) - 1


def _zero_page_entries() -> tuple[bytes, ...]:
    """The pagemap entries of an anonymous page that was only ever read.

    Such a page maps the kernel's shared zero page: its pte is present, so
    pagemap calls it present, but it is no page of the process's own and
    holds no memory to save.  The kernel's KSM skips it (vm_normal_page()
    gives no page for it); so do we, or pages_sharing would count savings
    that do not exist.  (The 2009 kernels had no anonymous zero page at all:
    a read allocated a private page; on today's kernel the zero page is
    what the process really has.)

    Found once, by reading a fresh page of our own and looking up its frame.
    Empty when frames are hidden (no CAP_SYS_ADMIN: pagemap shows PFN 0).
    """
    probe = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        probe[0]  # a read fault maps the zero page
        addr = ctypes.addressof(ctypes.c_char.from_buffer(probe))
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            entry = int.from_bytes(os.pread(fd, PM_ENTRY, (addr >> PAGE_SHIFT) * PM_ENTRY), "little")
        finally:
            os.close(fd)
    finally:
        probe.close()
    pfn = entry & PM_PFN_MASK
    if not entry & PM_PRESENT or pfn == 0:
        return ()
    return tuple((PM_PRESENT | dirty | pfn).to_bytes(PM_ENTRY, "little") for dirty in (0, PM_SOFT_DIRTY))


_ZERO_PAGE_ENTRIES = _zero_page_entries()


def _mark_zero_pages(pm: bytes, present: bytes) -> bytes:
    """``present`` with the pages that map the shared zero page marked PAGE_ZERO (not copied)."""
    if not any(e in pm for e in _ZERO_PAGE_ENTRIES):  # the common case, searched in C
        return present
    marks = bytearray(present)
    for entry in _ZERO_PAGE_ENTRIES:
        at = pm.find(entry)
        while at >= 0:
            if at % PM_ENTRY == 0:  # a whole entry, not bytes straddling two
                marks[at // PM_ENTRY] = PAGE_ZERO
            at = pm.find(entry, at + 1)
    return bytes(marks)


# Buffers we read into, by id, with the ctypes view that pins their address.
_buffer_addrs: dict[int, tuple[mmap.mmap, ctypes.c_char]] = {}


def _address_of(buf: mmap.mmap) -> int:
    entry = _buffer_addrs.get(id(buf))
    if entry is None or entry[0] is not buf:
        entry = (buf, ctypes.c_char.from_buffer(buf))
        _buffer_addrs[id(buf)] = entry
    return ctypes.addressof(entry[1])


_page_buf = mmap.mmap(-1, PAGE_SIZE)
# One read of a maps file (the kernel hands out about a page a read).
_MAPS_READ = 1 << 16
# PROCMAP_QUERY (Linux 6.11+, include/uapi/linux/fs.h): an ioctl on a maps
# fd that returns the mapping covering an address, or the next one, as
# numbers: ~2 us a mapping where the text of all of them costs ~150 us.
# struct procmap_query: size, query_flags, query_addr, vma_start, vma_end,
# vma_flags, vma_page_size, vma_offset, inode (u64); dev_major, dev_minor,
# vma_name_size, build_id_size (u32); vma_name_addr, build_id_addr (u64).
_PROCMAP_QUERY = struct.Struct("<9Q4I2Q")
_PROCMAP_QUERY_IOCTL = 0xC0000000 | (_PROCMAP_QUERY.size << 16) | (ord("f") << 8) | 17  # _IOWR('f', 17, ...)
_COVERING_OR_NEXT_VMA = 0x10
_QUERY_ZEROS = (0,) * 12
# False once this kernel turned PROCMAP_QUERY down (ENOTTY): the text is read.
_procmap_query = True


def pidfd_exited(pidfd: int) -> bool:
    """True once the process behind ``pidfd`` has exited (the pidfd polls readable)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


@dataclass(eq=False)
class ProcessMemory:
    """An :class:`~cuse_ksm.engine.AddressSpace` backed by a pidfd and pinned pagemap and mem fds."""

    tgid: int
    tid: int
    pidfd: int
    pagemap_fd: int
    mem_fd: int
    maps_fd: int
    closed: bool = field(default=False)
    # Reads whose copy the kernel may still be making (close() waits for them).
    inflight: list[_Read] = field(default_factory=list, repr=False)

    @classmethod
    def open(cls, tid: int) -> ProcessMemory:
        """Pin the address space of thread ``tid``.

        Raises ProcessLookupError when the thread (or its memory) is gone.
        """
        try:
            tgid = procfs.tgid(tid)
            pidfd = os.pidfd_open(tgid)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise ProcessLookupError(f"thread {tid} is gone") from e
        fds = [pidfd]
        try:
            for name in ("pagemap", "mem", "maps"):
                fds.append(os.open(f"/proc/{tid}/{name}", os.O_RDONLY | os.O_CLOEXEC))
        except (FileNotFoundError, ProcessLookupError) as e:
            for fd in fds:
                os.close(fd)
            raise ProcessLookupError(f"thread {tid} is gone") from e
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        space = cls(tgid, tid, pidfd, fds[1], fds[2], fds[3])
        if pidfd_exited(pidfd):
            space.close()
            raise ProcessLookupError(f"process {tgid} exited while registering")
        return space

    def alive(self) -> bool:
        """The pinned process has not exited and the pinned mm still has users.

        Page 0 is never mapped, but its pagemap entry can always be read while
        the mm lives; once the mm is gone the read returns 0 bytes.
        """
        if self.closed or pidfd_exited(self.pidfd):
            return False
        try:
            return len(os.pread(self.pagemap_fd, PM_ENTRY, 0)) == PM_ENTRY
        except OSError:
            return False

    def present(self, addr: int, npages: int) -> bytes | None:
        """One byte per page of [addr, addr + npages pages): 1 if present in RAM, 0 if not, PAGE_ZERO
        if it maps the shared zero page.  None if the mm is gone."""
        try:
            pm = os.pread(self.pagemap_fd, npages * PM_ENTRY, (addr >> PAGE_SHIFT) * PM_ENTRY)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOVERFLOW):
                return bytes(npages)  # beyond what pagemap can address
            raise
        # A short read: either the range runs past the top of the user
        # address space (those pages cannot be present), or the mm died.
        if len(pm) < npages * PM_ENTRY and not self.alive():
            return None
        present = _mark_zero_pages(pm, pm[7::PM_ENTRY].translate(_PRESENT))
        if len(present) < npages:
            present += bytes(npages - len(present))
        return present

    def read_pages(self, addr: int, npages: int, into: mmap.mmap) -> bytes | None:
        """Copy the present pages of [addr, addr + npages pages) to ``into[i * PAGE_SIZE:]``.

        Returns one byte per page, as :data:`cuse_ksm.abi.PAGE_COPIED` and
        its neighbours say (copied; not present; the shared zero page;
        present but unreadable), or None once the process or its mm is gone.
        See the module docstring for why the checks come after the copy.
        """
        return self._start(addr, npages, into, ahead=False).result()

    def start_read(self, addr: int, npages: int, into: mmap.mmap) -> PendingRead:
        """As :meth:`read_pages`, the copy of a single run made by the kernel (io_uring) while the caller goes on."""
        return self._start(addr, npages, into, ahead=True)

    def _start(self, addr: int, npages: int, into: mmap.mmap, ahead: bool) -> PendingRead:
        """Read pagemap and plan the runs here; copy them now, or (``ahead``, one run) through io_uring."""
        if self.closed:
            return ReadDone(None)
        present = self.present(addr, npages)
        if present is None or PAGE_COPIED not in present:
            return ReadDone(present)
        # Runs of consecutive present pages, one iovec each.
        if present.count(PAGE_COPIED) == npages:
            runs = [(0, npages)]
        else:
            runs = [(m.start(), m.end()) for m in _RUNS.finditer(present)]
        read = _Read(self, addr, into, present, runs)
        ring = uring.ring() if ahead and len(runs) == 1 else None
        if ring is None or not read.submit(ring):
            read.got = self._pread(read.local, addr, runs)
        return read

    def _pread(self, local: int, addr: int, runs: list[tuple[int, int]]) -> int:
        """The page ``runs`` at ``addr`` into ``local``, one preadv a run: bytes read, up to the first page it cannot.

        A read of the mm once it has no users returns 0 bytes; the check
        after the copy tells that from an unreadable page.
        """
        got = 0
        for start, end in runs:
            length = (end - start) << PAGE_SHIFT
            buf = (ctypes.c_char * length).from_address(local + (start << PAGE_SHIFT))
            try:
                n = os.preadv(self.mem_fd, [buf], addr + (start << PAGE_SHIFT))
            except OSError:
                n = 0  # EIO: not even the run's first page could be read
            got += n
            if n < length:
                break
        return got

    def mapped(self, addr: int, npages: int) -> list[tuple[int, int]] | None:
        """The parts of [addr, addr + npages pages) inside the process's mappings now, or None once its mm is gone.

        Through the pinned maps fd: PROCMAP_QUERY where the kernel has it
        (one ioctl per mapping met), else its text, read whole.  A mm with
        no users left answers ESRCH or reads as empty; the check then tells
        that from a process with nothing mapped there.
        """
        global _procmap_query
        if self.closed:
            return None
        end = min(addr + npages * PAGE_SIZE, 1 << 64)
        try:
            if _procmap_query:
                try:
                    return self._query(addr, end)
                except OSError as e:
                    if e.errno not in (errno.ENOTTY, errno.EINVAL):
                        raise
                    _procmap_query = False  # before Linux 6.11: read the text
            found = procfs.mappings(self._read_maps())
        except OSError:
            if not self.alive():
                return None  # the mm is gone: ESRCH
            raise
        if not found and not self.alive():
            return None  # a mm with no users left reads as empty
        out = []
        for low, high in found:
            if low >= end:  # in address order: none further can overlap
                break
            lo, hi = max(low, addr), min(high, end)
            if lo < hi:
                out.append((lo, hi))
        return out

    def _query(self, addr: int, end: int) -> list[tuple[int, int]]:
        """The mapped parts of [addr, end) through PROCMAP_QUERY: one ioctl per mapping met, no text."""
        out: list[tuple[int, int]] = []
        at = addr
        while at < end:
            query = bytearray(_PROCMAP_QUERY.pack(_PROCMAP_QUERY.size, _COVERING_OR_NEXT_VMA, at, *_QUERY_ZEROS))
            try:
                fcntl.ioctl(self.maps_fd, _PROCMAP_QUERY_IOCTL, query, True)
            except OSError as e:
                if e.errno == errno.ENOENT:  # no mapping at or after ``at``
                    break
                raise
            low, high = _PROCMAP_QUERY.unpack_from(query)[3:5]
            if low >= end:
                break
            low = max(low, at)
            if out and out[-1][1] == low:
                out[-1] = (out[-1][0], min(high, end))  # adjacent mappings: one run
            else:
                out.append((low, min(high, end)))
            at = high
        return out

    def _read_maps(self) -> bytes:
        """The text of the pinned maps file: read() from the start to the end (a seq_file: preads at an
        offset would each walk the mappings from the first)."""
        os.lseek(self.maps_fd, 0, os.SEEK_SET)
        parts = []
        while got := os.read(self.maps_fd, _MAPS_READ):
            parts.append(got)
        return b"".join(parts)

    def read_page(self, addr: int) -> bytes | None:
        """The page at ``addr`` if present (never faulted in), else None."""
        present = self.read_pages(addr, 1, _page_buf)
        if not present or present[0] != PAGE_COPIED:
            return None
        return _page_buf[:PAGE_SIZE]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # The kernel may still be reading mem_fd for a read started
            # ahead: wait for it first.  Closed under it, the fd number could
            # be reused by the next open, and the copy read from that file.
            # The read's owner gets None from it (closed, checked first).
            while self.inflight:
                self.inflight[0].wait()
            os.close(self.pagemap_fd)
            os.close(self.pidfd)
            os.close(self.mem_fd)
            os.close(self.maps_fd)


class _Read:
    """One read of ``runs`` of present pages (a :class:`~cuse_ksm.engine.PendingRead`): copied already, or in flight.

    ``got`` is the bytes the first copy read (up to the first page it could
    not); :meth:`result` resumes after such a page, on the main thread,
    then checks the process.  While in flight (``token`` set), the read
    holds ``into`` (whose address the kernel writes to: an mmap with an
    exported pointer cannot be closed, and this reference keeps it from
    being freed) and is listed in its space's ``inflight``.
    """

    __slots__ = ("addr", "got", "into", "local", "present", "ring", "runs", "space", "token")

    def __init__(self, space: ProcessMemory, addr: int, into: mmap.mmap, present: bytes, runs: list[tuple[int, int]]):
        self.space = space
        self.addr = addr
        self.into = into
        self.local = _address_of(into)
        self.present = present
        self.runs = runs
        self.got = 0
        self.ring: uring.Ring | None = None
        self.token = 0

    def submit(self, ring: uring.Ring) -> bool:
        """Hand the single run to io_uring; False if the kernel refused it (the caller then copies it itself)."""
        start, end = self.runs[0]
        try:
            self.token = ring.read(
                self.space.mem_fd,
                self.local + (start << PAGE_SHIFT),
                (end - start) << PAGE_SHIFT,
                self.addr + (start << PAGE_SHIFT),
            )
        except OSError:
            return False
        self.ring = ring
        self.space.inflight.append(self)
        return True

    def ready(self, timeout: float = 0.0) -> bool:
        return self.ring is None or self.ring.done(self.token, timeout)

    def wait(self) -> None:
        """Until the kernel's copy is done (if there is one); then nothing touches ``into`` or the fd for it."""
        ring = self.ring
        if ring is None:
            return
        res = ring.wait(self.token)
        self.ring = None
        self.space.inflight.remove(self)
        start, end = self.runs[0]
        if res != (end - start) << PAGE_SHIFT and not self.space.closed:
            # Short, or an error: copied again here, so that the first page
            # that cannot be read is found as a synchronous read finds it
            # (a short read through io_uring may have been retried, and an
            # error says nothing of the pages before the bad one).
            res = self.space._pread(self.local, self.addr, self.runs)
        self.got = max(res, 0)

    def result(self) -> bytes | None:
        self.wait()
        space = self.space
        if space.closed:
            return None  # closed while in flight: its fds are gone, so is the process for us
        addr, local, present, runs = self.addr, self.local, self.present, self.runs
        got = self.got
        out: bytearray | None = None
        while True:
            # The reads stop at the first page that cannot be read: unmapped
            # since we read pagemap, present but unreadable (I/O memory), or
            # the mm is gone (checked below).  That page is marked
            # PAGE_UNREADABLE; the read resumes after it.
            left = got >> PAGE_SHIFT
            for r, (start, end) in enumerate(runs):
                if left >= end - start:
                    left -= end - start
                    continue
                bad = start + left
                if out is None:
                    out = bytearray(present)
                out[bad] = PAGE_UNREADABLE
                runs = ([(bad + 1, end)] if bad + 1 < end else []) + runs[r + 1 :]
                break
            else:
                runs = []
            if not runs:
                break
            got = space._pread(local, addr, runs)
        if not space.alive():
            return None
        return present if out is None else bytes(out)
