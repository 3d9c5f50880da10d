"""Property-based fuzzing of the wire codec and of every ioctl through the real request loop.

Each ioctl's answer is compared with :class:`Driver2009`, a model of the 2009
drivers (the March patch and the January kvm-tree module, both on one
device) written here from their description (the headers' numbers and the
quirks, listed in its docstring) and not from ``cuse_ksm/device.py``: the exact
result and the exact bytes copied out, for every command of either ABI on
every kind of file in every state.  Garbage on the channel gets no reply, and after every
step the files, SMAs and regions are those the model expects and the engine
passes its own consistency check (:func:`cuse_ksm.engine.check.check_engine`).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuse_ksm import protocol as p
from cuse_ksm.daemon import Server
from cuse_ksm.device import KsmDevice, ScanFile
from cuse_ksm.engine import Engine
from cuse_ksm.engine.check import check_engine
from cuse_ksm.host.syscall import BorrowError, Errand
from cuse_ksm.session import CuseSession
from tests.engine.fakes import FakeSpace
from tests.fakekernel import FakeKernel

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The headers' numbers, written out again so that the model shares nothing with the code it checks.
GET_API_VERSION, CREATE, START_STOP, GET_INFO = 0xAB00, 0xAB01, 0x4018AB02, 0x4018AB03
REGISTER, REMOVE = 0x4018AB20, 0xAB21
# ... and January's (include/linux/ksm-2009-01.h).
CREATE_SCAN, JAN_START_STOP, JAN_GET_INFO, JAN_REGISTER, SCAN = 0xAB02, 0x400CAB03, 0x400CAB04, 0x4010AB20, 0x4008AB40
KNOWN = [GET_API_VERSION, CREATE, START_STOP, GET_INFO, REGISTER, REMOVE]
KNOWN += [CREATE_SCAN, JAN_START_STOP, JAN_GET_INFO, JAN_REGISTER, SCAN]
CREATES = {CREATE: "sma", CREATE_SCAN: "scan"}


def ioc(direction: int, nr: int, size: int, typ: int = 0xAB) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


commands = st.one_of(
    st.sampled_from(KNOWN),
    st.sampled_from(KNOWN),
    st.sampled_from(KNOWN),
    st.integers(0, 2**32 - 1),
    # Near misses: the right type and number with another direction or size is another command.
    st.builds(ioc, st.integers(0, 3), st.integers(0, 255), st.sampled_from([0, 8, 24, 64])),
)
# The caller's memory at the pointer: 24 bytes, or None for a pointer the kernel cannot copy.
# A third are kthread infos with telling fields (run with or without pages, other flag bits).
kthread_infos = st.builds(
    lambda sleep, pages, flags, junk: struct.pack("<III", sleep, pages, flags) + junk,
    st.sampled_from([0, 1, 2**32 - 1]),
    st.sampled_from([0, 0, 1, 2**32 - 1]),
    st.sampled_from([0, 1, 1, 2, 3, 2**32 - 1]),
    st.binary(min_size=12, max_size=12),
)
payloads = st.one_of(st.none(), st.binary(min_size=24, max_size=24), kthread_infos)

# Callers, by thread id, and what opening their memory does (see Spaces).
CALLER, EXITING, DENIED, NOMEM = 4001, 4002, 4003, 4004
CALLERS = {"caller": CALLER, "exiting": EXITING, "denied": DENIED, "nomem": NOMEM}


class Spaces:
    """``open_space`` for the device: a FakeSpace for CALLER; the ways opening a caller's memory fails for the rest."""

    def __init__(self) -> None:
        self.opened: list[FakeSpace] = []

    def __call__(self, tid: int) -> FakeSpace:
        if tid == EXITING:
            raise ProcessLookupError(tid)  # the caller has no mm left
        if tid == DENIED:
            raise PermissionError(errno.EACCES, "not allowed to read its memory")
        if tid == NOMEM:
            raise MemoryError
        space = FakeSpace(tgid=tid)
        self.opened.append(space)
        return space


