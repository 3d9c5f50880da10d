"""The daemon's I/O: the CUSE channel's reads and writes, and the actions of its session.

One task reads requests from the channel (``/dev/cuse``, or any descriptor
that delivers one request per read, such as a SOCK_SEQPACKET socket in tests),
hands each to the session (:mod:`cuse_ksm.session`, which decides every
answer) and writes the reply at once: none of them waits on anything.  Under
load, the replies to requests already queued are written as a batch (see
``serve``).  The slow requests are those that borrow their caller:
CREATE_SHARED_MEMORY_AREA must wait for its caller to run the injected
``openat`` - whose FUSE_OPEN comes through this very loop - and, with
``--merge kernel``, REGISTER and REMOVE for its madvise.  So each
:class:`~cuse_ksm.session.Borrow` runs in a task of its own and the loop keeps
serving.  All tasks live in one nursery; cancelling it (SIGINT, SIGTERM) ends
every borrow cleanly, and closing the channel makes the kernel remove the
device node.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import subprocess

import trio

from cuse_ksm import protocol
from cuse_ksm.host.syscall import Borrower, BorrowError
from cuse_ksm.session import Borrow, CuseSession, Output, SetNodeAccess

log = logging.getLogger(__name__)

READ_BUFFER = 64 * 1024
# Under load the next request is usually queued already: read it without
# going through trio's I/O wait (an epoll round and a trip through the
# scheduler, the largest cost per request), but go through the wait - which
# is also a checkpoint, letting the scanner and hand-outs run - at least once
# every READ_BURST requests.  It also bounds a batch of replies (serve()).
READ_BURST = 64
# A client calling one ioctl after another sends its next request a moment
# after our reply.  Waiting for it through trio costs two epoll_ctl calls, an
# epoll_wait and a pass through the scheduler; instead the loop lingers in
# poll() on the channel, in the kernel and without spinning, for up to
# LINGER_MS.  When the client has gone quiet, that is the longest the loop
# (the scanner, hand-outs) is held up before it parks in trio's wait.
LINGER_MS = 1


class NoCuseError(RuntimeError):
    """This kernel cannot create character devices from user space."""


def open_cuse_channel(path: str = "/dev/cuse") -> int:
    """Open the CUSE channel, loading the ``cuse`` module first if needed."""
    if not os.path.exists(path):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["modprobe", "cuse"], check=False, capture_output=True, timeout=30)
    if not os.path.exists(path):
        raise NoCuseError(
            f"{path} does not exist and 'modprobe cuse' did not create it: this kernel has no "
            "CUSE (CONFIG_CUSE). Run the daemon in the VM instead: 'make demo' boots one."
        )
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


class Server:
    """Serves one CUSE channel for ``session`` until cancelled or the kernel closes it.

    ``borrower`` runs the session's :class:`~cuse_ksm.session.Borrow`
    actions (in the daemon, :func:`cuse_ksm.host.ptrace.borrow_from_ioctl`).
    """

    def __init__(self, channel: int, session: CuseSession, borrower: Borrower) -> None:
        self.channel = channel
        self.session = session
        self._borrower = borrower
        self._linger = select.poll()
        self._linger.register(channel, select.POLLIN)

    # -- the channel ------------------------------------------------------------

    def waiting(self) -> bool:
        """A request is queued on the channel (one poll(2), ~1 us): the scanner's cue to step aside."""
        return any(events & select.POLLIN for _, events in self._linger.poll(0))

    def send(self, reply: bytes) -> bool:
        """Write one reply; False if the kernel no longer wants it."""
        try:
            os.write(self.channel, reply)
        except OSError as e:
            if e.errno == errno.ENOENT:
                # The request was aborted: its caller was killed or interrupted.
                log.debug("reply to request %d dropped: its caller is gone", protocol.parse_reply_header(reply)[2])
                return False
            if e.errno == errno.ENODEV:
                return False
            raise
        return True

    def _send_all(self, replies: list[bytes]) -> None:
        """Write a batch of replies, in order, and empty the list."""
        for reply in replies:
            self.send(reply)
        replies.clear()

    def read(self) -> bytes | None:
        """One request; b"" once the kernel closed the channel; None if nothing is queued.

        Nothing queued includes a request that vanished before we read it
        (its caller was interrupted: ENOENT) and an interrupted read.
        """
        try:
            return os.read(self.channel, READ_BUFFER)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            if e.errno == errno.ENODEV:
                return b""  # connection aborted
            raise

    async def read_waiting(self) -> bytes:
        """The next request, through trio's I/O wait: a checkpoint."""
        while True:
            await trio.lowlevel.wait_readable(self.channel)
            data = self.read()
            if data is not None:
                return data

    async def serve(self) -> None:
        """Answer requests until the kernel closes the channel.

        A request that was already queued when we read it is answered in a
        batch: its reply waits in ``replies`` until the queue is empty (or
        READ_BURST requests were read), then the batch is written.  Each
        reply wakes its caller, and under load the caller often takes this
        CPU there and then.  Replying one request at a time, the daemon
        loses its CPU in the middle of its work and gets it back with cold
        caches; under QEMU's software emulation each switch also empties
        the TLB and the translated-code caches, which costs an interpreter
        far more than a small C server (docs/benchmarks.md).  Batched, it
        loses the CPU between writes, which need little of it.

        The replies are the same, in the order the requests came.  A caller
        early in a batch waits for the rest of the batch (at most READ_BURST
        requests' work) where it would otherwise have waited for the CPU
        that the callers answered before it took; measured under 64
        callers, p50 and p99 latency went down.  A request read after a wait
        (the queue was empty: one caller, or a quiet moment) is answered at
        once, so a lone caller never waits on a batch.  Outputs with actions
        (a hand-out, the node's access) are carried out at once, their
        replies with them.
        """
        replies: list[bytes] = []  # the batch: see above
        receive = self.session.receive
        async with trio.open_nursery() as nursery:
            burst = 0  # requests read since the last checkpoint: see READ_BURST
            while True:
                data = None
                queued = False  # read without waiting: answer in the batch
                if burst < READ_BURST:
                    burst += 1
                    data = self.read()
                    queued = data is not None
                    if not queued:
                        self._send_all(replies)
                        if self._linger.poll(LINGER_MS):
                            data = self.read()
                if data is None:
                    self._send_all(replies)
                    burst = 0
                    data = await self.read_waiting()
                if not data:
                    log.info("CUSE channel closed by the kernel")
                    nursery.cancel_scope.cancel()
                    return
                try:
                    request = protocol.parse_request(data)
                except protocol.ProtocolError as e:
                    log.error("malformed request ignored: %s", e)
                    continue
                out = receive(request)
                if type(out) is bytes:
                    if queued:
                        replies.append(out)
                    else:
                        self.send(out)
                else:
                    self.act(out, nursery)

    # -- the session's actions ------------------------------------------------------

    def act(self, out: Output, nursery: trio.Nursery) -> None:
        """Carry out one output of the session: write its replies and start its actions, in order."""
        if isinstance(out, bytes):
            self.send(out)
            return
        for item in out:
            if isinstance(item, bytes):
                self.send(item)
            elif isinstance(item, Borrow):
                nursery.start_soon(self._lend, item)
            else:
                nursery.start_soon(self._set_node_access, item)

    async def _lend(self, borrow: Borrow) -> None:
        """Lend the thread blocked in ``borrow.request`` to the borrower, and tell the session how it went."""
        session = self.session

        def complete_ioctl() -> None:
            self.send(session.complete_ioctl(borrow))

        try:
            results = await self._borrower(borrow.tid, borrow.errand, complete_ioctl)
        except BorrowError as e:
            reply = session.borrow_failed(borrow, e.errno, str(e))
        except Exception as e:
            # A bug of ours, not the caller's doing: the caller's ioctl fails
            # with EIO and the daemon serves on (one ioctl must never take it
            # down).  Cancellation (a BaseException) still ends the task below.
            log.exception("borrowing tid %d for %s failed unexpectedly", borrow.tid, borrow.errand)
            reply = session.borrow_failed(borrow, errno.EIO, f"internal error: {e!r}")
        except BaseException:
            reply = session.borrow_cancelled(borrow)
            if reply is not None:
                self.send(reply)
            raise
        else:
            session.borrowed(borrow, results)
            return
        if reply is not None:
            self.send(reply)

    async def _set_node_access(self, action: SetNodeAccess) -> None:
        path, access = action.path, action.access
        with trio.move_on_after(10):
            while not os.path.exists(path):
                await trio.sleep(0.01)
            if access.gid is not None:
                os.chown(path, -1, access.gid)
            if access.mode is not None:
                os.chmod(path, access.mode)
            return
        log.warning("%s did not appear within 10 s; mode and group not set", path)
