"""A child process with known memory, driven over a pipe (host tests over real memory).

Usage: ``Child.start(npages)`` maps ``npages`` anonymous pages, touches none
of them, and reports the mapping's address.  Commands then fill, write,
unmap pages, madvise them, map more, exec or exit.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

from cuse_ksm.abi import PAGE_SIZE

CHILD_SOURCE = r"""
import ctypes, mmap, os, sys
npages = int(sys.argv[1])
m = mmap.mmap(-1, npages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
libc = ctypes.CDLL(None, use_errno=True)
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
shared = []  # the mappings of "share", kept alive
out = sys.stdout
out.write(f"{addr}\n"); out.flush()
for line in sys.stdin:
    cmd, *args = line.split()
    answer = "ok"
    if cmd == "fill":  # fill FIRST COUNT BYTE: pages filled with BYTE
        first, count, byte = (int(a) for a in args)
        m[first * 4096:(first + count) * 4096] = bytes([byte]) * (count * 4096)
    elif cmd == "stamp":  # stamp FIRST COUNT OFFSET: page index written at OFFSET of each page
        first, count, offset = (int(a) for a in args)
        for i in range(first, first + count):
            m[i * 4096 + offset:i * 4096 + offset + 8] = i.to_bytes(8, "little")
    elif cmd == "touch":  # touch FIRST COUNT: read one byte of each page (maps the shared zero page)
        first, count = (int(a) for a in args)
        sum(m[i * 4096] for i in range(first, first + count))
    elif cmd == "unmap":
        first, count = (int(a) for a in args)
        assert libc.munmap(addr + first * 4096, count * 4096) == 0
    elif cmd == "protect":  # protect FIRST COUNT: PROT_NONE (still present, but unreadable)
        first, count = (int(a) for a in args)
        assert libc.mprotect(ctypes.c_void_p(addr + first * 4096), count * 4096, 0) == 0
    elif cmd == "merge":  # merge FIRST COUNT: madvise(MADV_MERGEABLE)
        first, count = (int(a) for a in args)
        m.madvise(mmap.MADV_MERGEABLE, first * 4096, count * 4096)
    elif cmd == "share":  # share NPAGES: a MAP_SHARED mapping, madvised MERGEABLE; answers its address
        s = mmap.mmap(-1, int(args[0]) * 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        s.madvise(mmap.MADV_MERGEABLE)
        shared.append(s)
        answer = f"ok {ctypes.addressof(ctypes.c_char.from_buffer(s))}"
    elif cmd == "exec":
        os.execv("/bin/sleep", ["sleep", "60"])
    elif cmd == "exit":
        os._exit(0)
    out.write(answer + "\n"); out.flush()
"""


@dataclass
class Child:
    proc: subprocess.Popen[str]
    addr: int

    @classmethod
    def start(cls, npages: int) -> Child:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_SOURCE, str(npages)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        return cls(proc, int(proc.stdout.readline()))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def page_addr(self, index: int) -> int:
        return self.addr + index * PAGE_SIZE

    def _cmd(self, line: str) -> str:
        """Run one command; what the child answered after its "ok"."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ok, _, answer = self.proc.stdout.readline().rstrip("\n").partition(" ")
        assert ok == "ok"
        return answer

    def fill(self, first: int, count: int, byte: int) -> None:
        self._cmd(f"fill {first} {count} {byte}")

    def stamp(self, first: int, count: int, offset: int) -> None:
        self._cmd(f"stamp {first} {count} {offset}")

    def touch(self, first: int, count: int) -> None:
        """Read (never write) pages: they map the kernel's shared zero page."""
        self._cmd(f"touch {first} {count}")

    def unmap(self, first: int, count: int) -> None:
        self._cmd(f"unmap {first} {count}")

    def protect(self, first: int, count: int) -> None:
        self._cmd(f"protect {first} {count}")

    def merge(self, first: int, count: int) -> None:
        """madvise(MADV_MERGEABLE) pages of the mapping."""
        self._cmd(f"merge {first} {count}")

    def share(self, npages: int) -> int:
        """Map ``npages`` more, MAP_SHARED, madvised MERGEABLE (which the kernel accepts and ignores); their address."""
        return int(self._cmd(f"share {npages}"))

    def exec_sleep(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exec\n")
        self.proc.stdin.flush()
        # Wait until the exec has happened: the command line changes.
        for _ in range(500):
            try:
                with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"sleep"):
                        return
            except FileNotFoundError:
                break
            time.sleep(0.01)
        raise AssertionError("child did not exec")

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
