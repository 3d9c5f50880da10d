"""Child processes holding the benchmark's memory.

A child maps SIZE bytes of anonymous memory, fills it with one of the
layouts below, optionally madvise()s it MADV_MERGEABLE (for the host
kernel's KSM), prints the address and waits for its stdin to close.

Layouts:

``dup50``
    Half of the pages are copies: page i, for even i, holds duplicate
    content number (i / 2) mod 1024, so each of the 1024 duplicate contents
    appears 128 times in 1 GiB; odd pages hold random (unique) bytes.
    Expected after a full merge: pages_shared = 1024, pages_sharing =
    dup_pages - 1024.

``tail8``
    The worst case for content-sorted trees (Andrea Arcangeli's 2009
    ksmpages test): every page is zero but for its index in its last 8
    bytes; nothing can merge.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from cuse_ksm.abi import PAGE_SIZE

DUP_CONTENTS = 1024

CHILD_SOURCE = r"""
import ctypes, mmap, os, random, sys
layout, size, mergeable = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
npages = size // 4096
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if layout == "dup50":
    rng = random.Random(2009)
    dups = [rng.randbytes(4096) for _ in range(1024)]
    chunk = 256
    for first in range(0, npages, chunk):
        n = min(chunk, npages - first)
        rnd = os.urandom(4096 * n)
        parts = [dups[((first + j) // 2) % 1024] if (first + j) % 2 == 0 else rnd[j * 4096:(j + 1) * 4096]
                 for j in range(n)]
        m[first * 4096:(first + n) * 4096] = b"".join(parts)
elif layout == "tail8":
    zero = bytes(4088)
    chunk = 256
    for first in range(0, npages, chunk):
        n = min(chunk, npages - first)
        m[first * 4096:(first + n) * 4096] = b"".join(zero + i.to_bytes(8, "little") for i in range(first, first + n))
else:
    raise SystemExit(f"unknown layout {layout}")
if mergeable:
    m.madvise(mmap.MADV_MERGEABLE)
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


@dataclass
class Workload:
    layout: str
    size: int
    proc: subprocess.Popen[bytes]
    addr: int

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expected(self) -> tuple[int, int]:
        """(pages_shared, pages_sharing) once fully merged."""
        if self.layout == "dup50":
            dup_pages = (self.npages + 1) // 2
            shared = min(DUP_CONTENTS, dup_pages)
            return shared, dup_pages - shared
        return 0, 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(layout: str, size: int, *, mergeable: bool = False) -> Workload:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SOURCE, layout, str(size), "1" if mergeable else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"workload child failed (exit {proc.returncode})")
    return Workload(layout, size, proc, int(line))
