"""Reads made by the kernel while we go on: a minimal io_uring, through ctypes.

The scanner reads the next window of a process's memory while it works on
the window before (cuse_ksm/engine/scanner.py).  The copy must run on the
other CPU without our GIL, and without a thread of ours: a Python thread
pays ~50 us per hand-off and fights the main thread for the GIL after
every copy (docs/benchmarks.md, issue 14, rows 5 and 8).  io_uring gives
exactly that: we put a read request in a ring shared with the kernel and
go on; a read of ``/proc/PID/mem`` cannot complete without blocking, so
the kernel hands it to one of its io-wq workers, a kernel thread that
runs in our process's name and copies while we compute; its completion
lands in the other ring, where we look for it without a system call.

Only what the scanner needs is here: :class:`Ring` with one operation,
:meth:`Ring.read`, its completion by polling (:meth:`Ring.done`, which may
also wait up to a timeout: the scanner waits for a copy in slices, and
asks between two whether a request waits) or by waiting
(:meth:`Ring.wait`).  A ring is made per process on first use
(:func:`ring`), with its io-wq capped at one worker: only one read is ever
ahead, and the other CPU is the clients' too.  The worker exits after a few
seconds idle, so the daemon has no thread but its own once the scanner
rests.

Where io_uring is missing (before Linux 5.6, no ``IORING_OP_READ``),
turned off (``kernel.io_uring_disabled``, seccomp, containers), or the
machine is not x86_64 (the ring is shared memory updated here with plain
stores, whose order only x86's memory model guarantees), :func:`ring`
returns None and every read is made by the caller, synchronously.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct

from cuse_ksm.host.libc import syscall

# System call numbers, x86_64 (the same on every architecture since 5.1).
_SYS_IO_URING_SETUP = 425
_SYS_IO_URING_ENTER = 426
_SYS_IO_URING_REGISTER = 427
_IORING_ENTER_GETEVENTS = 1
_IORING_ENTER_EXT_ARG = 8  # Linux 5.11: a wait with a timeout
_IORING_FEAT_EXT_ARG = 1 << 8
_IORING_OP_READ = 22  # Linux 5.6
_IORING_REGISTER_IOWQ_MAX_WORKERS = 19  # Linux 5.15; older kernels keep their own cap
# mmap offsets of the three shared areas.
_IORING_OFF_SQ_RING = 0
_IORING_OFF_CQ_RING = 0x8000000
_IORING_OFF_SQES = 0x10000000


class _SqringOffsets(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped")],
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _CqringOffsets(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes")],
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _Params(ctypes.Structure):
    """struct io_uring_params (include/uapi/linux/io_uring.h)."""

    _fields_ = [
        *[
            (name, ctypes.c_uint32)
            for name in ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle", "features", "wq_fd")
        ],
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqringOffsets),
        ("cq_off", _CqringOffsets),
    ]


class _Timespec(ctypes.Structure):
    """struct __kernel_timespec."""

    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]


class _GeteventsArg(ctypes.Structure):
    """struct io_uring_getevents_arg: no signal mask, a timeout."""

    _fields_ = [
        ("sigmask", ctypes.c_uint64),
        ("sigmask_sz", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
    ]


# struct io_uring_sqe, as a read uses it: opcode, flags, ioprio, fd, off,
# addr, len, rw_flags, user_data, then 24 bytes left zero.
_SQE = struct.Struct("<BBHiQQIIQ24x")
# struct io_uring_cqe: user_data, res (bytes, or -errno), flags.
_CQE = struct.Struct("<QiI")


class Ring:
    """One io_uring instance: submit reads, collect their results by token.

    Used from one thread (the daemon's), as everything else in the engine.
    Results that arrive for other tokens than the one asked for are kept
    until asked for; a token is asked for once.
    """

    def __init__(self, entries: int = 4) -> None:
        p = _Params()
        fd = syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(entries), ctypes.byref(p))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        try:
            prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_POPULATE
            self._sq = mmap.mmap(fd, p.sq_off.array + p.sq_entries * 4, flags, prot, offset=_IORING_OFF_SQ_RING)
            self._cq = mmap.mmap(fd, p.cq_off.cqes + p.cq_entries * _CQE.size, flags, prot, offset=_IORING_OFF_CQ_RING)
            self._sqes = mmap.mmap(fd, p.sq_entries * _SQE.size, flags, prot, offset=_IORING_OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        self._sqw = memoryview(self._sq).cast("I")
        self._cqw = memoryview(self._cq).cast("I")
        self._sq_tail = p.sq_off.tail // 4
        self._sq_array = p.sq_off.array // 4
        self._sq_mask = p.sq_entries - 1
        self._cq_head = p.cq_off.head // 4
        self._cq_tail = p.cq_off.tail // 4
        self._cqes = p.cq_off.cqes
        self._cq_mask = p.cq_entries - 1
        self.capacity = p.sq_entries  # reads in flight at most (the CQ ring holds twice as many)
        self._timed_waits = bool(p.features & _IORING_FEAT_EXT_ARG)
        self._ts = _Timespec()
        self._arg = _GeteventsArg(0, 0, 0, ctypes.addressof(self._ts))
        self._next = 1
        self._inflight: set[int] = set()
        self._results: dict[int, int] = {}
        # One worker for reads of regular files, one for the rest (procfs
        # files are regular): ENOSYS/EINVAL before 5.15 leave the kernel's cap.
        workers = (ctypes.c_uint32 * 2)(1, 1)
        syscall(_SYS_IO_URING_REGISTER, fd, _IORING_REGISTER_IOWQ_MAX_WORKERS, workers, 2)

    def read(self, fd: int, addr: int, length: int, offset: int) -> int:
        """Submit a pread of ``length`` bytes at ``offset`` of ``fd`` into memory at ``addr``; returns its token.

        The memory and the fd must stay valid until the token's result has
        been collected (:meth:`wait`).  OSError if the kernel refused it
        (nothing is then in flight).
        """
        if len(self._inflight) >= self.capacity:
            raise OSError(errno.EBUSY, "io_uring: too many reads in flight")
        token = self._next
        self._next += 1
        sqw = self._sqw
        tail = sqw[self._sq_tail]
        i = tail & self._sq_mask
        _SQE.pack_into(self._sqes, i * _SQE.size, _IORING_OP_READ, 0, 0, fd, offset, addr, length, 0, token)
        sqw[self._sq_array + i] = i
        # The entry is written before the tail that publishes it: stores are
        # not reordered with stores on x86 (hence x86_64 only, see ring()).
        sqw[self._sq_tail] = (tail + 1) & 0xFFFFFFFF
        if self._enter(1, 0, 0) != 1:
            e = ctypes.get_errno()
            # Not consumed: take the entry back, so the next read overwrites it.
            sqw[self._sq_tail] = tail
            raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
        self._inflight.add(token)
        return token

    def _reap(self) -> None:
        """Move the completions the kernel has posted into ``_results``."""
        cqw = self._cqw
        head, tail = cqw[self._cq_head], cqw[self._cq_tail]
        if head == tail:
            return
        while head != tail:
            token, res, _ = _CQE.unpack_from(self._cq, self._cqes + (head & self._cq_mask) * _CQE.size)
            self._results[token] = res
            self._inflight.discard(token)
            head = (head + 1) & 0xFFFFFFFF
        cqw[self._cq_head] = head

    def done(self, token: int, timeout: float = 0.0) -> bool:
        """Has the read ``token`` completed?  With a ``timeout`` (s), wait up to that long for a completion first.

        Without a timeout, no system call.  A kernel before 5.11 cannot
        wait with a timeout: there, the wait lasts until a completion.
        """
        if token in self._results:
            return True
        self._reap()
        if token not in self._results and timeout > 0:
            self._wait_completion(timeout)
            self._reap()
        return token in self._results

    def wait(self, token: int) -> int:
        """The result of read ``token`` (bytes read, or -errno), waiting for it if need be."""
        while not self.done(token):
            self._wait_completion(None)
        return self._results.pop(token)

    def _wait_completion(self, timeout: float | None) -> None:
        """Wait in the kernel until a completion is posted, or ``timeout`` s have passed (None: no limit)."""
        if timeout is not None and self._timed_waits:
            self._ts.tv_sec, self._ts.tv_nsec = divmod(int(timeout * 1e9), 1_000_000_000)
            res = self._enter(0, 1, _IORING_ENTER_GETEVENTS | _IORING_ENTER_EXT_ARG, self._arg)
        else:
            res = self._enter(0, 1, _IORING_ENTER_GETEVENTS)
        if res < 0:
            e = ctypes.get_errno()
            if e not in (errno.EINTR, errno.ETIME):
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")

    def _enter(self, to_submit: int, min_complete: int, flags: int, arg: _GeteventsArg | None = None) -> int:
        """io_uring_enter(2) on this ring; -1 with errno set on failure.

        syscall() is variadic: each argument is given its C type, so that no
        register the kernel reads in full holds stray upper bits.
        """
        argp, size = (ctypes.byref(arg), ctypes.sizeof(arg)) if arg is not None else (None, 0)
        return int(
            syscall(
                _SYS_IO_URING_ENTER,
                ctypes.c_int(self.fd),
                ctypes.c_uint(to_submit),
                ctypes.c_uint(min_complete),
                ctypes.c_uint(flags),
                argp,
                ctypes.c_size_t(size),
            )
        )


_ring: Ring | None = None
_tried = False


def ring() -> Ring | None:
    """This process's ring, made on first use; None where io_uring cannot be used (see the module docstring)."""
    global _ring, _tried
    if not _tried:
        _tried = True
        if platform.machine() == "x86_64":
            try:
                _ring = Ring()
            except OSError:
                _ring = None
    return _ring
