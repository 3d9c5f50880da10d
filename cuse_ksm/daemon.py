"""The daemon: trio wiring of the CUSE channel, the device semantics and the engine.

One task reads requests from the channel (``/dev/cuse``, or any descriptor
that delivers one request per read, such as a SOCK_SEQPACKET socket in tests)
and answers every quick request inline: none of them waits on anything.
Under load, the ioctls already queued are answered as a batch (see
``serve``).  The
one slow request, CREATE_SHARED_MEMORY_AREA, must wait for its caller to run
the injected ``openat`` - whose FUSE_OPEN comes through this very loop - so it
runs in a task of its own and the loop keeps serving.  All tasks live in one
nursery; cancelling it (SIGINT, SIGTERM) ends every hand-out cleanly, and
closing the channel makes the kernel remove the device node.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from cuse_ksm import abi, protocol
from cuse_ksm.device import Done, Fetch, HandOut, KsmDevice, SmaFile
from cuse_ksm.host.ptrace import HandoutError, inject_open

SYS_IOCTL = 16  # x86_64

log = logging.getLogger("cuse_ksm")
# --trace lines go to their own logger, set to INFO by the CLI, so that they
# show whatever the daemon's --log-level.
trace_log = logging.getLogger("cuse_ksm.trace")

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

# inject_open(tid, path, flags, reply) -> fd in the caller
Injector = Callable[[int, bytes, int, Callable[[], None]], Awaitable[int]]


async def inject_into_ioctl(tid: int, path: bytes, flags: int, reply: Callable[[], None]) -> int:
    """The hand-out as the daemon uses it: only ever hijack the return of T's ioctl.

    The caller is held in its ioctl until we reply, so that is the syscall it
    returns from; checking it costs nothing and guards against ever taking
    over some other syscall of the thread.
    """
    return await inject_open(tid, path, flags, reply, expect_syscall=SYS_IOCTL)


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


@dataclass
class NodeAccess:
    """Owner group and mode to give the device node once it appears."""

    mode: int | None = None
    gid: int | None = None


class Server:
    """Serves one CUSE channel until cancelled or the kernel closes it."""

    def __init__(
        self,
        channel: int,
        device: KsmDevice,
        *,
        devname: str = "ksm",
        dev_dir: str = "/dev",
        access: NodeAccess | None = None,
        injector: Injector = inject_into_ioctl,
        trace: bool = False,
    ) -> None:
        self.channel = channel
        self.device = device
        self.devname = devname
        self.devpath = os.path.join(dev_dir, devname)
        self.access = access or NodeAccess()
        self._inject = injector
        # Checked before any tracing work: off, the ioctl path does nothing extra.
        self.trace = trace
        self.initialized = False  # CUSE_INIT answered
        self.handouts_in_flight = 0
        self._linger = select.poll()
        self._linger.register(channel, select.POLLIN)

    # -- the channel ------------------------------------------------------------

    def _send(self, reply: bytes) -> bool:
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
            self._send(reply)
        replies.clear()

    def _read(self) -> bytes | None:
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

    async def _read_waiting(self) -> bytes:
        """The next request, through trio's I/O wait: a checkpoint."""
        while True:
            await trio.lowlevel.wait_readable(self.channel)
            data = self._read()
            if data is not None:
                return data

    async def serve(self) -> None:
        """Answer requests until the kernel closes the channel.

        An ioctl that was already queued when we read it is answered in a
        batch: its reply waits in ``replies`` until the queue is empty (or
        READ_BURST requests were read), then the batch is written.  Each
        reply wakes its caller, and under load the caller often takes this
        CPU there and then.  Replying one request at a time, the daemon
        loses its CPU in the middle of its work and gets it back with cold
        caches; under QEMU's software emulation each switch also empties
        the TLB and the translated-code caches, which costs an interpreter
        far more than a small C server (docs/benchmarks.md).  Batched, it
        loses the CPU between writes, which need little of it.

        The replies are the same, in the order the ioctls came.  A caller
        early in a batch waits for the rest of the batch (at most READ_BURST
        requests' work) where it would otherwise have waited for the CPU
        that the callers answered before it took; measured under 64
        callers, p50 and p99 latency went down.  An ioctl read after a wait
        (the queue was empty: one caller, or a quiet moment) is answered at
        once, so a lone caller never waits on a batch.
        """
        replies: list[bytes] = []  # the batch: see above
        async with trio.open_nursery() as nursery:
            burst = 0  # requests read since the last checkpoint: see READ_BURST
            while True:
                data = None
                queued = False  # read without waiting: answer in the batch
                if burst < READ_BURST:
                    burst += 1
                    data = self._read()
                    queued = data is not None
                    if not queued:
                        self._send_all(replies)
                        if self._linger.poll(LINGER_MS):
                            data = self._read()
                if data is None:
                    self._send_all(replies)
                    burst = 0
                    data = await self._read_waiting()
                if not data:
                    log.info("CUSE channel closed by the kernel")
                    nursery.cancel_scope.cancel()
                    return
                try:
                    request = protocol.parse_request(data)
                except protocol.ProtocolError as e:
                    log.error("malformed request ignored: %s", e)
                    continue
                # Nearly every request of a running device is an ioctl: straight to it.
                if isinstance(request, protocol.Ioctl) and self.initialized:
                    reply = self._ioctl(request, nursery)
                    if reply is not None:  # None: a hand-out, whose task replies
                        if queued:
                            replies.append(reply)
                        else:
                            self._send(reply)
                else:
                    self._dispatch(request, nursery)

    # -- requests ---------------------------------------------------------------

    def _dispatch(self, req: protocol.Request, nursery: trio.Nursery) -> None:
        """Every request but an ioctl once the device is up (serve() takes those)."""
        unique = req.unique
        if isinstance(req, protocol.CuseInit):
            self._init(req, nursery)
        elif not self.initialized:
            self._send(protocol.reply_error(unique, errno.EIO))
        elif isinstance(req, protocol.Open):
            file = self.device.open(req.pid)
            self._send(protocol.reply_open(unique, file.fh))
            if isinstance(file, SmaFile):
                log.debug("tid %d opened SMA %d as fh %d", req.pid, file.sma.id, file.fh)
        elif isinstance(req, protocol.Release):
            self.device.release(req.fh)
            self._send(protocol.reply_empty(unique))
        elif isinstance(req, protocol.Flush):
            self._send(protocol.reply_empty(unique))
        elif isinstance(req, protocol.Interrupt):
            # Every request but CREATE is answered before the next read, so an
            # interrupt can only concern a hand-out, which runs to its end anyway
            # (its ptrace interrupt is what makes the kernel send this).
            log.debug("interrupt for request %d", req.target)
        elif isinstance(req, protocol.Destroy):
            self._send(protocol.reply_empty(unique))
        else:
            self._send(protocol.reply_error(unique, errno.ENOSYS))

    def _init(self, req: protocol.CuseInit, nursery: trio.Nursery) -> None:
        if req.major != protocol.FUSE_KERNEL_VERSION:
            log.error("kernel speaks FUSE %d.%d, we need 7.x", req.major, req.minor)
            self._send(protocol.reply_error(req.unique, errno.EPROTO))
            return
        minor = min(req.minor, protocol.FUSE_KERNEL_MINOR_VERSION)
        self._send(protocol.reply_cuse_init(req.unique, self.devname, minor=minor))
        self.initialized = True
        log.info("serving %s (FUSE 7.%d)", self.devpath, minor)
        if self.access.mode is not None or self.access.gid is not None:
            nursery.start_soon(self._set_node_access)

    async def _set_node_access(self) -> None:
        with trio.move_on_after(10):
            while not os.path.exists(self.devpath):
                await trio.sleep(0.01)
            if self.access.gid is not None:
                os.chown(self.devpath, -1, self.access.gid)
            if self.access.mode is not None:
                os.chmod(self.devpath, self.access.mode)
            return
        log.warning("%s did not appear within 10 s; mode and group not set", self.devpath)

    def _ioctl(self, req: protocol.Ioctl, nursery: trio.Nursery) -> bytes | None:
        """The reply to ``req``, for serve() to write; None if a hand-out task will reply."""
        started = time.perf_counter() if self.trace else 0.0
        outcome = self.device.ioctl(req.fh, req.cmd, req.pid, req.in_data, req.out_size, req.is_32bit)
        if isinstance(outcome, Done):
            if self.trace:
                self._trace(req, outcome.result, outcome.out, started)
            return protocol.reply_ioctl(req.unique, outcome.result, outcome.out)
        if isinstance(outcome, Fetch):
            # Unrestricted ioctl: the first call carries no data.  Name the
            # caller's bytes; the kernel copies them (or fails with EFAULT for a
            # bad pointer, before we hear of it) and calls again.
            return protocol.reply_ioctl_retry(req.unique, req.arg, outcome.copy_in, outcome.copy_out)
        nursery.start_soon(self._hand_out, req, outcome)
        return None

    async def _hand_out(self, req: protocol.Ioctl, hand_out: HandOut) -> None:
        """Put a new fd of the device, bound to the new SMA, into the calling thread."""
        tid, unique, sma = req.pid, req.unique, hand_out.sma
        replied = False

        def complete_syscall() -> None:
            nonlocal replied
            replied = True
            # A placeholder result: inject_open sets the caller's real return value.
            self._send(protocol.reply_ioctl(unique, 0))

        self.device.expect_open(tid, sma)
        self.handouts_in_flight += 1
        # One clock for both the debug line and --trace: this path is slow anyway.
        started = time.perf_counter()
        try:
            fd = await self._inject(tid, self.devpath.encode(), os.O_RDWR, complete_syscall)
        except HandoutError as e:
            if self.trace:
                self._trace(req, -e.errno, b"", started)
            name = errno.errorcode.get(e.errno, str(e.errno))
            # A caller killed mid-call is its own business; anything else is ours to explain.
            level = logging.INFO if e.errno == errno.ESRCH else logging.WARNING
            log.log(level, "%s from tid %d failed (%s): %s", abi.ioctl_name(req.cmd), tid, name, e)
            self.device.hand_out_failed(tid, sma)
            if not replied:
                self._send(protocol.reply_ioctl(unique, -e.errno))
        except BaseException:
            self.device.hand_out_failed(tid, sma)
            if not replied:
                self._send(protocol.reply_ioctl(unique, -errno.EINTR))
            if self.trace:
                self._trace(req, -errno.EINTR, b"", started)
            raise
        else:
            ms = (time.perf_counter() - started) * 1e3
            log.debug("SMA %d handed to tid %d as fd %d in %.1f ms", sma.id, tid, fd, ms)
            if self.trace:
                self._trace(req, fd, b"", started, sma_id=sma.id)
        finally:
            self.handouts_in_flight -= 1

    # -- --trace ------------------------------------------------------------------

    def _trace(self, req: protocol.Ioctl, result: int, out: bytes, started: float, *, sma_id: int = 0) -> None:
        """One line per completed ioctl, as strace would show it, from what the daemon saw.

        Only called when tracing is on.  The file is named from the daemon's
        side (the device or SMA n: the caller's fd number is not known here);
        the struct is the one copied in, or for GET_INFO_KTHREAD the one
        copied out.  A negative result is shown as ``-1 ERRNO (text)``; the
        positive quirks (+1, +22) as the plain numbers the caller receives.
        """
        ms = (time.perf_counter() - started) * 1e3
        file = self.device.files.get(req.fh)
        where = f"sma#{file.sma.id}" if isinstance(file, SmaFile) else self.devpath if file else f"fh#{req.fh}"
        arg = _describe_arg(req.cmd, req.in_data, out, req.arg)
        if result < 0:
            name = errno.errorcode.get(-result, str(-result))
            shown = f"-1 {name} ({os.strerror(-result)})"
        else:
            shown = str(result)
        extra = f" (sma#{sma_id})" if sma_id else ""
        bits = " [32-bit]" if req.is_32bit else ""
        trace_log.info(
            "trace: pid %d %s %s %s = %s%s <%.3f ms>%s",
            req.pid,
            where,
            abi.ioctl_name(req.cmd),
            arg,
            shown,
            extra,
            ms,
            bits,
        )


def _describe_arg(cmd: int, copied_in: bytes, copied_out: bytes, arg: int) -> str:
    """The ioctl's argument: the decoded struct when one crossed, else the raw pointer value."""
    try:
        if cmd == abi.KSM_GET_INFO_KTHREAD and len(copied_out) >= abi.STRUCT_SIZE:
            return abi.KthreadInfo.unpack(copied_out[: abi.STRUCT_SIZE]).describe()
        if len(copied_in) >= abi.STRUCT_SIZE:
            if cmd == abi.KSM_START_STOP_KTHREAD:
                return abi.KthreadInfo.unpack(copied_in[: abi.STRUCT_SIZE]).describe()
            if cmd == abi.KSM_REGISTER_MEMORY_REGION:
                return abi.MemoryRegion.unpack(copied_in[: abi.STRUCT_SIZE]).describe()
    except ValueError:
        pass
    return f"{arg:#x}" if arg else "0"
