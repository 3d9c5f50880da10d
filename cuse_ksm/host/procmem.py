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
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass, field


def _tgid_of(tid: int) -> int:
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise ProcessLookupError(tid)


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

    @classmethod
    def open(cls, tid: int) -> ProcessMemory:
        """Pin the address space of thread ``tid``.

        Raises ProcessLookupError when the thread (or its memory) is gone.
        """
        try:
            tgid = _tgid_of(tid)
            pidfd = os.pidfd_open(tgid)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise ProcessLookupError(f"thread {tid} is gone") from e
        try:
            pagemap_fd = os.open(f"/proc/{tid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as e:
            os.close(pidfd)
            raise ProcessLookupError(f"thread {tid} is gone") from e
        except BaseException:
            os.close(pidfd)
            raise
        space = cls(tgid=tgid, tid=tid, pidfd=pidfd, pagemap_fd=pagemap_fd)
        if pidfd_exited(pidfd):
            space.close()
            raise ProcessLookupError(f"process {tgid} exited while registering")
        return space

    def exited(self) -> bool:
        return pidfd_exited(self.pidfd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.pagemap_fd)
            os.close(self.pidfd)
