"""The daemon's request loop, driven end to end through a fake CUSE channel."""

import errno
import os
import struct

import pytest
import trio

from cuse_ksm import abi
from cuse_ksm import protocol as p
from cuse_ksm.daemon import READ_BURST
from cuse_ksm.host.ptrace import HandoutError
from tests.conftest import Harness


@pytest.fixture
async def h(nursery):
    harness = Harness()
    nursery.start_soon(harness.server.serve)
    nursery.start_soon(harness.kernel.pump)
    await harness.kernel.init()
    return harness


async def test_requests_before_init_fail_with_eio():
    harness = Harness()
    async with trio.open_nursery() as n:
        n.start_soon(harness.server.serve)
        n.start_soon(harness.kernel.pump)
        error, _ = await harness.kernel.call(p.Opcode.OPEN, struct.pack("<II", 2, 0))
        assert error == -errno.EIO
        payload = await harness.kernel.init(minor=20)
        assert struct.unpack_from("<II", payload) == (7, 20)  # agrees on the kernel's smaller minor
        assert payload.endswith(b"DEVNAME=ksmtest\0")
        n.cancel_scope.cancel()


async def test_api_version_and_kthread_round_trip(h):
    fh = await h.kernel.open()
    assert await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")
    start = abi.KthreadInfo(sleep=200, pages_to_scan=64, flags=1).pack()
    assert await h.kernel.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=start) == (0, b"")
    result, out = await h.kernel.ioctl(fh, abi.KSM_GET_INFO_KTHREAD)
    assert result == 0 and abi.KthreadInfo.unpack(out) == abi.KthreadInfo(200, 64, 1)


async def test_quirks_through_the_wire(h):
    fh = await h.kernel.open()
    assert (await h.kernel.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=abi.KthreadInfo(1, 0, 1).pack()))[0] == 1
    assert (await h.kernel.ioctl(fh, 0xAB7F))[0] == -errno.EINVAL
    # A bad pointer never reaches us: the kernel fails the copy with EFAULT.
    assert (await h.kernel.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=None))[0] == -errno.EFAULT
    assert (await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION, flags=p.FUSE_IOCTL_32BIT))[0] == -errno.ENOTTY


async def test_a_queue_of_ioctls_is_answered_whole_each_with_its_own_reply(h):
    # Many callers at once: their requests pile up before the daemon reads
    # one, and it answers them in batches (Server.serve).  Every caller must
    # get its own answer, and the last ones - fewer than a batch, with nothing
    # behind them - must not be held back waiting for more.
    fh = await h.kernel.open()
    info = abi.KthreadInfo(sleep=70, pages_to_scan=9, flags=1)
    assert await h.kernel.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=info.pack()) == (0, b"")
    arg = 0x7FFF0000
    kinds = [
        (lambda: h.kernel.send_ioctl(fh, abi.KSM_GET_API_VERSION, arg), (1, 0, b"")),
        (lambda: h.kernel.send_ioctl(fh, 0xAB7F, arg), (-errno.EINVAL, 0, b"")),
        # GET_INFO_KTHREAD's first call: the RETRY naming the caller's pointer.
        (lambda: h.kernel.send_ioctl(fh, abi.KSM_GET_INFO_KTHREAD, arg), (0, p.FUSE_IOCTL_RETRY, b"")),
        (
            lambda: h.kernel.send_ioctl(fh, abi.KSM_GET_INFO_KTHREAD, arg, out_size=abi.STRUCT_SIZE),
            (0, 0, info.pack()),
        ),
    ]
    sent = []
    for i in range(3 * READ_BURST + 5):
        send, expected = kinds[i % len(kinds)]
        sent.append((send(), expected))
    for unique, (result, flags, out) in sent:
        error, payload = await h.kernel.reply(unique)
        assert error == 0
        got_result, got_flags, _n_in, _n_out = p.IOCTL_OUT.unpack_from(payload)
        assert (got_result, got_flags & p.FUSE_IOCTL_RETRY) == (result, flags)
        if not flags:
            assert payload[p.IOCTL_OUT.size :] == out


