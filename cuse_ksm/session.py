"""The CUSE session, sans I/O: parsed requests in, replies and actions out.

Modelled on h11's ``Connection``: this object holds the protocol state of one
CUSE channel and decides every answer, but it never reads, writes, sleeps or
spawns.  Its owner (:class:`cuse_ksm.daemon.Server`) moves the bytes::

    out = session.receive(protocol.parse_request(data))

``out`` is either the reply to write (``bytes``: nearly every request, every
quick ioctl among them), or a tuple of outputs to carry out in order: replies
(``bytes``) and actions, which need the world outside the session:

* :class:`Borrow`: borrow the calling thread for system calls of its own
  (the SMA or scan fd hand-out: the caller opens the device itself; in kernel mode,
  REGISTER and REMOVE: the caller madvises its own memory).  The owner runs
  it with a :data:`~cuse_ksm.host.syscall.Borrower` and reports back how it
  went (:meth:`CuseSession.complete_ioctl`, :meth:`~CuseSession.borrowed`,
  :meth:`~CuseSession.borrow_failed`, :meth:`~CuseSession.borrow_cancelled`).
* :class:`SetNodeAccess`: give the device node its group and mode once the
  kernel has created it.

The session ends when the kernel closes the channel, which only the owner
sees; no request asks us to stop (CUSE sends no FUSE_DESTROY, and a refused
CUSE_INIT makes the kernel abort the channel itself).

What the session owns: whether CUSE_INIT was answered (everything before it
fails with EIO), the FUSE version agreed, the answers to OPEN, RELEASE,
FLUSH, DESTROY and INTERRUPT, ENOSYS for the rest, the ioctls (carried out by
:class:`~cuse_ksm.device.KsmDevice`) with the RETRY a command that needs the
caller's memory asks for, and the life of every hand-out, whose state is kept
in one place: its :class:`Borrow`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from dataclasses import dataclass

from cuse_ksm import abi, protocol, trace
from cuse_ksm.device import Advise, Done, Fetch, HandOut, KsmDevice, OpenFile, Scan
from cuse_ksm.engine import Sma
from cuse_ksm.host.syscall import MADV_MERGEABLE, Errand, madvise, openat

log = logging.getLogger(__name__)

# What each borrow is for, as error messages say it ("...; cannot <purpose>").
HAND_OUT = "hand out the SMA fd"
HAND_OUT_SCAN = "hand out the scan fd"
MERGE = "have the host kernel merge the registered region"
UNMERGE = "stop the host kernel merging the removed regions"


@dataclass(frozen=True)
class NodeAccess:
    """Owner group and mode to give the device node once it appears (None: leave the kernel's)."""

    mode: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class SetNodeAccess:
    """Action: once the device node ``path`` appears, give it ``access``."""

    path: str
    access: NodeAccess


@dataclass(eq=False)
class Borrow:
    """Action: borrow the thread blocked in ``request`` for ``errand``; and the life of that borrow.

    ``outcome`` is what the device asked for: a :class:`HandOut` (the
    caller of CREATE_SHARED_MEMORY_AREA or KSM_CREATE_SCAN opens the device
    itself, and the session binds that open to the new SMA or scan) or, in kernel mode, an
    :class:`Advise` (the caller of REGISTER or REMOVE madvises its own
    memory; its ioctl returns the 2009 result whatever happens).  Running
    it, the owner calls :meth:`CuseSession.complete_ioctl` when the borrower
    asks to complete the thread's ioctl, then exactly one of
    :meth:`~CuseSession.borrowed`, :meth:`~CuseSession.borrow_failed` or
    :meth:`~CuseSession.borrow_cancelled`, and writes what they return.
    """

    request: protocol.Ioctl
    errand: Errand
    outcome: HandOut | Advise
    started: float  # time.perf_counter() when the request came: the debug line and --trace
    replied: bool = False  # the thread's ioctl was completed: it is never answered again
    opened: OpenFile | None = None  # the file of the thread's injected open, once it came

    @property
    def tid(self) -> int:
        return self.request.pid


Action = Borrow | SetNodeAccess
Output = bytes | tuple[bytes | Action, ...]


class CuseSession:
    """The protocol state of one CUSE channel serving one :class:`~cuse_ksm.device.KsmDevice`."""

    def __init__(
        self,
        device: KsmDevice,
        *,
        devname: str = "ksm",
        dev_dir: str = "/dev",
        access: NodeAccess | None = None,
        trace: bool = False,
    ) -> None:
        self.device = device
        self.devname = devname
        self.devpath = os.path.join(dev_dir, devname)
        self.access = access or NodeAccess()
        # Checked before any tracing work: off, the ioctl path does nothing extra.
        self.tracing = trace
        self.initialized = False  # CUSE_INIT answered
        # The borrows in flight, by the thread borrowed.  A thread is held in
        # its ioctl until its borrow ends, so it has at most one.
        self.borrows: dict[int, Borrow] = {}
        path = os.fsencode(self.devpath)
        self._hand_out_errands = {
            kind: Errand((openat(path, os.O_RDWR, purpose=purpose),))
            for kind, purpose in ((Sma, HAND_OUT), (Scan, HAND_OUT_SCAN))
        }

    def receive(self, req: protocol.Request) -> Output:
        """What to do about ``req``: the reply to write, or replies and actions in order (module docstring)."""
        # Nearly every request of a running device is an ioctl: straight to it.
        if isinstance(req, protocol.Ioctl) and self.initialized:
            started = time.perf_counter() if self.tracing else 0.0
            outcome = self.device.ioctl(req.fh, req.cmd, req.pid, req.in_data, req.out_size, req.is_32bit)
            if isinstance(outcome, Done):
                if self.tracing:
                    self._trace(req, outcome.result, outcome.out, started)
                if outcome.note:
                    self._note(req, outcome.note)
                return protocol.reply_ioctl(req.unique, outcome.result, outcome.out)
            if isinstance(outcome, Fetch):
                # Unrestricted ioctl: the first call carries no data.  Name the
                # caller's bytes; the kernel copies them (or fails with EFAULT for a
                # bad pointer, before we hear of it) and calls again.
                return protocol.reply_ioctl_retry(req.unique, req.arg, outcome.copy_in, outcome.copy_out)
            if isinstance(outcome, Advise) and outcome.note:
                self._note(req, outcome.note)
            return (self._borrow(req, outcome),)
        return self._receive_other(req)

    @staticmethod
    def _note(req: protocol.Ioctl, note: str) -> None:
        """One warning line about a call that succeeded, naming the call and its caller as the madvise notes do."""
        log.warning("%s from tid %d: %s", abi.ioctl_name(req.cmd), req.pid, note)

    def _receive_other(self, req: protocol.Request) -> Output:
        """Every request but an ioctl once the device is up."""
        unique = req.unique
        if isinstance(req, protocol.CuseInit):
            return self._init(req)
        if not self.initialized:
            return protocol.reply_error(unique, errno.EIO)
        if isinstance(req, protocol.Open):
            return protocol.reply_open(unique, self._open(req.pid).fh)
        if isinstance(req, protocol.Release):
            self.device.release(req.fh)
            return protocol.reply_empty(unique)
        if isinstance(req, protocol.Flush | protocol.Destroy):
            return protocol.reply_empty(unique)
        if isinstance(req, protocol.Interrupt):
            # Every request but CREATE is answered before the next read, so an
            # interrupt can only concern a hand-out, which runs to its end anyway
            # (its ptrace interrupt is what makes the kernel send this).  Never answered.
            log.debug("interrupt for request %d", req.target)
            return ()
        return protocol.reply_error(unique, errno.ENOSYS)

    def _init(self, req: protocol.CuseInit) -> Output:
        if req.major != protocol.FUSE_KERNEL_VERSION:
            log.error("kernel speaks FUSE %d.%d, we need 7.x", req.major, req.minor)
            return protocol.reply_error(req.unique, errno.EPROTO)
        minor = min(req.minor, protocol.FUSE_KERNEL_MINOR_VERSION)
        reply = protocol.reply_cuse_init(req.unique, self.devname, minor=minor)
        self.initialized = True
        log.info("serving %s (FUSE 7.%d)", self.devpath, minor)
        if self.access.mode is None and self.access.gid is None:
            return reply
        return (reply, SetNodeAccess(self.devpath, self.access))

    def _open(self, tid: int) -> OpenFile:
        borrow = self.borrows.get(tid)
        if borrow is None or borrow.opened is not None or not isinstance(borrow.outcome, HandOut):
            return self.device.open()
        # The thread is held by its hand-out, so this is the open we made it do.
        hand_out = borrow.outcome
        borrow.opened = file = self.device.open(handed=hand_out.target)
        log.debug("tid %d opened %s as fh %d", tid, hand_out.label, file.fh)
        return file

    def _trace(self, req: protocol.Ioctl, result: int, out: bytes, started: float, *, handed: str = "") -> None:
        """The --trace line of a completed ioctl, naming its file as the daemon knows it."""
        trace.ioctl(req, self.device.files.get(req.fh), self.devpath, result, out, started, handed=handed)

    # -- borrows: the hand-out, and kernel mode's madvise ----------------------------

    def _borrow(self, req: protocol.Ioctl, outcome: HandOut | Advise) -> Borrow:
        """Borrow the caller for what the device asked: open the device (bound to the new SMA or scan), or madvise."""
        if isinstance(outcome, HandOut):
            errand = self._hand_out_errands[type(outcome.target)]
        else:
            purpose = MERGE if outcome.advice == MADV_MERGEABLE else UNMERGE
            calls = tuple(madvise(addr, length, outcome.advice, purpose=purpose) for addr, length in outcome.ranges)
            # No time limit: a madvise ends (unmerging a large region can take
            # minutes), a SIGKILL of the caller ends it sooner, and the daemon
            # serves on meanwhile.
            errand = Errand(calls, returns=outcome.result, timeout=math.inf)
        borrow = Borrow(req, errand, outcome, time.perf_counter())
        self.borrows[req.pid] = borrow
        return borrow

    def complete_ioctl(self, borrow: Borrow) -> bytes:
        """The reply that completes the borrowed thread's ioctl, to write when the borrower asks.

        A placeholder result: the borrower sets the thread's real return value.
        """
        borrow.replied = True
        return protocol.reply_ioctl(borrow.request.unique, 0)

    def borrowed(self, borrow: Borrow, results: tuple[int, ...]) -> None:
        """The borrowed calls returned ``results`` (the hand-out: the fd the caller got): the borrow is done."""
        self._end(borrow)
        req, outcome = borrow.request, borrow.outcome
        if isinstance(outcome, Advise):
            self._advised(borrow, outcome, results)
            if self.tracing:
                self._trace(req, outcome.result, b"", borrow.started)
            return
        (fd,) = results
        ms = (time.perf_counter() - borrow.started) * 1e3
        log.debug("%s handed to tid %d as fd %d in %.1f ms", outcome.label, req.pid, fd, ms)
        if self.tracing:
            self._trace(req, fd, b"", borrow.started, handed=outcome.label)

    def _advised(
        self, borrow: Borrow, advise: Advise, results: tuple[int, ...], why: str = "", level: int = logging.WARNING
    ) -> None:
        """Record what the caller's madvise calls did, and say what went wrong, one line each."""
        req = borrow.request
        for note in self.device.advised(advise, results):
            log.log(level, "%s from tid %d: %s%s", abi.ioctl_name(req.cmd), req.pid, note, f": {why}" if why else "")
        if log.isEnabledFor(logging.DEBUG):
            ms = (time.perf_counter() - borrow.started) * 1e3
            log.debug("tid %d ran %s in %.1f ms: %s", req.pid, borrow.errand, ms, results)

    def borrow_failed(self, borrow: Borrow, err: int, why: str) -> bytes | None:
        """The borrower failed with ``err`` (positive) for the reason ``why``.

        A hand-out's SMA ends, and its caller's ioctl fails with ``err``; a
        madvise is recorded as failed, and its caller's ioctl returns what
        the 2009 driver returned.  Returns the reply to write, or None if
        the ioctl was completed already (the borrower then set its result).
        """
        return self._fail(borrow, err, why)

    def borrow_cancelled(self, borrow: Borrow) -> bytes | None:
        """The borrow was cut short (the daemon is stopping): as :meth:`borrow_failed` with EINTR, not logged."""
        return self._fail(borrow, errno.EINTR, None)

    def _fail(self, borrow: Borrow, err: int, why: str | None) -> bytes | None:
        self._end(borrow)
        req, outcome = borrow.request, borrow.outcome
        if isinstance(outcome, Advise):
            # Nothing the borrower did changes the 2009 result; the
            # madvise is failed for every range (none of it is known to have run).
            # A caller killed mid-call is its own business (as for the hand-out).
            level = logging.INFO if err in (errno.ESRCH, errno.EINTR) else logging.WARNING
            self._advised(borrow, outcome, (-err,) * len(outcome.ranges), why or "the daemon is stopping", level)
            if self.tracing:
                self._trace(req, outcome.result, b"", borrow.started)
            return None if borrow.replied else protocol.reply_ioctl(req.unique, outcome.result)
        if self.tracing:
            self._trace(req, -err, b"", borrow.started)
        if why is not None:
            name = errno.errorcode.get(err, str(err))
            # A caller killed mid-call is its own business; anything else is ours to explain.
            level = logging.INFO if err == errno.ESRCH else logging.WARNING
            log.log(level, "%s from tid %d failed (%s): %s", abi.ioctl_name(req.cmd), req.pid, name, why)
        self.device.hand_out_failed(outcome.target)
        return None if borrow.replied else protocol.reply_ioctl(req.unique, -err)

    def _end(self, borrow: Borrow) -> None:
        if self.borrows.get(borrow.tid) is borrow:
            del self.borrows[borrow.tid]
