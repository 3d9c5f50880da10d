"""--trace: one strace-like line per completed ioctl, from the session's answers."""

from __future__ import annotations

import errno
import logging
import os
import re

import pytest

from cuse_ksm import abi
from cuse_ksm import protocol as p
from cuse_ksm.device import KsmDevice
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory
from cuse_ksm.session import Borrow, CuseSession, Output
from tests.conftest import sma_of

ARG = 0x7FFF0000


class Caller:
    """Plays the kernel's side for one thread: the RETRY dance, as fakekernel.FakeKernel does over a socket."""

    def __init__(self, session: CuseSession, pid: int) -> None:
        self.session, self.pid = session, pid
        self.unique = 100

    def _send(self, req: p.Request) -> p.Request:
        self.unique += 2
        req.unique = self.unique
        return req

    def open(self) -> int:
        reply = self.session.receive(self._send(p.Open(0, self.pid, os.O_RDWR)))
        assert isinstance(reply, bytes)
        fh: int = p.OPEN_OUT.unpack_from(reply, p.OUT_HEADER.size)[0]
        return fh

    def ioctl(self, fh: int, cmd: int, arg: int = ARG, data: bytes = b"", is_32bit: bool = False) -> Output:
        """Returns the session's output for the call that completes it."""
        in_data, out_size = b"", 0
        while True:
            out = self.session.receive(self._send(p.Ioctl(0, self.pid, fh, cmd, arg, out_size, in_data, is_32bit)))
            if not isinstance(out, bytes):
                return out
            _result, flags, n_in, n_out = p.IOCTL_OUT.unpack_from(out, p.OUT_HEADER.size)
            if not flags & p.FUSE_IOCTL_RETRY:
                return out
            assert (in_data, out_size) == (b"", 0), "asked to retry twice"
            # The ranges the session named: copy in (then out) exactly as many bytes as each asks.
            offset = p.OUT_HEADER.size + p.IOCTL_OUT.size
            lengths = [p.IOCTL_IOVEC.unpack_from(out, offset + i * p.IOCTL_IOVEC.size)[1] for i in range(n_in + n_out)]
            in_data = data[: sum(lengths[:n_in])]
            out_size = sum(lengths[n_in:])

    def create(self, fh: int) -> Borrow:
        """CREATE_SHARED_MEMORY_AREA: its one output is the hand-out's borrow, for the test to end."""
        out = self.ioctl(fh, abi.KSM_CREATE_SHARED_MEMORY_AREA, arg=0)
        assert isinstance(out, tuple) and len(out) == 1, out
        (borrow,) = out
        assert isinstance(borrow, Borrow), borrow
        return borrow


@pytest.fixture
def traced(caplog) -> CuseSession:
    caplog.set_level(logging.INFO, logger="cuse_ksm.trace")
    device = KsmDevice(Engine(), ProcessMemory.open)
    session = CuseSession(device, devname="ksmtest", dev_dir="/nonexistent", trace=True)
    session.receive(p.CuseInit(1, 0, 7, 31, 0))
    return session


def trace_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cuse_ksm.trace"]


TIME = r" <\d+\.\d{3} ms>$"


def test_device_calls_are_decoded(traced, caplog):
    c = Caller(traced, 321)
    fh = c.open()
    c.ioctl(fh, abi.KSM_GET_API_VERSION, arg=0)
    start = abi.KthreadInfo(sleep=200, pages_to_scan=64, flags=1, pad=0xCCCC, reserved_bits=0).pack()
    c.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=start)
    c.ioctl(fh, abi.KSM_GET_INFO_KTHREAD)
    c.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=abi.KthreadInfo(1, 0, 1).pack())
    c.ioctl(fh, 0xAB7F, arg=0x1234)
    c.ioctl(fh + 100, abi.KSM_GET_API_VERSION, arg=0)
    lines = trace_lines(caplog)
    expected = [
        r"trace: pid 321 /nonexistent/ksmtest KSM_GET_API_VERSION 0 = 1",
        r"trace: pid 321 /nonexistent/ksmtest KSM_START_STOP_KTHREAD\[2009-03\] "
        r"\{sleep=200, pages_to_scan=64, flags=0x1, pad=0xcccc, reserved_bits=0\} = 0",
        # copied out: the struct as the caller receives it
        r"trace: pid 321 /nonexistent/ksmtest KSM_GET_INFO_KTHREAD\[2009-03\] "
        r"\{sleep=200, pages_to_scan=64, flags=0x1, pad=0, reserved_bits=0\} = 0",
        # the +1 quirk, shown as the caller sees it: success with value 1
        r"trace: pid 321 /nonexistent/ksmtest KSM_START_STOP_KTHREAD\[2009-03\] "
        r"\{sleep=1, pages_to_scan=0, flags=0x1, pad=0, reserved_bits=0\} = 1",
        r"trace: pid 321 /nonexistent/ksmtest 0xab7f 0x1234 = -1 EINVAL \(Invalid argument\)",
        rf"trace: pid 321 fh#{fh + 100} KSM_GET_API_VERSION 0 = -1 EBADF \(Bad file descriptor\)",
    ]
    assert len(lines) == len(expected), lines  # one line per ioctl: the RETRY round trips are not calls
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern + TIME, line), line