@dataclass(eq=False)
class SmaState:
    """An SMA as its fd's user sees it."""

    alive: bool = True  # False: its hand-out failed after the open arrived; the fd is a dead end
    spaces: list[FakeSpace] = field(default_factory=list)  # one per REGISTER since the last REMOVE


class ScanState:
    """A January scan fd: it holds nothing, and answers everything alike."""


@dataclass(frozen=True)
class Answer:
    result: int
    out: bytes = b""


class Driver2009:
    """What the 2009 driver answers, through the emulator's CUSE transport.

    Quirks of the 2009 code kept on purpose: START_STOP_KTHREAD with the run
    flag and pages_to_scan 0 returns +1 and changes nothing; an unknown
    command is -EINVAL on the device but +22 on an SMA; REGISTER validates
    none of npages, addr, pad, reserved_bits; REMOVE drops every region of
    the SMA; GET_INFO_KTHREAD copies out although encoded _IOW; no
    compat_ioctl, so a 32-bit caller gets -ENOTTY for anything.  January's
    calls are the same calls with 12-byte (kthread) and 16-byte (region)
    structs, on one set of parameters; its scan fd answers +22 to every
    command without reading the pointer (KSM_SCAN was commented out).  Its
    compat_ioctl is not served: -ENOTTY there too.

    Of the transport: the kernel copies a struct in before the driver runs,
    so a bad pointer is -EFAULT whatever the file's state; a file handle the
    daemon never gave out is -EBADF; an SMA whose fd hand-out failed answers
    -EBADF to everything.  Opening the caller's memory at REGISTER fails
    with -EPERM when the caller has no mm, -ENOMEM without memory, or the
    errno of the refusal.
    """

    def __init__(self) -> None:
        self.kthread = (0, 0, 0)  # sleep, pages_to_scan, flags: the scanner idle
        # fh -> its SMA or scan, or None for a device file
        self.files: dict[int, SmaState | ScanState | None] = {}

    def ioctl(self, fh: int, cmd: int, data: bytes | None, tid: int, compat: bool) -> Answer | None:
        """The answer, or None for a CREATE or CREATE_SCAN on a device file (run_scenario's create())."""
        if fh not in self.files:
            return Answer(-errno.EBADF)
        if compat:
            return Answer(-errno.ENOTTY)
        file = self.files[fh]
        if file is None:
            return self._device(cmd, data)
        if isinstance(file, ScanState):
            return Answer(22)
        return self._sma(file, cmd, data, tid)

    def _device(self, cmd: int, data: bytes | None) -> Answer | None:
        if cmd == GET_API_VERSION:
            return Answer(1)
        if cmd in CREATES:
            return None
        if cmd in (START_STOP, JAN_START_STOP):
            if data is None:
                return Answer(-errno.EFAULT)
            sleep, pages, flags = struct.unpack_from("<III", data)
            if flags & 1 and pages == 0:
                return Answer(1)
            self.kthread = (sleep, pages, flags)
            return Answer(0)
        if cmd == GET_INFO:
            return Answer(0, struct.pack("<IIIIQ", *self.kthread, 0, 0))
        if cmd == JAN_GET_INFO:
            return Answer(0, struct.pack("<III", *self.kthread))
        return Answer(-errno.EINVAL)

    def _sma(self, sma: SmaState, cmd: int, data: bytes | None, tid: int) -> Answer:
        if cmd in (REGISTER, JAN_REGISTER) and data is None:
            return Answer(-errno.EFAULT)
        if not sma.alive:
            return Answer(-errno.EBADF)
        if cmd in (REGISTER, JAN_REGISTER):
            return Answer({EXITING: -errno.EPERM, DENIED: -errno.EACCES, NOMEM: -errno.ENOMEM}.get(tid, 0))
        if cmd == REMOVE:
            sma.spaces = []
            return Answer(0)
        return Answer(22)

    def released(self, fh: int) -> None:
        self.files.pop(fh)

    def live_smas(self) -> list[SmaState]:
        return [s for s in self.files.values() if isinstance(s, SmaState) and s.alive]


