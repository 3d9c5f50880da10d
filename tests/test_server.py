"""The daemon's request loop (Server), driven end to end through a fake CUSE channel.

What the answers are is the session's business (tests/test_session.py);
here: that the loop reads, batches and writes them, survives garbage, stops
when the kernel closes the channel, and carries out the session's actions
(a hand-out in a task of its own, the node's access).
"""

import errno
import os
import socket
import stat
import struct

import pytest
import trio

from bench.cuse_c.floor_server import serve_floor
from cuse_ksm import abi
from cuse_ksm import protocol as p
from cuse_ksm.daemon import READ_BURST, Server
from cuse_ksm.device import KsmDevice, SmaFile
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory
from cuse_ksm.host.syscall import BorrowError, Errand
from cuse_ksm.session import CuseSession, NodeAccess
from tests.fakekernel import FakeKernel


async def no_borrower(tid: int, errand: Errand, reply) -> tuple[int, ...]:
    raise AssertionError("this test creates no SMA")


class Harness:
    def __init__(self, borrower=no_borrower, dev_dir="/nonexistent", access=None):
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.kernel = FakeKernel(self.theirs)
        self.engine = Engine()
        self.device = KsmDevice(self.engine, ProcessMemory.open)
        self.session = CuseSession(self.device, devname="ksmtest", dev_dir=dev_dir, access=access)
        self.server = Server(self.ours.fileno(), self.session, borrower)

    async def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.server.serve)
        nursery.start_soon(self.kernel.pump)
        await self.kernel.init()

    async def handouts_done(self) -> None:
        with trio.fail_after(5):
            while self.session.borrows:
                await trio.sleep(0.001)


# Named apart from the tests' own `h = Harness(...)`: with a module-level `h`,
# mypy takes the `h` in a borrower defined before that assignment for the fixture.
@pytest.fixture(name="h")
async def started_harness(nursery) -> Harness:
    harness = Harness()
    await harness.start(nursery)
    return harness


async def test_api_version_and_kthread_round_trip(h):
    fh = await h.kernel.open()
    assert await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")
    start = abi.KthreadInfo(sleep=200, pages_to_scan=64, flags=1).pack()
    assert await h.kernel.ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=start) == (0, b"")
    result, out = await h.kernel.ioctl(fh, abi.KSM_GET_INFO_KTHREAD)
    assert result == 0 and abi.KthreadInfo.unpack(out) == abi.KthreadInfo(200, 64, 1)


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


async def test_a_batch_that_ends_with_a_burst_is_written_before_the_loop_waits(h):
    # The loop stops reading without waiting after READ_BURST requests and
    # goes through trio's wait: the batch must be out before it does, or
    # with nothing behind it these callers would wait for the next request.
    fh = await h.kernel.open()
    uniques = [h.kernel.send_ioctl(fh, abi.KSM_GET_API_VERSION, 0) for _ in range(READ_BURST + 1)]
    for unique in uniques:
        error, payload = await h.kernel.reply(unique)
        assert (error, p.IOCTL_OUT.unpack_from(payload)[0]) == (0, 1)


async def test_garbage_is_dropped_and_the_loop_serves_on(h):
    h.kernel.sock.send(b"\x01\x02\x03")  # shorter than a header: logged and dropped
    h.kernel.sock.send(p.build_request(p.Opcode.IOCTL, 4, b"\0" * 8))  # an ioctl without its body
    fh = await h.kernel.open()
    assert await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")


async def test_the_loop_ends_when_the_kernel_closes_the_channel():
    harness = Harness()

    async def kernel() -> None:
        await harness.kernel.init()
        harness.theirs.shutdown(socket.SHUT_RDWR)  # the kernel's side goes away: reads return b""

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.kernel.pump)
            nursery.start_soon(kernel)
            await harness.server.serve()  # returns by itself


async def test_hand_out_binds_the_injected_open_and_keeps_serving(nursery):
    """CREATE waits for its caller's open; other requests are answered meanwhile."""
    gate = trio.Event()
    calls = []

    async def fake_borrower(tid, errand, reply):
        calls.append((tid, errand.calls[0]))
        reply()
        await gate.wait()  # the caller is slow to run its injected openat
        fh = await h.kernel.open(pid=tid)  # ...which reaches the daemon as a FUSE_OPEN from tid
        return (40 + fh,)

    h = Harness(fake_borrower)
    await h.start(nursery)
    dev_fh = await h.kernel.open(pid=77)
    body = struct.pack("<QIIQII", dev_fh, p.FUSE_IOCTL_UNRESTRICTED, abi.KSM_CREATE_SHARED_MEMORY_AREA, 0, 0, 0)
    create = h.kernel.send(p.Opcode.IOCTL, body, pid=77)
    # The placeholder reply has gone out; the hand-out is still in progress...
    error, payload = await h.kernel.reply(create)
    assert error == 0 and p.IOCTL_OUT.unpack_from(payload)[0] == 0
    assert [(tid, call.name, call.stack) for tid, call in calls] == [(77, "openat", b"/nonexistent/ksmtest\0")]
    assert list(h.session.borrows) == [77]
    # ...and the device still answers others.
    other = await h.kernel.open(pid=78)
    assert await h.kernel.ioctl(other, abi.KSM_GET_API_VERSION, pid=78) == (1, b"")
    gate.set()
    await h.handouts_done()
    (sma,) = h.engine.smas.values()
    bound = [fh for fh, f in h.device.files.items() if isinstance(f, SmaFile) and f.sma is sma]
    assert len(bound) == 1
    # REGISTER on it records the caller's own memory (this test process stands in for it).
    buf = bytearray(4 * abi.PAGE_SIZE)
    region = abi.MemoryRegion(npages=4, addr=id(buf)).pack()
    assert await h.kernel.ioctl(bound[0], abi.KSM_REGISTER_MEMORY_REGION, data=region, pid=os.getpid()) == (0, b"")
    assert [(s.space.tgid, s.npages) for s in h.engine.slots] == [(os.getpid(), 4)]
    assert (await h.kernel.ioctl(bound[0], abi.KSM_GET_API_VERSION, pid=os.getpid()))[0] == 22
    await h.kernel.release(bound[0])
    assert h.engine.slots == [] and h.engine.smas == {}