async def test_unsupported_opcodes_get_enosys_and_garbage_is_survived(h):
    error, _ = await h.kernel.call(p.Opcode.READ, b"\0" * 40)
    assert error == -errno.ENOSYS
    h.kernel.sock.send(b"\x01\x02\x03")  # shorter than a header: logged and dropped
    fh = await h.kernel.open()
    assert await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")


async def test_hand_out_binds_the_injected_open_and_keeps_serving(nursery):
    """CREATE waits for its caller's open; other requests are answered meanwhile."""
    gate = trio.Event()
    harness_box = []

    async def fake_inject(tid, path, flags, reply):
        kernel = harness_box[0].kernel
        assert path == b"/nonexistent/ksmtest" and flags == os.O_RDWR
        reply()
        await gate.wait()  # the caller is slow to run its injected openat
        fh = await kernel.open(pid=tid)  # ...which reaches the daemon as a FUSE_OPEN from tid
        return 40 + fh

    h = Harness(injector=fake_inject)
    harness_box.append(h)
    nursery.start_soon(h.server.serve)
    nursery.start_soon(h.kernel.pump)
    await h.kernel.init()
    dev_fh = await h.kernel.open(pid=77)
    body = struct.pack("<QIIQII", dev_fh, p.FUSE_IOCTL_UNRESTRICTED, abi.KSM_CREATE_SHARED_MEMORY_AREA, 0, 0, 0)
    create = h.kernel.send(p.Opcode.IOCTL, body, pid=77)
    # The placeholder reply has gone out; the hand-out is still in progress...
    error, payload = await h.kernel.reply(create)
    assert error == 0 and p.IOCTL_OUT.unpack_from(payload)[0] == 0
    assert h.server.handouts_in_flight == 1
    # ...and the device still answers others.
    other = await h.kernel.open(pid=78)
    assert await h.kernel.ioctl(other, abi.KSM_GET_API_VERSION, pid=78) == (1, b"")
    gate.set()
    with trio.fail_after(5):
        while h.server.handouts_in_flight:
            await trio.sleep(0.001)
    (sma,) = h.engine.smas.values()
    bound = [fh for fh, f in h.device.files.items() if getattr(f, "sma", None) is sma]
    assert len(bound) == 1
    # REGISTER on it records the caller's own memory (this test process stands in for it).
    buf = bytearray(4 * abi.PAGE_SIZE)
    region = abi.MemoryRegion(npages=4, addr=id(buf)).pack()
    assert await h.kernel.ioctl(bound[0], abi.KSM_REGISTER_MEMORY_REGION, data=region, pid=os.getpid()) == (0, b"")
    assert [(s.space.tgid, s.npages) for s in h.engine.slots] == [(os.getpid(), 4)]
    assert (await h.kernel.ioctl(bound[0], abi.KSM_GET_API_VERSION, pid=os.getpid()))[0] == 22
    await h.kernel.release(bound[0])
    assert h.engine.slots == [] and h.engine.smas == {}


async def test_failed_hand_out_fails_the_ioctl_with_its_errno(nursery):
    async def refusing_inject(tid, path, flags, reply):
        raise HandoutError(errno.EBUSY, f"thread {tid} is already being traced")

    h = Harness(injector=refusing_inject)
    nursery.start_soon(h.server.serve)
    nursery.start_soon(h.kernel.pump)
    await h.kernel.init()
    fh = await h.kernel.open()
    assert await h.kernel.ioctl(fh, abi.KSM_CREATE_SHARED_MEMORY_AREA) == (-errno.EBUSY, b"")
    assert h.engine.smas == {}
    assert await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")


async def test_register_for_a_dead_process_is_eperm(h):
    proc = await trio.lowlevel.open_process(["true"])
    await proc.wait()  # exited and reaped: nothing answers to this pid any more
    sma = h.engine.new_sma()
    h.device.expect_open(4242, sma)
    fh = await h.kernel.open(pid=4242)
    region = abi.MemoryRegion(npages=1, addr=0x1000).pack()
    assert await h.kernel.ioctl(fh, abi.KSM_REGISTER_MEMORY_REGION, data=region, pid=proc.pid) == (-errno.EPERM, b"")
    assert sma.slots == []
