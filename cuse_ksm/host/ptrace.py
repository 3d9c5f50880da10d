"""Borrow the thread that called our ioctl for one system call of its own.

The 2009 /dev/ksm driver created a shared memory area (SMA) with
anon_inode_getfd() from inside the caller's KSM_CREATE_SHARED_MEMORY_AREA
ioctl, so the caller simply saw its ioctl return a new fd.  A CUSE server
cannot do that: its answer to an ioctl is an integer and a byte buffer, and
nothing carries a file descriptor from the daemon into the caller.  So we make
the caller open the fd *itself*, on its way back from the ioctl, by borrowing
the calling thread T for one extra system call with ptrace(2).

The mechanism is not specific to openat.  What T is made to run is an
:class:`~cuse_ksm.host.syscall.Errand`: one or more
:class:`~cuse_ksm.host.syscall.Syscall` (a number, up to six arguments, and
bytes to place on T's stack for the arguments that point at memory, such as
openat's path), and what T's own syscall returns afterwards.  Anything only
the caller can do for itself, such as marking its own memory mergeable with
madvise() (``--merge kernel``), is one more such description; the steps
below are the same for every call, and an errand of several calls repeats
steps 7 and 8 (rewind, set up the next call) before the final restore.

The sequence, and why each step is safe:

1. PTRACE_SEIZE(T, PTRACE_O_TRACESYSGOOD).  Unlike PTRACE_ATTACH this sends no
   SIGSTOP, so nothing observable happens to T or to its process: no
   group-stop, no SIGCHLD to its parent.  TRACESYSGOOD makes syscall-stops
   report SIGTRAP|0x80, so they cannot be mistaken for a real SIGTRAP.  We do
   not set PTRACE_O_EXITKILL: if the daemon dies mid-way, the kernel detaches
   and T carries on; killing the caller would be far worse.

2. PTRACE_INTERRUPT(T), *before* the ioctl is answered.  This only queues a
   trap (JOBCTL_TRAP_STOP) and wakes interruptible sleeps.  A task handles its
   pending traps in get_signal() on the way back to user space, before it
   dequeues any signal, so the first thing T does after its syscall completes
   is stop for us (PTRACE_EVENT_STOP), at a point where it has not executed a
   single user instruction yet.  Had we answered first, T could already be
   running user code, or be blocked in some *other* syscall that we would then
   hijack.  Two ways T may leave the syscall:
     - CUSE: the wake-up makes FUSE queue a FUSE_INTERRUPT for the ioctl and
       then wait *killably* for our answer, so the ioctl completes only when
       reply() answers it (the daemon must ignore that FUSE_INTERRUPT);
     - an interruptible sleep (the pipe read of the tests) returns at once
       with -ERESTARTSYS.
   Both end in the same stop; we overwrite rax either way.

3. reply() completes T's pending syscall (with a placeholder: the result T
   finally sees is always written by us, see borrow()).

4. At the first stop, T is in the kernel, between its syscall and user mode,
   with its user registers saved in pt_regs.  We check that it really is
   returning from a syscall (orig_rax >= 0) entered with the 64-bit `syscall`
   instruction (cs is the 64-bit user segment and the two bytes before rip
   are 0f 05): we are going to execute those two bytes again, and `int 0x80`
   or a compat task would take the 32-bit syscall table with other argument
   registers.

5. We save T's registers and signal mask, then block every signal in T
   (PTRACE_SETSIGMASK).  While blocked, a signal sent to T stays queued with
   its full siginfo and is delivered normally once we restore the mask:
   nothing is lost, reordered or run with our half-built register state.
   Only SIGKILL and SIGSTOP cannot be blocked; see 8.

6. We write the call's stack bytes (openat: the path, NUL terminated) into
   T's stack, below the 128-byte red zone plus a margin.  Memory below the
   red zone belongs to nobody: the ABI lets the kernel clobber it at any time
   (signal frames), so T's code cannot keep live data there, and T cannot run
   meanwhile.  We still save the bytes and put them back, so even a program
   that broke that rule sees no change.

7. We set rip -= 2 (back onto the syscall instruction), rax = the call's
   number, its arguments in rdi, rsi, rdx, r10, r8, r9 (openat: AT_FDCWD,
   the path's address on the stack, flags, 0), orig_rax = -1, and resume
   with PTRACE_SYSCALL.  orig_rax = -1 and an rax that is no -ERESTART* code
   keep the kernel's syscall-restart logic, which runs right after this
   stop, from rewinding rip a second time.  T returns to user mode for
   exactly one instruction, our `syscall`, and stops at its entry; we resume
   it again and it stops at the exit.  The call is T's own: it runs with T's
   credentials, cwd, root, mount namespace, LSM context, seccomp filters and
   RLIMIT_NOFILE, on T's memory, exactly as if T had made it itself.  It may
   block (an open of our own CUSE device waits for *this* daemon to answer
   the open), which is why every wait here is a trio sleep, never a blocking
   waitpid(): the daemon keeps serving requests meanwhile.

8. At the exit stop rax is the call's result (openat: the fd, or -errno).
   We restore the saved registers except rax = that result, the stack bytes
   and the signal mask, and PTRACE_DETACH.  T returns from its original
   syscall with that result (the new fd, or the error) and nothing else
   changed: all registers the syscall ABI preserves hold their old values,
   rcx/r11 hold what the original `syscall` left there.  Signals that still reached a signal-delivery-stop (SIGSTOP,
   or one dequeued before the mask was in place) were suppressed there and
   are queued again to T just before the detach: with rt_tgsigqueueinfo()
   and the original siginfo when the kernel allows it (si_code < 0, e.g.
   sigqueue() or timers), else with tgkill(), which keeps the signal but
   makes the daemon its sender.

Stops we may meet on the way, and what we do:
 - PTRACE_EVENT_STOP with SIGTRAP: our INTERRUPT trap or a JOBCTL_TRAP_NOTIFY
   (group-stop state changed).  T sits in get_signal(); resume it.
 - PTRACE_EVENT_STOP with a stop signal: a group-stop (someone stopped T's
   process).  We resume T anyway, which under PTRACE_SEIZE lets it run
   despite the group-stop; it only executes our injected syscall.  On
   PTRACE_DETACH the kernel re-arms the pending group-stop for T (see
   __ptrace_unlink()), so T stops with its process right after returning
   from the ioctl: the stop is delayed by one syscall, not lost.  We
   deliberately do not use PTRACE_LISTEN, which would hold the borrowed call
   (and T's ioctl) until someone sends SIGCONT.
 - signal-delivery-stop: suppress and remember the signal (see 8).
 - exit (WIFEXITED/WIFSIGNALED): T is gone.  waitpid() has reaped it, which
   we must do: a dead tracee stays a zombie until its tracer waits for it,
   and keeps its process from being reaped by the real parent.

Waiting: ptrace stops are only reported through the wait family, which
cannot be multiplexed with trio.  pidfds only report exit, SIGCHLD would need
a process-wide handler or a signalfd with SIGCHLD blocked in every thread.
So we poll waitpid(tid, WNOHANG | __WALL) with a backoff of trio sleeps
(50 us doubling to 2 ms; trio's epoll timeouts have 1 ms granularity, so the
first real sleep is about 1 ms).  A borrowed call takes three stops, a few
ms in all.  The tracer is the OS thread that did PTRACE_SEIZE and only it
may issue further ptrace requests, so everything here runs in the trio
thread: never call this through trio.to_thread.  And nothing else in the daemon may call
waitpid(-1)/os.wait(): that would steal our tracee's stop reports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import logging
import math
import os
import signal
import struct
from collections.abc import Callable
from errno import (
    EBUSY,
    ECANCELED,
    EFAULT,
    EINVAL,
    EIO,
    ENOEXEC,
    ENOSYS,
    EPERM,
    ESRCH,
    ETIMEDOUT,
)
from typing import Final, NoReturn

import trio

from cuse_ksm.host import procfs
from cuse_ksm.host.libc import Iovec, libc, process_vm_readv, process_vm_writev
from cuse_ksm.host.syscall import NR_IOCTL, BorrowError, Errand, Syscall

__all__ = ["borrow", "borrow_from_ioctl"]

log = logging.getLogger(__name__)

# ptrace requests and options (<linux/ptrace.h>, <asm/ptrace-abi.h>).
PTRACE_PEEKDATA: Final = 2
PTRACE_POKEDATA: Final = 5
PTRACE_GETREGS: Final = 12
PTRACE_SETREGS: Final = 13
PTRACE_DETACH: Final = 17
PTRACE_SYSCALL: Final = 24
PTRACE_GETSIGINFO: Final = 0x4202
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_GETSIGMASK: Final = 0x420A
PTRACE_SETSIGMASK: Final = 0x420B
PTRACE_O_TRACESYSGOOD: Final = 0x01
PTRACE_EVENT_STOP: Final = 128

WALL: Final = 0x40000000  # __WALL: wait for threads (clone children) too

# x86_64 system call numbers and ABI facts (those of the borrowed calls: host.syscall).
NR_TGKILL: Final = 234
NR_RT_TGSIGQUEUEINFO: Final = 297
USER64_CS: Final = 0x33  # __USER_CS: 64-bit user code segment
SYSCALL_INSN: Final = b"\x0f\x05"
RED_ZONE: Final = 128
STACK_GAP: Final = 256  # extra distance from the red zone, cheap insurance
STACK_MAX: Final = 4096  # the most bytes a call may place on T's stack
SIGSET_SIZE: Final = 8  # the kernel's sigset_t on x86_64
SIGINFO_SIZE: Final = 128
SI_TKILL: Final = -6
ALL_SIGNALS: Final = (1 << 64) - 1  # the kernel drops SIGKILL and SIGSTOP

# Kernel-internal "restart me" results a syscall-exit-stop can show in rax.
ERESTARTSYS: Final = 512
ERESTARTNOINTR: Final = 513
ERESTARTNOHAND: Final = 514
ERESTART_RESTARTBLOCK: Final = 516
RESTART_CODES: Final = frozenset(-e for e in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK))

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_GRACE: Final = 1.0
MIN_POLL_DELAY: Final = 50e-6
MAX_POLL_DELAY: Final = 2e-3
ABANDONED_POLL_DELAY: Final = 50e-3
REAP_TIMEOUT: Final = 5.0

_U64: Final = (1 << 64) - 1

_REG_NAMES: Final = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
    "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip


class UserRegs(ctypes.Structure):
    """struct user_regs_struct of <sys/user.h> on x86_64: 27 u64, 216 bytes."""

    _fields_ = [(name, ctypes.c_uint64) for name in _REG_NAMES]

    rax: int
    rdi: int
    rsi: int
    rdx: int
    r10: int
    r8: int
    r9: int
    orig_rax: int
    rip: int
    cs: int
    rsp: int


assert ctypes.sizeof(UserRegs) == 216

# Where the x86_64 syscall ABI takes arguments one to six.
_ARG_REGS: Final = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


# ptrace() and syscall() are variadic in glibc; on x86_64 integer and pointer
# arguments travel in the same registers either way, so fixed argtypes are fine.
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
libc.syscall.restype = ctypes.c_long


class _Deadline(Exception):
    """The current wait ran out of time."""


class _Gone(Exception):
    """The thread died, or is no longer our tracee."""

    def __init__(self, how: str, *, reaped: bool) -> None:
        super().__init__(how)
        self.how = how
        self.reaped = reaped


class _Phase(enum.Enum):
    FIRST = "waiting for it to leave its system call"
    ENTRY = "waiting for the injected {call} to start"
    EXIT = "waiting for the injected {call} to finish"


def _ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    ret: int = libc.ptrace(request, tid, addr, data)
    if ret == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, os.strerror(err))
    return ret


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _vm_rw(fn: Callable[..., int], tid: int, addr: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    local = Iovec(ctypes.addressof(buf), len(buf))
    remote = Iovec(addr, len(buf))
    ctypes.set_errno(0)
    return int(fn(tid, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0))


def _read_mem(tid: int, addr: int, size: int) -> bytes:
    buf = (ctypes.c_char * size)()
    if _vm_rw(process_vm_readv, tid, addr, buf) == size:
        return bytes(buf)
    # process_vm_readv() honours page protections; PTRACE_PEEKDATA uses
    # FOLL_FORCE, so it also reads e.g. execute-only text.
    start = addr & ~7
    words = b"".join(struct.pack("<Q", _ptrace(PTRACE_PEEKDATA, tid, a) & _U64) for a in range(start, addr + size, 8))
    return words[addr - start : addr - start + size]


def _write_mem(tid: int, addr: int, data: bytes) -> None:
    buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
    if _vm_rw(process_vm_writev, tid, addr, buf) == len(data):
        return
    start = addr & ~7
    end = (addr + len(data) + 7) & ~7
    image = bytearray(_read_mem(tid, start, end - start))
    image[addr - start : addr - start + len(data)] = data
    for off in range(0, len(image), 8):
        word = struct.unpack_from("<q", image, off)[0]
        _ptrace(PTRACE_POKEDATA, tid, start + off, word & _U64)


class _Borrow:
    """One borrowed call: the state machine driven by T's ptrace stops."""

    def __init__(
        self,
        tid: int,
        errand: Errand,
        reply: Callable[[], None],
        expect_syscall: int | None,
        timeout: float,
        grace: float,
    ) -> None:
        self.tid = tid
        self.errand = errand
        self.index = 0  # the call of the errand under way
        self.results: list[int] = []  # of the calls done
        # Where each call's stack bytes start within the errand's.
        self.offsets = [sum(len(c.stack) for c in errand.calls[:i]) for i in range(len(errand.calls))]
        self.reply = reply
        self.expect_syscall = expect_syscall
        self.timeout = timeout
        self.grace = grace
        self.tgid = 0
        self.phase = _Phase.FIRST
        self.attached = False
        self.stopped = False  # T is in a ptrace-stop we have not resumed
        self.last_stop = ""  # "syscall", "event" or "signal"
        self.saved: UserRegs | None = None
        self.saved_mask: int | None = None
        self.stack_addr = 0
        self.stack_saved: bytes | None = None
        self.signals: list[bytes] = []  # siginfo of suppressed signals
        self.abort_errno = 0  # nonzero: get T out as soon as it stops
        self.abort_reason = ""
        self.max_delay = MAX_POLL_DELAY

    # -- plumbing -----------------------------------------------------------

    @property
    def call(self) -> Syscall:
        """The call of the errand under way (the one error messages speak of)."""
        return self.errand.calls[self.index]

    def _error(self, err: int, message: str) -> BorrowError:
        return BorrowError(err, message)

    def _phase(self) -> str:
        return self.phase.value.format(call=self.call.name)

    def _pt(self, request: int, addr: int = 0, data: int = 0) -> int:
        try:
            return _ptrace(request, self.tid, addr, data)
        except ProcessLookupError:
            # A tracee we saw stopped only vanishes from under us when
            # SIGKILL pulls it out of the stop.
            raise _Gone("was killed", reaped=False) from None

    def _getregs(self) -> UserRegs:
        regs = UserRegs()
        self._pt(PTRACE_GETREGS, 0, ctypes.addressof(regs))
        return regs

    def _setregs(self, regs: UserRegs) -> None:
        self._pt(PTRACE_SETREGS, 0, ctypes.addressof(regs))

    def _sigmask(self, request: int, mask: int = 0) -> int:
        buf = ctypes.c_uint64(mask)
        self._pt(request, SIGSET_SIZE, ctypes.addressof(buf))
        return buf.value

    def _resume(self) -> None:
        # Never with a signal: those we met were recorded, see _release().
        self._pt(PTRACE_SYSCALL)
        self.stopped = False

    def _mem(self, op: Callable[[], bytes | None], what: str) -> bytes | None:
        try:
            return op()
        except ProcessLookupError:
            raise _Gone("was killed", reaped=False) from None
        except OSError as exc:
            self._refuse(EFAULT, f"cannot {what} of thread {self.tid}: {exc.strerror}")

    async def _wait(self, deadline: float) -> int:
        """Next stop status of T; raises _Gone on exit, _Deadline on timeout."""
        delay = 0.0
        while True:
            try:
                pid, status = os.waitpid(self.tid, os.WNOHANG | WALL)
            except ChildProcessError:
                self.attached = self.stopped = False
                raise _Gone(
                    "vanished (no longer our tracee: reaped by another waitpid?)",
                    reaped=True,
                ) from None
            if pid:
                if os.WIFSTOPPED(status):
                    self.stopped = True
                    return status
                self.attached = self.stopped = False
                if os.WIFSIGNALED(status):
                    how = f"was killed by {_signame(os.WTERMSIG(status))}"
                else:
                    how = f"exited with status {os.WEXITSTATUS(status)}"
                raise _Gone(how, reaped=True)
            now = trio.current_time()
            if now >= deadline:
                raise _Deadline
            await trio.sleep(min(delay, deadline - now))
            delay = min(max(2 * delay, MIN_POLL_DELAY), self.max_delay)

    # -- the state machine --------------------------------------------------

    async def run(self) -> tuple[int, ...]:
        try:
            _ptrace(PTRACE_SEIZE, self.tid, 0, PTRACE_O_TRACESYSGOOD)
        except OSError as exc:
            raise self._seize_error(exc.errno or EIO) from None
        self.attached = True
        try:
            return await self._attached()
        except _Gone as gone:
            how = gone.how
            if not gone.reaped:
                with trio.CancelScope(shield=True):
                    how = await self._reap() or how
            raise self._error(ESRCH, f"thread {self.tid} {how} while borrowed; cannot {self.call.purpose}") from None

    def _seize_error(self, err: int) -> BorrowError:
        tid, cannot = self.tid, f"cannot {self.call.purpose}"
        if err == ESRCH:
            return BorrowError(ESRCH, f"thread {tid} does not exist; {cannot}")
        if err != EPERM:
            return BorrowError(err, f"PTRACE_SEIZE of thread {tid} failed ({os.strerror(err)}); {cannot}")
        status = procfs.status(tid)
        if status is None or status.get("State", "X")[:1] in "XZ":
            return BorrowError(ESRCH, f"thread {tid} is exiting; {cannot}")
        tracer = int(status.get("TracerPid", "0") or 0)
        if tracer:
            tracer_status = procfs.status(tracer) or {}
            if tracer_status.get("Tgid") == str(os.getpid()):
                return BorrowError(
                    EBUSY,
                    f"thread {tid} is already being traced by this daemon (an earlier "
                    f"borrowed call of it is unfinished); {cannot}",
                )
            return BorrowError(EBUSY, f"thread {tid} is already being traced by pid {tracer} (a debugger?); {cannot}")
        if status.get("Tgid") == str(os.getpid()):
            return BorrowError(EPERM, f"thread {tid} belongs to the daemon itself; {cannot}")
        return BorrowError(
            EPERM, f"not permitted to ptrace thread {tid} (no CAP_SYS_PTRACE, or Yama/LSM policy); {cannot}"
        )

    async def _attached(self) -> tuple[int, ...]:
        try:
            try:
                status = procfs.status(self.tid)
                if status is None:
                    raise _Gone("exited", reaped=False)
                self.tgid = int(status.get("Tgid", self.tid))
                # The trap must be queued before T's syscall can complete:
                # see step 2 of the module docstring.
                self._pt(PTRACE_INTERRUPT)
                self.reply()
                return await self._drive(trio.current_time() + self.timeout)
            except _Deadline:
                return await self._abort(
                    ETIMEDOUT,
                    f"thread {self.tid} did not get through its borrowed {self.call.name} within "
                    f"{self.timeout:g} s ({self._phase()}); cannot {self.call.purpose}",
                )
        except (BorrowError, _Gone):
            raise
        except BaseException as exc:
            # Cancelled, a failing reply(), or a ptrace error we did not
            # foresee: whatever it is, T must not stay stopped or traced.
            err = ECANCELED if isinstance(exc, trio.Cancelled) else EIO
            with trio.CancelScope(shield=True):
                try:
                    await self._abort(err, f"borrowing thread {self.tid} for {self.call.name} failed: {exc!r}")
                except BorrowError as berr:
                    log.debug("%s", berr)
                except _Gone:
                    await self._reap()
                except Exception:
                    log.exception("cleaning up thread %d failed", self.tid)
            if isinstance(exc, OSError):
                raise self._error(EIO, f"borrowing thread {self.tid} for {self.call.name} failed: {exc}") from exc
            raise

    async def _drive(self, deadline: float) -> tuple[int, ...]:
        while True:
            status = await self._wait(deadline)
            self.last_stop = self._classify(status)
            result = self._act(self.last_stop)
            if result is not None:
                return result

    def _classify(self, status: int) -> str:
        if status >> 8 == (signal.SIGTRAP | 0x80):
            return "syscall"
        if status >> 16:
            return "event"  # PTRACE_EVENT_STOP: a trap or a group-stop
        # Signal-delivery-stop: the signal has been dequeued.  Suppress it
        # (we never resume with a signal) and queue it again at the end.
        info = (ctypes.c_char * SIGINFO_SIZE)()
        self._pt(PTRACE_GETSIGINFO, 0, ctypes.addressof(info))
        self.signals.append(bytes(info))
        return "signal"

    def _act(self, kind: str) -> tuple[int, ...] | None:
        if self.phase is _Phase.FIRST:
            return self._at_first_stop()
        if kind == "syscall":
            return self._at_entry() if self.phase is _Phase.ENTRY else self._at_exit()
        # A trap, group-stop or signal stop.  Before the injected syscall has
        # been entered, T is still in the kernel's return-to-user path: if we
        # are aborting, this is a fine place to put everything back.  (Between
        # entry and exit such stops cannot happen; we would just resume.)
        if self.abort_errno and self.phase is _Phase.ENTRY:
            self._release(-self.abort_errno)
            raise self._error(self.abort_errno, self.abort_reason)
        self._resume()
        return None

    def _at_first_stop(self) -> tuple[int, ...] | None:
        tid = self.tid
        if self.saved is None:
            regs = self._getregs()
            if _signed(regs.orig_rax) < 0:
                # Not on a syscall's return path: T was running user code.
                # Its registers are none of our business; leave them alone.
                self._release(None)
                raise self._error(
                    EINVAL,
                    f"thread {tid} was not in a system call when it stopped; "
                    f"it was left untouched, so cannot {self.call.purpose}",
                )
            self.saved = regs
        saved = self.saved
        if self.abort_errno:
            self._release(-self.abort_errno)
            raise self._error(self.abort_errno, self.abort_reason)
        if saved.cs != USER64_CS:
            self._refuse(
                ENOEXEC,
                f"thread {tid} runs 32-bit code (cs={saved.cs:#x}); only 64-bit callers can be borrowed, "
                f"so cannot {self.call.purpose}",
            )
        insn = self._mem(
            lambda: _read_mem(tid, saved.rip - len(SYSCALL_INSN), len(SYSCALL_INSN)),
            "read the instruction before rip",
        )
        if insn != SYSCALL_INSN:
            self._refuse(
                ENOEXEC,
                f"thread {tid} entered its system call with the bytes {(insn or b'').hex(' ')} (int 0x80?) "
                f"rather than the 64-bit syscall instruction; cannot {self.call.purpose}",
            )
        nr = _signed(saved.orig_rax)
        if self.expect_syscall is not None and nr != self.expect_syscall:
            # Not the syscall the daemon is answering: someone else's result
            # is in rax, and an interrupted call will be restarted by the
            # kernel as long as we do not touch anything.
            self._release(None)
            raise self._error(
                EINVAL,
                f"thread {tid} was returning from system call {nr}, not {self.expect_syscall}; it was left untouched",
            )
        self.saved_mask = self._sigmask(PTRACE_GETSIGMASK)
        self._sigmask(PTRACE_SETSIGMASK, ALL_SIGNALS)
        stack = self.errand.stack
        if stack:
            addr = (saved.rsp - RED_ZONE - STACK_GAP - len(stack)) & ~0xF
            self.stack_saved = self._mem(lambda: _read_mem(tid, addr, len(stack)), "read the stack")
            self.stack_addr = addr
            self._mem(lambda: _write_mem(tid, addr, stack), f"write the {self.errand} arguments to the stack")
        self._arm()
        self.phase = _Phase.ENTRY
        self._resume()
        return None

    def _arm(self) -> None:
        """Point T at its syscall instruction again, set up as the borrowed call."""
        assert self.saved is not None
        regs = UserRegs.from_buffer_copy(self.saved)
        regs.rip = self.saved.rip - len(SYSCALL_INSN)
        regs.rax = self.call.nr
        regs.orig_rax = _U64  # -1: no syscall to restart (step 7)
        stack = self.stack_addr + self.offsets[self.index]
        args = [arg & _U64 if isinstance(arg, int) else stack for arg in self.call.args]
        args += [0] * (len(_ARG_REGS) - len(args))
        for name, value in zip(_ARG_REGS, args, strict=True):
            setattr(regs, name, value)
        self._setregs(regs)

    def _at_entry(self) -> tuple[int, ...] | None:
        regs = self._getregs()
        nr = _signed(regs.orig_rax)
        if nr != self.call.nr:
            # Cannot happen unless our bookkeeping is wrong.  orig_rax = -1
            # makes the kernel skip whatever syscall this is.
            self._release(-EIO, skip_syscall=True)
            raise self._error(
                EIO,
                f"thread {self.tid} entered system call {nr} instead of the injected {self.call.name}; "
                "it was released with EIO",
            )
        if self.abort_errno:
            self._release(-self.abort_errno, skip_syscall=True)
            raise self._error(self.abort_errno, self.abort_reason)
        self.phase = _Phase.EXIT
        self._resume()
        return None

    def _at_exit(self) -> tuple[int, ...] | None:
        result = _signed(self._getregs().rax)
        if result in RESTART_CODES:
            # The call was interrupted (a group-stop, SIGSTOP, our own
            # INTERRUPT).  Unless we are giving up, run it again, as the
            # kernel would have for T's own call.
            if self.abort_errno:
                self._release(-self.abort_errno)
                raise self._error(self.abort_errno, self.abort_reason)
            self._arm()
            self.phase = _Phase.ENTRY
            self._resume()
            return None
        self.results.append(result)
        failed = result < 0 and self.errand.returns is None
        if not failed and self.index + 1 < len(self.errand.calls) and not self.abort_errno:
            # The next call of the errand: T is at the syscall exit, as at
            # the first stop, so the same rewind sets it up (step 7).
            self.index += 1
            self._arm()
            self.phase = _Phase.ENTRY
            self._resume()
            return None
        if self.abort_errno and len(self.results) < len(self.errand.calls):
            self._release(-self.abort_errno)
            raise self._error(self.abort_errno, self.abort_reason)
        self._release(result)
        if failed:
            raise self._error(-result, f"thread {self.tid} could not {self.call.what}: {os.strerror(-result)}")
        return tuple(self.results)

    def _refuse(self, err: int, message: str) -> NoReturn:
        self._release(-err)
        raise self._error(err, message)

    def _release(self, rax: int | None, *, skip_syscall: bool = False) -> None:
        """Restore T (rax excepted), requeue its signals, and PTRACE_DETACH.

        rax None leaves the registers alone.  skip_syscall, at a syscall-entry
        stop, sets orig_rax = -1 so that the kernel skips the syscall and
        T sees rax as its result.  An errand with a fixed result
        (:attr:`Errand.returns`) gives T that instead of any rax, failures
        included.
        """
        tid = self.tid
        if rax is not None and self.errand.returns is not None:
            rax = self.errand.returns
        if rax is not None and self.saved is not None:
            regs = UserRegs.from_buffer_copy(self.saved)
            regs.rax = rax & _U64
            if skip_syscall:
                regs.orig_rax = _U64
            self._setregs(regs)
        elif rax is not None:
            # Aborting at the first stop before we looked at anything.
            regs = self._getregs()
            if _signed(regs.orig_rax) >= 0:
                regs.rax = rax & _U64
                self._setregs(regs)
        if self.stack_saved is not None:
            try:
                _write_mem(tid, self.stack_addr, self.stack_saved)
            except ProcessLookupError:
                raise _Gone("was killed", reaped=False) from None
            except OSError as exc:
                log.warning("could not restore the stack of thread %d: %s", tid, exc)
            self.stack_saved = None
        if self.saved_mask is not None:
            self._sigmask(PTRACE_SETSIGMASK, self.saved_mask)
            self.saved_mask = None
        # Queued while T is still stopped, the signals are delivered as soon
        # as it runs again, before it executes a user instruction.
        for info in self.signals:
            self._requeue(info)
        self.signals.clear()
        self._pt(PTRACE_DETACH)
        self.attached = self.stopped = False

    def _requeue(self, info: bytes) -> None:
        signo, _, code = struct.unpack_from("=iii", info)
        if code < 0 and code != SI_TKILL:
            buf = (ctypes.c_char * SIGINFO_SIZE).from_buffer_copy(info)
            args = (NR_RT_TGSIGQUEUEINFO, self.tgid, self.tid, signo)
            ret = libc.syscall(*map(ctypes.c_long, args), ctypes.addressof(buf))
        else:
            args = (NR_TGKILL, self.tgid, self.tid, signo)
            ret = libc.syscall(*map(ctypes.c_long, args))
        if ret == -1:
            log.warning(
                "could not requeue %s to thread %d: %s",
                _signame(signo),
                self.tid,
                os.strerror(ctypes.get_errno()),
            )

    # -- getting out when things go wrong -------------------------------------

    async def _abort(self, err: int, why: str) -> tuple[int, ...]:
        """Get T back as soon as possible, failing its syscall with err."""
        if not self.abort_errno:
            self.abort_errno, self.abort_reason = err, why
        if not self.attached:
            raise self._error(self.abort_errno, self.abort_reason)
        if self.stopped:
            # Something failed while T was stopped: act on that stop again,
            # now in abort mode.
            result = self._act(self.last_stop)
            if result is not None:
                return result
        # Kicks T out of an interruptible sleep (an openat of a FIFO, a wait
        # for a signal); a killable one (FUSE after its interrupt) only ends
        # when its request is answered.
        self._pt(PTRACE_INTERRUPT)
        try:
            return await self._drive(trio.current_time() + self.grace)
        except _Deadline:
            pass
        self._abandon()
        raise self._error(
            self.abort_errno,
            f"{self.abort_reason}; it could not be stopped within a further "
            f"{self.grace:g} s, so it stays traced and will be released, failing "
            f"with {os.strerror(self.abort_errno)}, when its system call returns",
        ) from None

    def _abandon(self) -> None:
        """Leave T to a system task that releases it whenever it stops.

        We cannot PTRACE_DETACH a tracee that is not in a ptrace-stop, and
        returning with T still attached would leave it stopped forever the
        next time it leaves the kernel.
        """
        self.max_delay = ABANDONED_POLL_DELAY
        trio.lowlevel.spawn_system_task(self._watch, name=f"{__name__}: release thread {self.tid}")

    async def _watch(self) -> None:
        try:
            result = await self._drive(math.inf)
        except BorrowError as err:
            log.warning("released thread %d late: %s", self.tid, err)
        except _Gone as gone:
            if not gone.reaped:
                await self._reap()
            log.warning("thread %d %s before it could be released", self.tid, gone.how)
        except trio.Cancelled:
            log.warning("daemon exiting with thread %d still traced", self.tid)
            raise
        except Exception:
            log.exception("releasing thread %d failed", self.tid)
        else:
            log.warning(
                "thread %d got %s from its borrowed %s after that had been reported as failed",
                self.tid,
                result,
                self.errand,
            )

    async def _reap(self) -> str | None:
        """T was killed under us: wait for its death so it is no zombie.

        Returns how it died, when we learn it.
        """
        deadline = trio.current_time() + REAP_TIMEOUT
        while self.attached:
            try:
                await self._wait(deadline)
            except _Gone as gone:
                return gone.how
            except _Deadline:
                log.warning("thread %d did not finish dying in time", self.tid)
                return None
            # A stop after all: T is alive.  Put it back and let go.
            try:
                self._release(-ESRCH if self.saved is not None else None)
            except (_Gone, OSError) as exc:
                log.debug("releasing thread %d: %s", self.tid, exc)
        return None


