"""The CUSE session on its own: parsed requests in, exact replies and actions out.

No socket, no fake kernel, no trio: every test feeds ``protocol`` requests
to a :class:`CuseSession` and compares what comes back with the bytes the
codec builds for the expected answer.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest

from cuse_ksm import abi
from cuse_ksm import protocol as p
from cuse_ksm.device import DeviceFile, KsmDevice, SmaFile
from cuse_ksm.engine import Engine
from cuse_ksm.host.syscall import AT_FDCWD, NR_OPENAT, STACK
from cuse_ksm.session import HAND_OUT, Borrow, CuseSession, NodeAccess, SetNodeAccess
from tests.conftest import hand_out, open_fh, sma_of
from tests.engine.fakes import FakeSpace

TID = 4321
ARG = 0x7FFF0000  # the caller's pointer argument


def no_memory(tid: int):
    raise AssertionError(f"no test here reads a caller's memory (tid {tid})")


@pytest.fixture
def session() -> CuseSession:
    """A session whose CUSE_INIT has not come yet."""
    return CuseSession(KsmDevice(Engine(), no_memory), devname="ksmtest", dev_dir="/nonexistent")


def init(session: CuseSession, unique: int = 1, minor: int = 31) -> None:
    assert session.receive(p.CuseInit(unique, 0, 7, minor, 0)) == p.reply_cuse_init(unique, "ksmtest", minor=minor)


@pytest.fixture
def up(session: CuseSession) -> CuseSession:
    """A session serving the device."""
    init(session)
    return session


_uniques = iter(range(100, 1 << 30, 2))


def ioctl(fh: int, cmd: int, *, data: bytes = b"", out_size: int = 0, pid: int = TID, is_32bit: bool = False):
    return p.Ioctl(next(_uniques), pid, fh, cmd, ARG, out_size, data, is_32bit)


# -- before CUSE_INIT ---------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        p.Open(2, TID, os.O_RDWR),
        p.Ioctl(2, TID, 1, abi.KSM_GET_API_VERSION, 0, 0, b"", False),
        p.Release(2, TID, 1, 0),
        p.Flush(2, TID, 1),
        p.Destroy(2, 0),
        p.Unsupported(2, TID, p.Opcode.READ),
    ],
    ids=lambda r: type(r).__name__,
)
def test_every_request_before_init_fails_with_eio(session, request_):
    assert session.receive(request_) == p.reply_error(2, errno.EIO)
    assert session.device.files == {}


@pytest.mark.parametrize("major", [6, 8])
def test_a_kernel_speaking_another_major_gets_eproto_and_the_device_stays_down(session, major, caplog):
    assert session.receive(p.CuseInit(1, 0, major, 31, 0)) == p.reply_error(1, errno.EPROTO)
    assert f"kernel speaks FUSE {major}.31" in caplog.text
    assert session.receive(p.Open(2, TID, 0)) == p.reply_error(2, errno.EIO)


@pytest.mark.parametrize(("theirs", "agreed"), [(11, 11), (20, 20), (31, 31), (38, 31)])
def test_init_agrees_on_the_smaller_minor_and_names_the_device(session, theirs, agreed):
    reply = session.receive(p.CuseInit(1, 0, 7, theirs, 0))
    assert reply == p.reply_cuse_init(1, "ksmtest", minor=agreed)
    body = reply[p.OUT_HEADER.size :]
    major, minor, _unused, flags, *_ = p.CUSE_INIT_OUT.unpack_from(body)
    assert (major, minor, flags) == (7, agreed, p.CUSE_UNRESTRICTED_IOCTL)
    assert body.endswith(b"DEVNAME=ksmtest\0")
    assert session.initialized


def test_init_asks_for_the_node_access_when_one_is_given():
    access = NodeAccess(mode=0o640, gid=4242)
    session = CuseSession(KsmDevice(Engine(), no_memory), devname="ksm2", access=access)
    out = session.receive(p.CuseInit(1, 0, 7, 31, 0))
    assert out == (p.reply_cuse_init(1, "ksm2", minor=31), SetNodeAccess("/dev/ksm2", access))
    only_group = CuseSession(KsmDevice(Engine(), no_memory), access=NodeAccess(gid=0))
    assert only_group.receive(p.CuseInit(1, 0, 7, 31, 0))[1] == SetNodeAccess("/dev/ksm", NodeAccess(gid=0))


# -- the device is up ---------------------------------------------------------------


def test_open_release_flush_destroy(up):
    fh = open_fh(up, TID)
    assert isinstance(up.device.files[fh], DeviceFile)
    assert up.receive(p.Flush(7, TID, fh)) == p.reply_empty(7)
    assert up.receive(p.Release(8, TID, fh, 0)) == p.reply_empty(8)
    assert up.device.files == {}
    assert up.receive(p.Destroy(9, 0)) == p.reply_empty(9)


def test_an_interrupt_is_never_answered(up):
    assert up.receive(p.Interrupt(5, 0, 4)) == ()


@pytest.mark.parametrize("opcode", [p.Opcode.READ, p.Opcode.WRITE, p.Opcode.POLL, 9999])
def test_other_opcodes_get_enosys(up, opcode):
    assert up.receive(p.Unsupported(3, TID, opcode)) == p.reply_error(3, errno.ENOSYS)


def test_quick_ioctls_are_answered_at_once(up):
    fh = open_fh(up, TID)
    req = ioctl(fh, abi.KSM_GET_API_VERSION)
    assert up.receive(req) == p.reply_ioctl(req.unique, abi.KSM_API_VERSION)
    req = ioctl(fh, 0xAB7F)
    assert up.receive(req) == p.reply_ioctl(req.unique, -errno.EINVAL)
    req = ioctl(fh, abi.KSM_GET_API_VERSION, is_32bit=True)  # no compat_ioctl in 2009
    assert up.receive(req) == p.reply_ioctl(req.unique, -errno.ENOTTY)
    req = ioctl(999, abi.KSM_GET_API_VERSION)
    assert up.receive(req) == p.reply_ioctl(req.unique, -errno.EBADF)


def test_commands_that_need_the_callers_memory_ask_for_it_first(up):
    fh = open_fh(up, TID)
    info = abi.KthreadInfo(sleep=200, pages_to_scan=64, flags=1)
    # START_STOP_KTHREAD copies the struct in: RETRY naming 24 bytes in, then the answer.
    req = ioctl(fh, abi.KSM_START_STOP_KTHREAD)
    assert up.receive(req) == p.reply_ioctl_retry(req.unique, ARG, abi.STRUCT_SIZE, 0)
    req = ioctl(fh, abi.KSM_START_STOP_KTHREAD, data=info.pack())
    assert up.receive(req) == p.reply_ioctl(req.unique, 0)
    # GET_INFO_KTHREAD copies it out: RETRY naming 24 bytes out, then the struct.
    req = ioctl(fh, abi.KSM_GET_INFO_KTHREAD)
    assert up.receive(req) == p.reply_ioctl_retry(req.unique, ARG, 0, abi.STRUCT_SIZE)
    req = ioctl(fh, abi.KSM_GET_INFO_KTHREAD, out_size=abi.STRUCT_SIZE)
    assert up.receive(req) == p.reply_ioctl(req.unique, 0, info.pack())
    # REGISTER on an SMA copies its region in.
    sma_fh = hand_out(up, TID)[1]
    req = ioctl(sma_fh, abi.KSM_REGISTER_MEMORY_REGION)
    assert up.receive(req) == p.reply_ioctl_retry(req.unique, ARG, abi.STRUCT_SIZE, 0)


def test_a_register_mostly_unmapped_is_answered_0_and_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="cuse_ksm")
    session = CuseSession(KsmDevice(Engine(), holey_space), devname="ksmtest", dev_dir="/nonexistent")
    init(session)
    sma_fh = hand_out(session, TID)[1]
    data = abi.MemoryRegion(npages=2**32 - 1, addr=0x1000_0000_0000).pack()
    req = ioctl(sma_fh, abi.KSM_REGISTER_MEMORY_REGION, data=data)
    assert session.receive(req) == p.reply_ioctl(req.unique, 0)
    (record,) = [r for r in caplog.records if "unmapped" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        f"KSM_REGISTER_MEMORY_REGION[2009-03] from tid {TID}: the region at 0x100000000000 of 4294967295 pages "
        "is mostly unmapped: 0 of its pages are mapped"
    )


def holey_space(tid: int) -> FakeSpace:
    """A caller whose only mapping is one page at 0x7f0000000000."""
    space = FakeSpace(tid)
    space.add_mapping(0x7F00_0000_0000, 1)
    return space


# -- the fd hand-out ----------------------------------------------------------------


def create(session: CuseSession, fh: int, pid: int = TID) -> Borrow:
    req = ioctl(fh, abi.KSM_CREATE_SHARED_MEMORY_AREA, pid=pid)
    out = session.receive(req)
    assert isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], Borrow)
    borrow = out[0]
    assert borrow.request is req
    return borrow


def test_create_borrows_its_caller_to_open_the_device(up):
    borrow = create(up, open_fh(up, TID))
    assert borrow.tid == TID
    (call,) = borrow.errand.calls
    assert borrow.errand.returns is None  # the thread gets the open's result: its fd
    assert (call.name, call.nr, call.args) == ("openat", NR_OPENAT, (AT_FDCWD, STACK, os.O_RDWR, 0))
    assert call.stack == b"/nonexistent/ksmtest\0"
    assert call.purpose == HAND_OUT == "hand out the SMA fd"
    assert up.borrows == {TID: borrow}
    assert list(up.device.engine.smas.values()) == [sma_of(borrow)]


def test_the_borrowed_threads_open_is_bound_to_the_sma_and_no_other(up):
    borrow = create(up, open_fh(up, TID))
    other = open_fh(up, TID + 1)  # another thread opening the device meanwhile
    assert isinstance(up.device.files[other], DeviceFile)
    mine = open_fh(up, TID)
    assert up.device.files[mine] == SmaFile(mine, sma_of(borrow))
    assert borrow.opened is up.device.files[mine]
    again = open_fh(up, TID)  # the thread opens only once while borrowed
    assert isinstance(up.device.files[again], DeviceFile)


def test_a_successful_hand_out(up, caplog):
    caplog.set_level(logging.DEBUG, logger="cuse_ksm.session")
    borrow = create(up, open_fh(up, TID))
    assert up.complete_ioctl(borrow) == p.reply_ioctl(borrow.request.unique, 0)  # a placeholder result
    assert borrow.replied
    sma_fh = open_fh(up, TID)
    assert up.borrows == {TID: borrow}  # still in flight until the borrowed call returns
    assert up.borrowed(borrow, (7,)) is None
    assert up.borrows == {}
    assert f"sma#{sma_of(borrow).id} handed to tid {TID} as fd 7" in caplog.text
    # The SMA lives on behind its file.
    assert up.device.engine.smas == {sma_of(borrow).id: sma_of(borrow)}
    req = ioctl(sma_fh, abi.KSM_REMOVE_MEMORY_REGION)
    assert up.receive(req) == p.reply_ioctl(req.unique, 0)
    assert up.receive(p.Release(3, TID, sma_fh, 0)) == p.reply_empty(3)
    assert up.device.engine.smas == {}


def test_a_hand_out_that_fails_before_the_reply_fails_the_ioctl(up, caplog):
    borrow = create(up, open_fh(up, TID))
    reply = up.borrow_failed(borrow, errno.EBUSY, "thread 4321 is already being traced")
    assert reply == p.reply_ioctl(borrow.request.unique, -errno.EBUSY)
    assert up.borrows == {} and up.device.engine.smas == {}
    (record,) = [r for r in caplog.records if r.name == "cuse_ksm.session"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"KSM_CREATE_SHARED_MEMORY_AREA from tid {TID} failed (EBUSY): thread 4321 is already being traced"
    )
    # The thread is free again: its next open is a plain one.
    assert isinstance(up.device.files[open_fh(up, TID)], DeviceFile)


def test_a_hand_out_that_fails_after_the_reply_is_not_answered_twice(up, caplog):
    caplog.set_level(logging.INFO)
    borrow = create(up, open_fh(up, TID))
    up.complete_ioctl(borrow)
    sma_fh = open_fh(up, TID)  # the open came before the thread was killed
    assert up.borrow_failed(borrow, errno.ESRCH, "thread 4321 was killed by SIGKILL") is None
    assert up.borrows == {} and up.device.engine.smas == {}
    (record,) = [r for r in caplog.records if r.name == "cuse_ksm.session"]
    assert record.levelno == logging.INFO  # a caller killed mid-call is its own business
    # Its file stays until the kernel releases it, but the SMA is gone.
    req = ioctl(sma_fh, abi.KSM_REMOVE_MEMORY_REGION)
    assert up.receive(req) == p.reply_ioctl(req.unique, -errno.EBADF)


def test_a_cancelled_hand_out_fails_with_eintr_unless_already_answered(up, caplog):
    first = create(up, open_fh(up, TID))
    assert up.borrow_cancelled(first) == p.reply_ioctl(first.request.unique, -errno.EINTR)
    second = create(up, open_fh(up, TID))
    up.complete_ioctl(second)
    assert up.borrow_cancelled(second) is None
    assert up.borrows == {} and up.device.engine.smas == {}
    assert [r for r in caplog.records if r.name == "cuse_ksm.session"] == []  # stopping: nothing to explain


def test_hand_outs_to_two_threads_are_kept_apart(up):
    fh = open_fh(up, TID)
    a, b = create(up, fh, pid=11), create(up, fh, pid=12)
    assert up.borrows == {11: a, 12: b}
    fh_b = open_fh(up, 12)
    fh_a = open_fh(up, 11)
    assert up.device.files[fh_a].sma is sma_of(a) and up.device.files[fh_b].sma is sma_of(b)
    up.borrow_failed(a, errno.ETIMEDOUT, "too slow")
    assert up.borrows == {12: b}
    assert list(up.device.engine.smas.values()) == [sma_of(b)]