# ("open",), ("release", index), ("create", mode[, command]), ("garbage", bytes), ("ioctl", ...)
Op = tuple[Any, ...]

# How the fd hand-out of a CREATE ends: fd delivered; the caller already
# traced (nothing happened); the caller killed before its open arrived; the
# caller killed after it (its file exists but the SMA is gone).
HANDOUT_MODES = ["ok", "busy", "killed", "killed_after_open"]


def not_a_request(data: bytes) -> bool:
    """Bytes whose length field cannot match: the codec refuses them whatever else they say."""
    return len(data) < 4 or int.from_bytes(data[:4], "little") != len(data)


# An index into the open files, mostly a real one; past the end: a handle never given out.
fh_index = st.sampled_from([0, 0, 0, 1, 1, 1, 2, 2, 3, 12])


@st.composite
def operations(draw: st.DrawFn) -> list[Op]:
    # Mostly start with a device file and an SMA, so that most ioctls reach a file.
    ops: list[Op] = [("open",), ("create", "ok")][: draw(st.sampled_from([0, 1, 2, 2]))]
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["open", "release", "ioctl", "ioctl", "ioctl", "create", "garbage"]))
        if kind == "ioctl":
            ops.append(
                (
                    kind,
                    draw(fh_index),
                    draw(commands),
                    draw(payloads),
                    draw(st.sampled_from(list(CALLERS))),
                    draw(st.sampled_from([False] * 7 + [True])),  # from a 32-bit caller
                )
            )
        elif kind == "release":
            ops.append((kind, draw(fh_index)))
        elif kind == "create":
            ops.append(
                (kind, draw(st.sampled_from(HANDOUT_MODES)), draw(st.sampled_from([CREATE, CREATE, CREATE_SCAN])))
            )
        elif kind == "garbage":
            ops.append((kind, draw(st.binary(min_size=1, max_size=200).filter(not_a_request))))
        else:
            ops.append((kind,))
    return ops


