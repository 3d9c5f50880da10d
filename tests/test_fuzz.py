"""Property-based fuzzing of the wire codec and of every ioctl through the real request loop.

The daemon must never die: each request gets the seed's result or a clear
errno, garbage on the channel is dropped, and after every step the device's
and engine's bookkeeping agree with each other (:func:`check_consistency`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuse_ksm import abi
from cuse_ksm import protocol as p
from cuse_ksm.daemon import Server
from cuse_ksm.device import KsmDevice, SmaFile
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory
from cuse_ksm.host.syscall import BorrowError
from cuse_ksm.session import CuseSession
from tests.fakekernel import FakeKernel

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KNOWN = list(abi.IOCTL_NAMES)
commands = st.one_of(
    st.sampled_from(KNOWN),
    st.integers(0, 2**32 - 1),
    st.builds(lambda nr, d, size: abi._ioc(d, nr, size), st.integers(0, 255), st.integers(0, 3), st.integers(0, 64)),
)
# The caller's memory at the pointer: 24 bytes, or None for a pointer the kernel cannot copy.
payloads = st.one_of(st.none(), st.binary(min_size=24, max_size=24))


def check_consistency(device: KsmDevice, engine: Engine) -> None:
    """The device's files, the engine's SMAs and the global slot list describe one state."""
    for fh, file in device.files.items():
        assert file.fh == fh
    live = {id(sma) for sma in engine.smas.values()}
    from_smas = [slot for sma in engine.smas.values() for slot in sma.slots]
    assert sorted(map(id, from_smas)) == sorted(map(id, engine.slots)), "slot lists disagree"
    for slot in engine.slots:
        assert id(slot.sma) in live, "a slot outlived its SMA"
        assert not getattr(slot.space, "closed", False), "a live slot holds a closed address space"
    bound = [f.sma for f in device.files.values() if isinstance(f, SmaFile) and id(f.sma) in live]
    assert len(bound) == len({id(s) for s in bound}), "two open files claim one SMA"
    k = engine.kthread
    assert 0 <= k.sleep < 2**32 and 0 <= k.pages_to_scan < 2**32 and 0 <= k.flags < 2**32


@st.composite
def operations(draw: st.DrawFn) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["open", "release", "ioctl", "ioctl", "ioctl", "create", "garbage"]))
        if kind == "ioctl":
            ops.append(
                (
                    kind,
                    draw(st.integers(0, 12)),  # index into open fhs; out of range = stale/unknown fh
                    draw(commands),
                    draw(payloads),
                    draw(st.sampled_from(["self", "dead", "random"])),
                    draw(st.sampled_from([0, p.FUSE_IOCTL_32BIT | p.FUSE_IOCTL_COMPAT])),
                )
            )
        elif kind == "release":
            ops.append((kind, draw(st.integers(0, 12))))
        elif kind == "create":
            ops.append((kind, draw(st.sampled_from(["ok", "busy", "gone"]))))
        elif kind == "garbage":
            ops.append((kind, draw(st.binary(max_size=200))))
        else:
            ops.append((kind,))
    return ops


def run_scenario(ops: list[tuple]) -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        theirs.setblocking(False)
        kernel = FakeKernel(theirs)
        engine = Engine()
        device = KsmDevice(engine, ProcessMemory.open)
        outcome = {"mode": "ok"}

        async def borrower(tid, call, reply):
            if outcome["mode"] == "busy":
                raise BorrowError(errno.EBUSY, "already traced")
            reply()
            if outcome["mode"] == "gone":
                raise BorrowError(errno.ESRCH, "killed during the hand-out")
            fh = await kernel.open(pid=tid)
            return 100 + fh

        session = CuseSession(device, dev_dir="/nonexistent")
        server = Server(ours.fileno(), session, borrower)
        dead = os.getpid() + 2**22  # above pid_max: no such process
        fhs: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            nursery.start_soon(kernel.pump)
            await kernel.init()
            dev_fh = await kernel.open()  # CREATE goes through this one; fhs may hold SMA files
            for op in ops:
                if op[0] == "open":
                    fhs.append(await kernel.open())
                elif op[0] == "release":
                    if op[1] < len(fhs):
                        await kernel.release(fhs.pop(op[1]))
                elif op[0] == "create":
                    outcome["mode"] = op[1]
                    result, _ = await kernel.ioctl(dev_fh, abi.KSM_CREATE_SHARED_MEMORY_AREA)
                    if op[1] == "busy":
                        assert result == -errno.EBUSY
                    elif op[1] == "ok" and result == 0:
                        with trio.fail_after(5):
                            while session.borrows:
                                await trio.sleep(0.001)
                        fhs.extend(fh for fh, f in device.files.items() if isinstance(f, SmaFile) and fh not in fhs)
                elif op[0] == "garbage":
                    theirs.send(op[1] or b"\0")
                else:
                    _, index, cmd, data, who, flags = op
                    fh = fhs[index] if index < len(fhs) else 10**6 + index
                    pid = {"self": os.getpid(), "dead": dead, "random": 1}[who]
                    result, out = await kernel.ioctl(fh, cmd, data=data, pid=pid, flags=flags)
                    # Every answer is the seed's result or a clear errno, never a crash.
                    assert (
                        result in (0, 1, 22)
                        or -4095 <= result < 0
                        or (cmd == abi.KSM_GET_API_VERSION and result == abi.KSM_API_VERSION)
                    ), (hex(cmd), result)
                    assert len(out) in (0, 24)
                check_consistency(device, engine)
            # Still serving after all that.
            fh = await kernel.open()
            assert await kernel.ioctl(fh, abi.KSM_GET_API_VERSION) == (1, b"")
            for fh in list(device.files):
                await kernel.release(fh)
            check_consistency(device, engine)
            assert engine.slots == [] and engine.smas == {}
            nursery.cancel_scope.cancel()
        ours.close()
        theirs.close()

    trio.run(main)


@FUZZ
@given(operations())
def test_random_request_sequences_keep_the_daemon_consistent(ops):
    run_scenario(ops)


@FUZZ
@given(st.binary(max_size=300))
def test_codec_never_raises_anything_but_protocol_error(data):
    try:
        request = p.parse_request(data)
    except p.ProtocolError:
        return
    assert request.unique == struct.unpack_from("<Q", data, 8)[0]


@FUZZ
@given(
    st.sampled_from([*p.Opcode, 0, 1, 2**32 - 1]),
    st.binary(max_size=120),
    st.integers(-8, 8),
)
def test_codec_handles_truncated_oversized_and_unknown(opcode, body, skew):
    """Well-formed headers around bodies of any size: parse or ProtocolError, nothing else."""
    raw = p.build_request(int(opcode), 7, body)
    raw = raw[: len(raw) + skew] if skew < 0 else raw + b"\0" * skew  # now the length field may lie
    with contextlib.suppress(p.ProtocolError):
        p.parse_request(raw)
