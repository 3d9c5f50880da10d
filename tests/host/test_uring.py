"""The io_uring the scanner reads ahead through (cuse_ksm/host/uring.py), on its own."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import tempfile
import time
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


def test_a_wait_with_a_timeout_ends_at_the_timeout_or_at_the_completion() -> None:
    assert ring is not None
    rd, wr = os.pipe()
    try:
        with file_and_buffers(b"") as (_, bufs, (addr,)):
            # A pipe with nothing in it: the read waits for a writer.
            token = ring.read(rd, addr, 4096, (1 << 64) - 1)  # offset -1: the pipe's own position
            t0 = time.perf_counter()
            assert not ring.done(token, 0.02)
            waited = time.perf_counter() - t0
            assert waited >= 0.02
            os.write(wr, b"now")
            assert ring.done(token, 10.0)
            assert ring.wait(token) == 3 and bufs[0][:3] == b"now"
    finally:
        os.close(rd)
        os.close(wr)
