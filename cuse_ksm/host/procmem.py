"""The memory of a registered process, pinned to its address space.

At REGISTER the caller's thread is blocked in our ioctl, so it is alive and
its tid names it without ambiguity.  We open, in this order:

1. a pidfd of its thread group: it names the process, not a number, and
   polls readable once the process has exited;
2. ``/proc/<tid>/pagemap``: opening it takes a reference on the process's
   ``mm_struct`` (``proc_mem_open``), and reads through this fd see that mm
   or nothing - never another process's memory, even after pid reuse or exec.

Then we check the pidfd once more: if the process died between the two
opens, the pagemap fd might belong to a successor with the same pid, so we
refuse.  From then on the fds, not the pid, identify the memory.

Reading (the scanner's side)
----------------------------

For each batch the scanner asks for, we first read the batch's pagemap
entries through the pinned fd.  Only pages whose "present" bit is set are
copied: reading a page that is not in RAM would fault it in (or read it back
from swap), which the kernel's scanner never does.  A page can still be
swapped out between the two steps; the copy then faults it back in, a rare
and harmless cost.

The copy uses process_vm_readv(2): it copies straight from the target's
pages into our buffer, about twice as fast as preadv() on /proc/<pid>/mem,
which goes through a bounce page one page at a time.  But process_vm_readv
names the process by *pid*, and a pid can be reused.  So every read is
followed by two checks, and the data is thrown away unless both pass:

* the pidfd has not polled readable: the process we pinned has not exited,
  so its pid cannot have been given to anyone else - not after the read,
  hence not during it either (an exit cannot be undone);
* the pinned pagemap fd still returns data: the mm we pinned still has
  users.  If the process exec'd, it kept its pid but the old mm died, and
  pagemap reads return 0 bytes from then on; the data may be from the new
  program, so we discard it and report the space gone.

Both checks run *after* the copy, so nothing that happens during the copy
can slip past them.

Reading must not change what it reads, and there process_vm_readv falls
short: it pins each page (FOLL_PIN), and since Linux 5.19 a read-only pin
of an anonymous page that is not exclusive to the process makes the kernel
copy it first (FAULT_FLAG_UNSHARE).  A page that KSM merged is never
exclusive, so with ``--merge kernel`` every pass of our scanner would undo
what the host kernel merged.  ``open(..., proc_mem=True)`` therefore reads
through ``/proc/<tid>/mem`` instead: slower, but its reads take the page
without a pin and leave it shared.  Its fd pins the mm as the pagemap fd
does.  (Pages a fork left shared between parent and child are not
exclusive either: process_vm_readv copies those too, see
tests/host/test_procmem.py.)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import select
from dataclasses import dataclass, field

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.host import procfs
from cuse_ksm.host.libc import Iovec, process_vm_readv

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


def _drop_zero_pages(pm: bytes, present: bytes) -> bytes:
    """``present`` with the pages that map the shared zero page marked absent."""
    if not any(e in pm for e in _ZERO_PAGE_ENTRIES):  # the common case, searched in C
        return present
    marks = bytearray(present)
    for entry in _ZERO_PAGE_ENTRIES:
        at = pm.find(entry)
        while at >= 0:
            if at % PM_ENTRY == 0:  # a whole entry, not bytes straddling two
                marks[at // PM_ENTRY] = 0
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


def pidfd_exited(pidfd: int) -> bool:
    """True once the process behind ``pidfd`` has exited (the pidfd polls readable)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


