"""--trace: one strace-like line per completed ioctl, through the fake CUSE channel."""

from __future__ import annotations

import logging
import os
import re
import struct

import pytest
import trio

from cuse_ksm import abi
from cuse_ksm import protocol as p
from tests.conftest import Harness


@pytest.fixture
async def traced(nursery, caplog):
    caplog.set_level(logging.INFO, logger="cuse_ksm.trace")
    harness = Harness()
    harness.server.trace = True
    nursery.start_soon(harness.server.serve)
    nursery.start_soon(harness.kernel.pump)
    await harness.kernel.init()
    return harness


def trace_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cuse_ksm.trace"]


TIME = r" <\d+\.\d{3} ms>$"


async def test_device_calls_are_decoded(traced, caplog):
    h = traced
    fh = await h.kernel.open(pid=321)
    await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION, arg=0, pid=321)
    start = abi.KthreadInfo(sleep=200, pages_to_scan=64, flags=1, pad=0xCCCC, reserved_bits=0).pack()
    await h.kernel.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=start, pid=321)
    await h.kernel.ioctl(fh, abi.KSM_GET_INFO_KTHREAD, pid=321)
    await h.kernel.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=abi.KthreadInfo(1, 0, 1).pack(), pid=321)
    await h.kernel.ioctl(fh, 0xAB7F, arg=0x1234, pid=321)
    lines = trace_lines(caplog)
    expected = [
        r"trace: pid 321 /nonexistent/ksmtest KSM_GET_API_VERSION 0 = 1",
        r"trace: pid 321 /nonexistent/ksmtest KSM_START_STOP_KTHREAD "
        r"\{sleep=200, pages_to_scan=64, flags=0x1, pad=0xcccc, reserved_bits=0\} = 0",
        # copied out: the struct as the caller receives it
        r"trace: pid 321 /nonexistent/ksmtest KSM_GET_INFO_KTHREAD "
        r"\{sleep=200, pages_to_scan=64, flags=0x1, pad=0, reserved_bits=0\} = 0",
        # the +1 quirk, shown as the caller sees it: success with value 1
        r"trace: pid 321 /nonexistent/ksmtest KSM_START_STOP_KTHREAD "
        r"\{sleep=1, pages_to_scan=0, flags=0x1, pad=0, reserved_bits=0\} = 1",
        r"trace: pid 321 /nonexistent/ksmtest 0xab7f 0x1234 = -1 EINVAL \(Invalid argument\)",
    ]
    assert len(lines) == len(expected), lines  # one line per ioctl: the RETRY round trips are not calls
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern + TIME, line), line


async def test_sma_calls_name_the_sma(traced, caplog):
    h = traced
    sma = h.engine.new_sma()
    h.device.expect_open(os.getpid(), sma)
    fh = await h.kernel.open(pid=os.getpid())
    buf = bytearray(2 * abi.PAGE_SIZE)
    region = abi.MemoryRegion(npages=2, addr=id(buf), pad=0xCCCCCCCC, reserved_bits=0xDEAD).pack()
    await h.kernel.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, data=region, pid=os.getpid())
    await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION, pid=os.getpid())
    await h.kernel.ioctl(fh, abi.KSM_REMOVE_MEMORY_REGION, arg=0, pid=os.getpid())
    lines = trace_lines(caplog)
    pid, n = os.getpid(), sma.id
    expected = [
        rf"trace: pid {pid} sma#{n} KSM_REGISTER_MEMORY_REGION "
        rf"\{{npages=2, pad=0xcccccccc, addr={id(buf):#x}, reserved_bits=0xdead\}} = 0",
        rf"trace: pid {pid} sma#{n} KSM_GET_API_VERSION 0x7fff0000 = 22",  # the +22 quirk
        rf"trace: pid {pid} sma#{n} KSM_REMOVE_MEMORY_REGION 0 = 0",
    ]
    assert len(lines) == 3, lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern + TIME, line), line


async def test_hand_out_and_32bit_and_errors(nursery, caplog):
    caplog.set_level(logging.INFO, logger="cuse_ksm.trace")

    async def fake_inject(tid, path, flags, reply):
        reply()
        await h.kernel.open(pid=tid)
        return 7

    h = Harness(injector=fake_inject)
    h.server.trace = True
    nursery.start_soon(h.server.serve)
    nursery.start_soon(h.kernel.pump)
    await h.kernel.init()
    fh = await h.kernel.open(pid=55)
    body = struct.pack("<QIIQII", fh, p.FUSE_IOCTL_UNRESTRICTED, abi.KSM_CREATE_SHARED_MEMORY_AREA, 0, 0, 0)
    await h.kernel.reply(h.kernel.send(p.Opcode.IOCTL, body, pid=55))
    with trio.fail_after(5):
        while h.server.handouts_in_flight:
            await trio.sleep(0.001)
    await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION, flags=p.FUSE_IOCTL_32BIT, pid=55)
    lines = trace_lines(caplog)
    (sma,) = h.engine.smas.values()
    assert re.fullmatch(
        rf"trace: pid 55 /nonexistent/ksmtest KSM_CREATE_SHARED_MEMORY_AREA 0 = 7 \(sma#{sma.id}\)" + TIME, lines[0]
    ), lines
    assert re.fullmatch(
        r"trace: pid 55 /nonexistent/ksmtest KSM_GET_API_VERSION 0x7fff0000 = -1 ENOTTY \(.*\)"
        r" <\d+\.\d{3} ms> \[32-bit\]",
        lines[1],
    ), lines


async def test_off_by_default_and_silent(nursery, caplog):
    caplog.set_level(logging.DEBUG)
    h = Harness()
    assert h.server.trace is False
    nursery.start_soon(h.server.serve)
    nursery.start_soon(h.kernel.pump)
    await h.kernel.init()
    fh = await h.kernel.open()
    await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION)
    assert trace_lines(caplog) == []