async def borrow(
    tid: int,
    errand: Errand,
    reply: Callable[[], None],
    *,
    expect_syscall: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    grace: float = DEFAULT_GRACE,
) -> tuple[int, ...]:
    """Make thread `tid`, blocked in a syscall, run `errand`'s calls and return from its syscall.

    The thread T must be blocked in the syscall the daemon is about to answer
    (the CUSE ioctl), entered with the 64-bit `syscall` instruction.  T is
    seized and interrupted, then `reply()` is called (at most once, and not
    at all when the borrow fails before T is interrupted: see below) to complete
    that syscall; its result is a placeholder, because whenever T is still
    alive afterwards, this function sets the syscall's final result itself:
    by default the last call's result on success, -errno on failure; an
    errand with a fixed `returns` gives T that value in every case.  T
    makes each call as its own (for openat: opens the path relative to its
    cwd, in its own process).

    Returns each call's result as seen by T (>= 0, or -errno for a call that
    failed in an errand with a fixed result).  Raises BorrowError, whose
    .errno says what went wrong (and, without a fixed result, is what T's
    syscall fails with).  Whether reply() was called is
    the one fact that says whether the caller must still answer the ioctl:
    if it was not (EBUSY, EPERM; ESRCH, EIO or ENOSYS before T was
    interrupted), nothing was done to T; once it was, T's result is ours to
    set and has been set.

      EBUSY      T is already traced (a debugger, or an unfinished borrowed
                 call of ours); not replied.
      ESRCH      T does not exist, or died at any point; it has been reaped
                 and no ptrace attachment remains.
      EPERM      not allowed to ptrace T; not replied.
      EINVAL     T was not returning from a syscall (it was running user
                 code), or not from `expect_syscall` when that is given.  T's
                 registers were left untouched: an interrupted syscall is
                 restarted by the kernel as usual.
      ENOEXEC    T entered the syscall otherwise than with the 64-bit
                 `syscall` instruction (int 0x80, a 32-bit task): we would
                 have to re-execute that instruction.
      EFAULT     T's stack below the red zone is not writable.
      errno of the call in T, e.g. for openat ENOENT, EACCES, EMFILE: T's
                 registers, stack and signal mask are restored and its
                 syscall fails with that errno (without a fixed result;
                 with one, the failure is only among the results).
      ETIMEDOUT  T did not get through within `timeout` seconds.  It gets a
                 further `grace` seconds to reach a stop where it can be
                 released (failing with ETIMEDOUT); if even that fails it is
                 left to a trio system task that releases it when it stops.
      ECANCELED  (T's result only) the calling task was cancelled: T is
                 released the same way, then trio.Cancelled propagates.
      EIO        an unexpected ptrace failure.

    ValueError for bad arguments is raised before anything is done.
    """
    if tid <= 0:
        raise ValueError(f"bad thread id {tid}")
    if len(errand.stack) > STACK_MAX:
        raise ValueError(f"{errand}: {len(errand.stack)} bytes for the stack, at most {STACK_MAX}")
    if timeout <= 0 or grace <= 0:
        raise ValueError("timeout and grace must be positive")
    if os.uname().machine != "x86_64":
        purpose = errand.calls[0].purpose
        raise BorrowError(ENOSYS, f"borrowing a thread is only implemented for x86_64; cannot {purpose}")
    return await _Borrow(tid, errand, reply, expect_syscall, timeout, grace).run()


async def borrow_from_ioctl(tid: int, errand: Errand, reply: Callable[[], None]) -> tuple[int, ...]:
    """:func:`borrow` as the daemon uses it: only ever hijack the return of T's ioctl.

    The caller is held in its ioctl until we reply, so that is the syscall it
    returns from; checking it costs nothing and guards against ever taking
    over some other syscall of the thread.  (A :class:`~cuse_ksm.host.syscall.Borrower`.)

    ``tid`` comes from the request, where the kernel writes 0 for a caller
    that is not visible in the daemon's pid namespace (a daemon in a
    container, a caller on the host): such a thread cannot be traced, so it
    gets EPERM, as any thread we may not trace does.
    """
    if tid <= 0:
        purpose = errand.calls[0].purpose
        raise BorrowError(
            EPERM, f"the caller is outside the daemon's pid namespace (thread id {tid}); cannot {purpose}"
        )
    timeout = DEFAULT_TIMEOUT if errand.timeout is None else errand.timeout
    return await borrow(tid, errand, reply, expect_syscall=NR_IOCTL, timeout=timeout)