def run_scenario(ops: list[Op]) -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        theirs.setblocking(False)
        kernel = FakeKernel(theirs)
        engine = Engine()
        spaces = Spaces()
        device = KsmDevice(engine, spaces)
        model = Driver2009()
        mode = ["ok"]
        handouts: list[tuple[int, str, bytes, int | object]] = []  # what the borrower was asked to do
        opened: list[int] = []  # fh of each open the injector made in its caller

        async def borrower(tid: int, errand: Errand, reply: Callable[[], None]) -> tuple[int, ...]:
            (call,) = errand.calls
            handouts.append((tid, call.name, call.stack, call.args[2]))
            if mode[0] == "busy":
                raise BorrowError(errno.EBUSY, "already traced")
            reply()
            if mode[0] == "killed":
                raise BorrowError(errno.ESRCH, "killed during the hand-out")
            fh = await kernel.open(pid=tid)
            opened.append(fh)
            if mode[0] == "killed_after_open":
                raise BorrowError(errno.ESRCH, "killed after its open")
            return (100 + fh,)  # its fd in the caller: only logged

        session = CuseSession(device, dev_dir="/nonexistent")
        server = Server(ours.fileno(), session, borrower)
        fhs: list[int] = []

        async def create(fh: int, tid: int, cmd: int, flags: int = 0) -> None:
            """A CREATE or CREATE_SCAN on a device file: its answer, then the outcome of the hand-out."""
            calls, smas = len(handouts), len(engine.smas)
            answer = Answer(*await kernel.ioctl(fh, cmd, pid=tid, flags=flags))
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked()  # the hand-out ran to its end
            assert handouts[calls:] == [(tid, "openat", b"/nonexistent/ksm\0", os.O_RDWR)]
            if mode[0] == "busy":
                # Nothing was done to the caller: it gets the error, and nothing new exists.
                assert answer == Answer(-errno.EBUSY)
                assert len(engine.smas) == smas
                return
            # The reply the kernel gets is a placeholder: the injected openat's
            # fd is what the caller's ioctl() returns.
            assert answer == Answer(0)
            if mode[0] == "killed":
                assert len(engine.smas) == smas, "an SMA outlived its failed hand-out"
                return
            new = opened[-1]
            assert new not in model.files
            fhs.append(new)
            if cmd == CREATE_SCAN:
                model.files[new] = ScanState()  # alive or not, a scan fd answers alike
                assert len(engine.smas) == smas
            elif mode[0] == "ok":
                model.files[new] = SmaState()
                assert len(engine.smas) == smas + 1
            else:
                model.files[new] = SmaState(alive=False)
                assert len(engine.smas) == smas, "an SMA outlived its failed hand-out"

        def check() -> None:
            assert set(device.files) == set(model.files)
            live = model.live_smas()
            assert len(engine.smas) == len(live)
            assert len(engine.slots) == sum(len(s.spaces) for s in live)
            held = [space for s in live for space in s.spaces]
            assert all(
                isinstance(model.files[fh], ScanState) == isinstance(f, ScanFile) for fh, f in device.files.items()
            )
            assert all(space.closes == 0 for space in held), "a registered region lost its memory"
            assert all(space.closes == 1 for space in spaces.opened if space not in held)
            check_engine(engine)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            nursery.start_soon(kernel.pump)
            await kernel.init()
            dev_fh = await kernel.open()  # the "create" ops go through this one
            model.files[dev_fh] = None
            for op in ops:
                if op[0] == "open":
                    fh = await kernel.open()
                    assert fh not in model.files
                    model.files[fh] = None
                    fhs.append(fh)
                elif op[0] == "release":
                    if op[1] < len(fhs):
                        fh = fhs.pop(op[1])
                        await kernel.release(fh)
                        model.released(fh)
                elif op[0] == "create":
                    mode[0] = op[1]
                    await create(dev_fh, CALLER, op[2] if len(op) > 2 else CREATE)
                elif op[0] == "garbage":
                    theirs.send(op[1])
                else:
                    _, index, cmd, data, who, compat = op
                    fh = fhs[index] if index < len(fhs) else 10**6 + index
                    tid = CALLERS[who]
                    flags = p.FUSE_IOCTL_32BIT | p.FUSE_IOCTL_COMPAT if compat else 0
                    registered = len(spaces.opened)
                    want = model.ioctl(fh, cmd, data, tid, compat)
                    if want is None:
                        await create(fh, tid, cmd, flags)
                    else:
                        result, out = await kernel.ioctl(fh, cmd, data=data, pid=tid, flags=flags)
                        assert Answer(result, out) == want, (hex(cmd), fh, who, compat)
                        if cmd in (REGISTER, JAN_REGISTER) and want.result == 0:
                            assert len(spaces.opened) == registered + 1
                            sma = model.files[fh]
                            assert isinstance(sma, SmaState)
                            sma.spaces.append(spaces.opened[-1])
                        else:
                            assert len(spaces.opened) == registered
                check()
            # Still serving after all that.
            fh = await kernel.open()
            assert await kernel.ioctl(fh, GET_API_VERSION) == (1, b"")
            model.files[fh] = None
            for fh in list(model.files):
                await kernel.release(fh)
                model.released(fh)
            check()
            assert engine.slots == [] and engine.smas == {} and device.files == {}
            # The garbage got no reply, and no request more than one.
            assert kernel.replies == {}
            nursery.cancel_scope.cancel()
        ours.close()
        theirs.close()

    trio.run(main)


@FUZZ
@given(operations())
def test_random_request_sequences_get_the_2009_drivers_answers(ops: list[Op]) -> None:
    run_scenario(ops)