@pytest.mark.parametrize("when", ["before_reply", "after_reply"])
async def test_a_failed_hand_out_is_answered_once(nursery, when):
    async def failing_borrower(tid, call, reply):
        if when == "after_reply":
            reply()
        raise BorrowError(errno.EBUSY, f"thread {tid} is already being traced")

    h = Harness(failing_borrower)
    await h.start(nursery)
    fh = await h.kernel.open()
    unique = h.kernel.send_ioctl(fh, abi.KSM_CREATE_SHARED_MEMORY_AREA, 0)
    error, payload = await h.kernel.reply(unique)
    assert error == 0
    assert p.IOCTL_OUT.unpack_from(payload)[0] == (-errno.EBUSY if when == "before_reply" else 0)
    await h.handouts_done()
    assert h.engine.smas == {}
    assert await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")
    assert unique not in h.kernel.replies  # no second answer came


async def test_a_borrower_that_breaks_fails_the_ioctl_with_eio_and_the_daemon_serves_on(nursery, caplog):
    async def broken_borrower(tid, call, reply):
        raise RuntimeError("a bug in the borrower")

    h = Harness(broken_borrower)
    await h.start(nursery)
    fh = await h.kernel.open()
    assert await h.kernel.ioctl(fh, abi.KSM_CREATE_SHARED_MEMORY_AREA) == (-errno.EIO, b"")
    await h.handouts_done()
    assert h.engine.smas == {}
    assert await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")
    assert "failed unexpectedly" in caplog.text and "a bug in the borrower" in caplog.text


async def test_stopping_during_a_hand_out_fails_the_ioctl_with_eintr():
    started = trio.Event()

    async def stuck_borrower(tid, call, reply):
        started.set()
        await trio.sleep_forever()  # seized the thread, has not replied yet

    h = Harness(stuck_borrower)
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        fh = await h.kernel.open()
        unique = h.kernel.send_ioctl(fh, abi.KSM_CREATE_SHARED_MEMORY_AREA, 0)
        await started.wait()
        nursery.cancel_scope.cancel()  # SIGTERM
    reply = h.theirs.recv(4096)
    assert reply == p.reply_ioctl(unique, -errno.EINTR)
    assert h.engine.smas == {} and h.session.borrows == {}


async def test_the_node_gets_its_group_and_mode_once_it_appears(nursery, tmp_path):
    h = Harness(dev_dir=str(tmp_path), access=NodeAccess(mode=0o604, gid=os.getgid()))
    await h.start(nursery)
    await trio.sleep(0.05)  # the node is late: the kernel creates it after CUSE_INIT
    node = tmp_path / "ksmtest"
    node.write_bytes(b"")
    node.chmod(0o600)
    with trio.fail_after(5):
        while stat.S_IMODE(node.stat().st_mode) != 0o604:
            await trio.sleep(0.01)


async def test_the_floor_instruments_loop_runs_on_the_servers_public_parts(nursery):
    """bench/cuse_c/floor_server.py: its own loop, built from Server.read/read_waiting/act, must keep working."""
    h = Harness()
    nursery.start_soon(serve_floor, h.server)
    nursery.start_soon(h.kernel.pump)
    await h.kernel.init()
    fh = await h.kernel.open()
    assert await h.kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")  # its bare path
    result, out = await h.kernel.ioctl(fh, abi.KSM_GET_INFO_KTHREAD)  # through the session
    assert result == 0 and abi.KthreadInfo.unpack(out) == abi.KthreadInfo()


def test_waiting_says_whether_a_request_is_queued() -> None:
    """The scanner's cue (kksmd.run's ``pending``): a request is queued on the channel."""
    h = Harness()
    try:
        assert not h.server.waiting()
        h.theirs.send(b"request")
        assert h.server.waiting()
        assert h.server.read() == b"request"
        assert not h.server.waiting()
    finally:
        h.ours.close()
        h.theirs.close()