def test_sma_calls_name_the_sma(traced, caplog):
    pid = os.getpid()  # REGISTER records the caller's memory: this process stands in for it
    c = Caller(traced, pid)
    borrow = c.create(c.open())
    traced.complete_ioctl(borrow)
    fh = c.open()
    traced.borrowed(borrow, (9,))
    caplog.clear()
    buf = bytearray(2 * abi.PAGE_SIZE)
    region = abi.MemoryRegion(npages=2, addr=id(buf), pad=0xCCCCCCCC, reserved_bits=0xDEAD).pack()
    c.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, data=region)
    c.ioctl(fh, abi.KSM_GET_API_VERSION)
    c.ioctl(fh, abi.KSM_REMOVE_MEMORY_REGION, arg=0)
    lines = trace_lines(caplog)
    n = sma_of(borrow).id
    expected = [
        rf"trace: pid {pid} sma#{n} KSM_REGISTER_MEMORY_REGION\[2009-03\] "
        rf"\{{npages=2, pad=0xcccccccc, addr={id(buf):#x}, reserved_bits=0xdead\}} = 0",
        rf"trace: pid {pid} sma#{n} KSM_GET_API_VERSION 0x7fff0000 = 22",  # the +22 quirk
        rf"trace: pid {pid} sma#{n} KSM_REMOVE_MEMORY_REGION 0 = 0",
    ]
    assert len(lines) == 3, lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern + TIME, line), line


def test_hand_outs_and_32bit(traced, caplog):
    c = Caller(traced, 55)
    fh = c.open()
    ok = c.create(fh)
    assert trace_lines(caplog) == []  # traced when it ends
    traced.complete_ioctl(ok)
    c.open()
    traced.borrowed(ok, (7,))
    refused = c.create(fh)
    traced.borrow_failed(refused, errno.EBUSY, "already traced")
    stopped = c.create(fh)
    traced.borrow_cancelled(stopped)
    c.ioctl(fh, abi.KSM_GET_API_VERSION, is_32bit=True)
    lines = trace_lines(caplog)
    expected = [
        rf"trace: pid 55 /nonexistent/ksmtest KSM_CREATE_SHARED_MEMORY_AREA 0 = 7 \(sma#{sma_of(ok).id}\)" + TIME,
        r"trace: pid 55 /nonexistent/ksmtest KSM_CREATE_SHARED_MEMORY_AREA 0 = -1 EBUSY \(.*\)" + TIME,
        r"trace: pid 55 /nonexistent/ksmtest KSM_CREATE_SHARED_MEMORY_AREA 0 = -1 EINTR \(.*\)" + TIME,
        r"trace: pid 55 /nonexistent/ksmtest KSM_GET_API_VERSION 0x7fff0000 = -1 ENOTTY \(.*\)"
        r" <\d+\.\d{3} ms> \[32-bit\]",
    ]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), line


def test_off_by_default_and_silent(caplog):
    caplog.set_level(logging.DEBUG)
    session = CuseSession(KsmDevice(Engine(), ProcessMemory.open))
    assert session.tracing is False
    session.receive(p.CuseInit(1, 0, 7, 31, 0))
    c = Caller(session, 1000)
    c.ioctl(c.open(), abi.KSM_GET_API_VERSION)
    borrow = c.create(c.open())
    session.borrow_failed(borrow, errno.EBUSY, "already traced")
    assert trace_lines(caplog) == []