@pytest.mark.parametrize("mode", HANDOUT_MODES)
def test_each_handout_outcome(mode: str) -> None:
    """Every way a CREATE ends, then every command on the file it left behind (the fuzz may miss one)."""
    ops: list[Op] = [("create", mode, CREATE), ("create", mode, CREATE_SCAN)]
    for cmd in KNOWN:
        ops += [("ioctl", index, cmd, bytes(range(24)), "caller", False) for index in (0, 1)]
    ops += [("ioctl", 0, REGISTER, bytes(24), "caller", False), ("release", 0)]
    run_scenario(ops)


def test_every_command_on_every_kind_of_file() -> None:
    """A fixed sweep: device, SMA and scan files, good and bad pointers, each caller, 64-bit and 32-bit."""
    ops: list[Op] = [("open",), ("create", "ok", CREATE), ("create", "killed_after_open", CREATE)]
    ops += [("create", "ok", CREATE_SCAN)]
    start = struct.pack("<III", 7, 0, 1) + bytes(12)  # run with no pages: the +1 quirk
    for index in range(5):
        for cmd in [*KNOWN, 0xAB7F, ioc(2, 3, 24)]:
            for data in (start, struct.pack("<III", 7, 9, 1) + bytes(12), None):
                for who in CALLERS:
                    ops += [("ioctl", index, cmd, data, who, compat) for compat in (False, True)]
    run_scenario(ops)


# -- the codec ------------------------------------------------------------------------------

HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header: len opcode unique nodeid uid gid pid total_extlen padding
# Size of each request's fixed body in include/uapi/linux/fuse.h, for the opcodes a CUSE device decodes.
BODY = {14: 8, 18: 24, 25: 24, 36: 8, 4096: 16, 39: 32, 38: 0}  # OPEN RELEASE FLUSH INTERRUPT CUSE_INIT IOCTL DESTROY
UNIQUE, PID = 0x1122334455667788, 4242


def request(opcode: int, body: bytes) -> bytes:
    return HEADER.pack(HEADER.size + len(body), opcode, UNIQUE, 1, 0, 0, PID, 0, 0) + body


def expected(opcode: int, body: bytes, size: int) -> p.Request | str:
    """What parsing the first ``size`` bytes of request(opcode, body), zero-padded, gives: a request or the error."""
    if size < HEADER.size:
        return rf"request of {size} bytes is shorter than the 40-byte header"
    if size != HEADER.size + len(body):
        return rf"header says {HEADER.size + len(body)} bytes, buffer holds {size}"
    need = BODY.get(opcode)
    if need is None:
        return p.Unsupported(UNIQUE, PID, opcode)
    if len(body) < need:
        return rf"opcode {opcode}: body of {len(body)} bytes, needs {need}"

    def u32(off: int) -> int:
        return int.from_bytes(body[off : off + 4], "little")

    def u64(off: int) -> int:
        return int.from_bytes(body[off : off + 8], "little")

    if opcode == 39:
        if u32(24) != len(body) - 32:
            return rf"ioctl announces {u32(24)} bytes of input, carries {len(body) - 32}"
        compat = u32(8) & 0b1001 != 0  # FUSE_IOCTL_COMPAT | FUSE_IOCTL_32BIT
        return p.Ioctl(
            UNIQUE, PID, fh=u64(0), cmd=u32(12), arg=u64(16), out_size=u32(28), in_data=body[32:], is_32bit=compat
        )
    if opcode == 14:
        return p.Open(UNIQUE, PID, flags=u32(0))
    if opcode == 18:
        return p.Release(UNIQUE, PID, fh=u64(0), flags=u32(8))
    if opcode == 25:
        return p.Flush(UNIQUE, PID, fh=u64(0))
    if opcode == 36:
        return p.Interrupt(UNIQUE, PID, target=u64(0))
    if opcode == 4096:
        return p.CuseInit(UNIQUE, PID, major=u32(0), minor=u32(4), flags=u32(12))
    return p.Destroy(UNIQUE, PID)


