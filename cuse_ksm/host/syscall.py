"""A system call to borrow a thread for, described as data (x86_64).

Some things the 2009 driver did inside its caller's ioctl only the caller
itself can do: a new fd appears in the process that opens it.  So the daemon
borrows the calling thread, while that thread is held in our ioctl, for one
system call of its own (:mod:`cuse_ksm.host.ptrace` explains how).  This
module says *which* calls, as plain data the session can build and tests can
compare, without loading the mechanism: a :class:`Syscall` is the number,
up to six arguments and bytes to place on the caller's stack for the
arguments that point at memory, and an :class:`Errand` is the calls one
borrow makes, in order, with what the thread's own system call returns
afterwards.  Two uses today:

* the SMA fd hand-out, ``openat()`` of the device (:func:`openat`): the
  thread's ioctl returns the open's result, the new fd;
* ``--merge kernel``: REGISTER makes the caller ``madvise(MADV_MERGEABLE)``
  its region, and REMOVE ``madvise(MADV_UNMERGEABLE)`` what it no longer
  registers (:func:`madvise`), so that the host kernel's KSM merges exactly
  what the 2009 ABI registered; the ioctl returns 0 as the 2009 driver's did,
  whatever madvise answered.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
NR_IOCTL: Final = 16
NR_MADVISE: Final = 28
NR_OPENAT: Final = 257

# madvise() advice (<asm-generic/mman-common.h>).
MADV_MERGEABLE: Final = 12
MADV_UNMERGEABLE: Final = 13
_ADVICE_WHAT: Final = {MADV_MERGEABLE: "mergeable", MADV_UNMERGEABLE: "unmergeable"}

AT_FDCWD: Final = -100
PATH_MAX: Final = 4096


class _StackBytes:
    """The argument that points at the call's stack bytes (see :data:`STACK`)."""

    def __repr__(self) -> str:
        return "STACK"


# Stands for the address, in the borrowed thread, where Syscall.stack was placed.
STACK: Final = _StackBytes()


@dataclass(frozen=True)
class Syscall:
    """One system call for a borrowed thread to make, and what it is for.

    ``args`` go into rdi, rsi, rdx, r10, r8, r9 in that order (missing ones
    are 0); :data:`STACK` among them becomes the address of ``stack``, which
    the borrower writes into the thread's stack for the call's duration.
    ``what`` says what the call does and ``purpose`` what the daemon needs
    it for, each as a phrase for error messages: "thread 42 could not
    <what>", "...; cannot <purpose>".
    """

    name: str
    nr: int
    args: tuple[int | _StackBytes, ...]
    what: str
    purpose: str
    stack: bytes = b""

    def __post_init__(self) -> None:
        if len(self.args) > 6:
            raise ValueError(f"{self.name}: a system call takes at most 6 arguments, not {len(self.args)}")
        if (STACK in self.args) != bool(self.stack):
            raise ValueError(f"{self.name}: stack bytes without an argument pointing at them, or the reverse")


def openat(path: bytes, flags: int, *, purpose: str) -> Syscall:
    """``openat(AT_FDCWD, path, flags)``: the thread opens ``path`` itself and gets the fd.

    Relative to the thread's cwd, with its credentials and namespaces.  No
    mode is passed, so O_CREAT and O_TMPFILE are refused.
    """
    if not path or b"\0" in path or len(path) >= PATH_MAX:
        raise ValueError(f"bad path {path!r}")
    if flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE:
        raise ValueError("O_CREAT and O_TMPFILE need a mode, which we do not pass")
    return Syscall(
        "openat",
        NR_OPENAT,
        (AT_FDCWD, STACK, flags, 0),
        what=f"open {os.fsdecode(path)!r}",
        purpose=purpose,
        stack=path + b"\0",
    )


def madvise(addr: int, length: int, advice: int, *, purpose: str) -> Syscall:
    """``madvise(addr, length, advice)`` on the thread's own memory (MADV_MERGEABLE or MADV_UNMERGEABLE).

    Only a process can give advice about its own mappings: process_madvise()
    takes neither of these two, and prctl(PR_SET_MEMORY_MERGE) (Linux 6.4)
    covers a whole process, not a registered range.
    """
    what = _ADVICE_WHAT.get(advice)
    if what is None:
        raise ValueError(f"advice {advice} is neither MADV_MERGEABLE nor MADV_UNMERGEABLE")
    if not 0 <= addr < 1 << 64 or not 0 < length <= (1 << 64) - addr:
        raise ValueError(f"bad range {addr:#x} + {length:#x}")
    return Syscall(
        "madvise",
        NR_MADVISE,
        (addr, length, advice),
        what=f"mark {addr:#x}-{addr + length:#x} {what}",
        purpose=purpose,
    )


@dataclass(frozen=True)
class Errand:
    """What one borrow makes the thread do: ``calls``, in order, and what its system call returns then.

    ``returns`` None: the thread's system call returns the last call's
    result (the hand-out's fd), and a call that fails ends the errand there,
    its errno becoming the thread's result.  ``returns`` a number: the
    thread gets that number whatever the calls did, and whatever became of
    the borrow (REGISTER's 0: the 2009 driver validated nothing and always
    returned 0); every call runs, and a failing one shows as -errno among
    the results.
    """

    calls: tuple[Syscall, ...]
    returns: int | None = None
    # Seconds the calls may take before the borrow gives up (ETIMEDOUT); None:
    # the borrower's default.  An open may block for ever (a FIFO); a madvise
    # is bounded work, but MADV_UNMERGEABLE copies every merged page back,
    # which takes minutes for large regions on a slow machine.
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.calls:
            raise ValueError("an errand makes at least one system call")

    @property
    def stack(self) -> bytes:
        """Every call's stack bytes, back to back (each call's :data:`STACK` points at its own)."""
        return b"".join(call.stack for call in self.calls)

    def __str__(self) -> str:
        return ", ".join(call.name for call in self.calls)


class BorrowError(Exception):
    """The borrowed system call did not run, or failed.

    ``errno`` is the positive errno the thread's ioctl should fail with.
    str(e) is one human sentence saying why, fit for a single log line.
    Whether the thread's own system call was completed by then is the
    caller's to know: it is the one whose ``reply`` the borrower calls.
    """

    errno: int

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0])


# borrow(tid, errand, reply) -> each call's result in thread tid; raises BorrowError.
# reply() completes the system call the thread is held in: the borrower calls
# it at most once, when it is safe to (cuse_ksm.host.ptrace, step 3).  Once it
# has, the thread's result is the borrower's to set, failure included, so the
# caller must not answer that system call again; until then, it must.
Borrower = Callable[[int, Errand, Callable[[], None]], Awaitable[tuple[int, ...]]]