@dataclass(eq=False)
class ProcessMemory:
    """An :class:`~cuse_ksm.engine.AddressSpace` backed by a pidfd and a pinned pagemap fd."""

    tgid: int
    tid: int
    pidfd: int
    pagemap_fd: int
    closed: bool = field(default=False)
    mem_fd: int | None = None  # /proc/<tid>/mem, to read without unsharing (module docstring)

    @classmethod
    def open(cls, tid: int, *, proc_mem: bool = False) -> ProcessMemory:
        """Pin the address space of thread ``tid``; with ``proc_mem``, read it through /proc/<tid>/mem.

        Raises ProcessLookupError when the thread (or its memory) is gone.
        """
        try:
            tgid = procfs.tgid(tid)
            pidfd = os.pidfd_open(tgid)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise ProcessLookupError(f"thread {tid} is gone") from e
        fds = [pidfd]
        try:
            for name in ("pagemap", "mem") if proc_mem else ("pagemap",):
                fds.append(os.open(f"/proc/{tid}/{name}", os.O_RDONLY | os.O_CLOEXEC))
        except (FileNotFoundError, ProcessLookupError) as e:
            for fd in fds:
                os.close(fd)
            raise ProcessLookupError(f"thread {tid} is gone") from e
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        space = cls(tgid, tid, pidfd, fds[1], mem_fd=fds[2] if proc_mem else None)
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
        """One byte per page of [addr, addr + npages pages): 1 if present in RAM.  None if the mm is gone."""
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
        present = _drop_zero_pages(pm, pm[7::PM_ENTRY].translate(_PRESENT))
        if len(present) < npages:
            present += bytes(npages - len(present))
        return present

    def read_pages(self, addr: int, npages: int, into: mmap.mmap) -> bytes | None:
        """Copy the present pages of [addr, addr + npages pages) to ``into[i * PAGE_SIZE:]``.

        Returns one byte per page (1: present and copied, 0: skipped), or
        None once the process or its mm is gone.  See the module docstring
        for why the checks come after the copy.
        """
        if self.closed:
            return None
        present = self.present(addr, npages)
        if present is None or 1 not in present:
            return present
        local = _address_of(into)
        # Runs of consecutive present pages, one iovec each.
        runs = [(0, npages)] if 0 not in present else [(m.start(), m.end()) for m in _RUNS.finditer(present)]
        out: bytearray | None = None
        while runs:
            got = self._readv(local, addr, runs) if self.mem_fd is None else self._pread(local, addr, runs)
            if got is None:
                return None
            # process_vm_readv fills the iovecs in order and stops at the
            # first page it cannot read: unmapped since we read pagemap, or
            # present but unreadable (PROT_NONE, I/O memory).  That page is
            # counted as not present; the read resumes after it.
            left = got >> PAGE_SHIFT
            for r, (start, end) in enumerate(runs):
                if left >= end - start:
                    left -= end - start
                    continue
                bad = start + left
                if out is None:
                    out = bytearray(present)
                out[bad] = 0
                runs = ([(bad + 1, end)] if bad + 1 < end else []) + runs[r + 1 :]
                break
            else:
                runs = []
        if not self.alive():
            return None
        return present if out is None else bytes(out)

    def _readv(self, local: int, addr: int, runs: list[tuple[int, int]]) -> int | None:
        """One process_vm_readv of the page ``runs`` at ``addr`` into ``local``: bytes read, None if gone."""
        nruns = len(runs)
        liov = (Iovec * nruns)()
        riov = (Iovec * nruns)()
        for r, (start, end) in enumerate(runs):
            length = (end - start) << PAGE_SHIFT
            liov[r].iov_base = local + (start << PAGE_SHIFT)
            liov[r].iov_len = length
            riov[r].iov_base = addr + (start << PAGE_SHIFT)
            riov[r].iov_len = length
        got: int = process_vm_readv(self.tgid, liov, nruns, riov, nruns, 0)
        if got >= 0:
            return got
        if ctypes.get_errno() == errno.ESRCH or not self.alive():
            return None
        return 0  # EFAULT and the like: not even the first page could be read

    def _pread(self, local: int, addr: int, runs: list[tuple[int, int]]) -> int:
        """As :meth:`_readv`, through /proc/<tid>/mem: one preadv a run, up to the first page it cannot read.

        A read of the mm once it has no users returns 0 bytes; the check
        after the copy tells that from an unreadable page.
        """
        assert self.mem_fd is not None
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

    def read_page(self, addr: int) -> bytes | None:
        """The page at ``addr`` if present (never faulted in), else None."""
        present = self.read_pages(addr, 1, _page_buf)
        if not present or not present[0]:
            return None
        return _page_buf[:PAGE_SIZE]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.pagemap_fd)
            os.close(self.pidfd)
            if self.mem_fd is not None:
                os.close(self.mem_fd)
