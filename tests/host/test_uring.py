"""The io_uring the scanner reads ahead through (cuse_ksm/host/uring.py), on its own."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cuse_ksm.host import uring

ring = uring.ring()
pytestmark = pytest.mark.skipif(ring is None, reason="io_uring on x86_64 only")


@contextmanager
def file_and_buffers(data: bytes, nbufs: int = 1) -> Iterator[tuple[int, list[mmap.mmap], list[int]]]:
    """A file holding ``data``, and ``nbufs`` page buffers with their addresses (pinned meanwhile)."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        bufs = [mmap.mmap(-1, 4096) for _ in range(nbufs)]
        pins = [ctypes.c_char.from_buffer(b) for b in bufs]
        yield f.fileno(), bufs, [ctypes.addressof(p) for p in pins]
        del pins


def test_reads_complete_by_token_whatever_the_order_they_are_asked_for() -> None:
    assert ring is not None
    data = bytes(range(256)) * 64  # 16 KiB
    with file_and_buffers(data, 3) as (fd, bufs, addrs):
        tokens = [ring.read(fd, addrs[i], 4096, 4096 * i + 1) for i in range(3)]
        assert len(set(tokens)) == 3
        # Asked for last first: the others' completions are kept meanwhile.
        assert [ring.wait(t) for t in reversed(tokens)] == [4096, 4096, 4096]
        for i, buf in enumerate(bufs):
            assert buf[:] == data[4096 * i + 1 : 4096 * (i + 1) + 1]


def test_a_short_read_and_a_failed_one_report_what_pread_would() -> None:
    assert ring is not None
    with file_and_buffers(b"x" * 100) as (fd, _, (addr,)):
        assert ring.wait(ring.read(fd, addr, 4096, 0)) == 100
        closed = os.open("/dev/null", os.O_WRONLY)
        os.close(closed)
        assert ring.wait(ring.read(closed, addr, 4096, 0)) == -errno.EBADF
        token = ring.read(fd, addr, 10, 95)
        while not ring.done(token):  # polled: no system call
            pass
        assert ring.wait(token) == 5


def test_no_more_reads_than_the_ring_holds_are_taken() -> None:
    assert ring is not None
    with file_and_buffers(b"y" * 4096) as (fd, _, (addr,)):
        tokens = [ring.read(fd, addr, 8, 0) for _ in range(ring.capacity)]
        with pytest.raises(OSError) as e:
            ring.read(fd, addr, 8, 0)
        assert e.value.errno == errno.EBUSY
        assert [ring.wait(t) for t in tokens] == [8] * ring.capacity
        assert ring.wait(ring.read(fd, addr, 8, 0)) == 8  # room again