@st.composite
def request_parts(draw: st.DrawFn) -> tuple[int, bytes, int]:
    opcode = draw(st.sampled_from([*BODY, 15, 16, 40, 0, 1, 2**32 - 1]))
    body = bytearray(draw(st.binary(max_size=120)))
    if opcode == 39 and len(body) >= 32 and draw(st.booleans()):
        body[24:28] = (len(body) - 32).to_bytes(4, "little")  # an honest in_size, so that most ioctls decode
    skew = draw(st.one_of(st.just(0), st.integers(-60, 8)))
    return opcode, bytes(body), skew


@FUZZ
@given(request_parts())
def test_codec_handles_truncated_oversized_and_unknown(parts: tuple[int, bytes, int]) -> None:
    """Well-formed headers around bodies of any size, cut or padded: the exact request or the exact error."""
    opcode, body, skew = parts
    raw = request(opcode, body)
    raw = raw[: max(0, len(raw) + skew)] if skew < 0 else raw + b"\0" * skew  # now the length field may lie
    want = expected(opcode, body, len(raw))
    if isinstance(want, str):
        with pytest.raises(p.ProtocolError, match=f"^{want}$"):
            p.parse_request(raw)
    else:
        assert p.parse_request(raw) == want


@FUZZ
@given(st.binary(max_size=300))
def test_codec_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        request = p.parse_request(data)
    except p.ProtocolError:
        return
    assert int.from_bytes(data[:4], "little") == len(data), "decoded a request whose length field lies"
    assert request.unique == struct.unpack_from("<Q", data, 8)[0]


def test_every_codec_error_class_occurs() -> None:
    """Each class of malformed input above has one fixed example, so none depends on the fuzzer's luck."""
    ioctl_body = struct.pack("<QIIQII", 5, 0, GET_API_VERSION, 0, 3, 0) + b"abc"
    cases = [
        (request(14, bytes(8))[:39], r"request of 39 bytes is shorter than the 40-byte header"),
        (request(14, bytes(8)) + b"\0", r"header says 48 bytes, buffer holds 49"),
        (request(14, bytes(7)), r"opcode 14: body of 7 bytes, needs 8"),
        (request(39, ioctl_body[:31]), r"opcode 39: body of 31 bytes, needs 32"),
        (request(39, ioctl_body[:-1]), r"ioctl announces 3 bytes of input, carries 2"),
        (request(39, ioctl_body + b"d"), r"ioctl announces 3 bytes of input, carries 4"),
        (request(4096, bytes(15)), r"opcode 4096: body of 15 bytes, needs 16"),
    ]
    for raw, pattern in cases:
        with pytest.raises(p.ProtocolError, match=f"^{pattern}$"):
            p.parse_request(raw)
    assert p.parse_request(request(15, b"x")) == p.Unsupported(UNIQUE, PID, 15)
    assert p.parse_request(request(39, ioctl_body)) == p.Ioctl(UNIQUE, PID, 5, GET_API_VERSION, 0, 0, b"abc", False)


@pytest.mark.parametrize("opcode", sorted(BODY))
def test_each_request_decodes_every_field(opcode: int) -> None:
    """A body of distinct bytes, so that a field read from the wrong place shows."""
    body = bytearray(range(1, BODY[opcode] + 1))
    if opcode == 39:
        body += b"in"
        body[24:28] = (2).to_bytes(4, "little")
    assert p.parse_request(request(opcode, bytes(body))) == expected(opcode, bytes(body), HEADER.size + len(body))


@pytest.mark.parametrize(("flags", "is_32bit"), [(0, False), (1, True), (8, True), (9, True), (2 | 4 | 16, False)])
def test_an_ioctl_is_32bit_when_either_compat_flag_is_set(flags: int, is_32bit: bool) -> None:
    body = struct.pack("<QIIQII", 5, flags, GET_API_VERSION, 0, 0, 0)
    decoded = p.parse_request(request(39, body))
    assert isinstance(decoded, p.Ioctl) and decoded.is_32bit is is_32bit
