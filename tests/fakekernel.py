"""The kernel's side of a CUSE channel, played over a SOCK_SEQPACKET socketpair.

A seqpacket socket keeps message boundaries, like /dev/cuse: one request per
read, one reply per write.  Tests drive the real :class:`~cuse_ksm.daemon.Server`
through it on a host that has no CUSE.
"""

from __future__ import annotations

import itertools
import socket
import struct

import trio

from cuse_ksm import protocol as p


class FakeKernel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._uniques = itertools.count(2, 2)
        self._waiting: dict[int, trio.Event] = {}
        self.replies: dict[int, bytes] = {}

    async def pump(self) -> None:
        """Collect replies; run in the test's nursery."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                return
            _len, _err, unique = p.parse_reply_header(data)
            self.replies[unique] = data
            if unique in self._waiting:
                self._waiting.pop(unique).set()

    def send(self, opcode: int, body: bytes = b"", pid: int = 1000) -> int:
        unique = next(self._uniques)
        self._waiting[unique] = trio.Event()
        self.sock.send(p.build_request(opcode, unique, body, pid=pid))
        return unique

    async def reply(self, unique: int) -> tuple[int, bytes]:
        """(error, payload) of the reply to ``unique``."""
        if unique not in self.replies:
            with trio.fail_after(5):
                await self._waiting[unique].wait()
        data = self.replies.pop(unique)
        _len, error, _unique = p.parse_reply_header(data)
        return error, data[p.OUT_HEADER.size :]

    async def call(self, opcode: int, body: bytes = b"", pid: int = 1000) -> tuple[int, bytes]:
        return await self.reply(self.send(opcode, body, pid))

    async def init(self, minor: int = 38) -> bytes:
        error, payload = await self.call(p.Opcode.CUSE_INIT, struct.pack("<IIII", 7, minor, 0, 0))
        assert error == 0
        return payload

    async def open(self, pid: int = 1000) -> int:
        error, payload = await self.call(p.Opcode.OPEN, struct.pack("<II", 2, 0), pid=pid)
        assert error == 0
        fh: int = p.OPEN_OUT.unpack_from(payload)[0]
        return fh

    async def release(self, fh: int, pid: int = 1000) -> None:
        error, _ = await self.call(p.Opcode.RELEASE, struct.pack("<QIIQ", fh, 2, 0, 0), pid=pid)
        assert error == 0

    def send_ioctl(
        self, fh: int, cmd: int, arg: int, in_data: bytes = b"", out_size: int = 0, pid: int = 1000, flags: int = 0
    ) -> int:
        """Queue one FUSE_IOCTL request of an unrestricted ioctl; its unique."""
        flags |= p.FUSE_IOCTL_UNRESTRICTED
        body = p.IOCTL_IN.pack(fh, flags, cmd, arg, len(in_data), out_size) + in_data
        return self.send(p.Opcode.IOCTL, body, pid=pid)

    async def ioctl(
        self, fh: int, cmd: int, arg: int = 0x7FFF0000, data: bytes | None = None, pid: int = 1000, flags: int = 0
    ) -> tuple[int, bytes]:
        """One ioctl() as the kernel performs it, RETRY dance included.

        ``data`` is the caller's memory at ``arg`` (24 bytes, or None for a
        pointer the kernel could not read).  Returns (result, bytes copied out).
        """
        in_data, out_size = b"", 0
        for _attempt in range(2):
            error, payload = await self.reply(self.send_ioctl(fh, cmd, arg, in_data, out_size, pid, flags))
            assert error == 0, f"ioctl reply carried error {error}"
            result, rflags, n_in, n_out = p.IOCTL_OUT.unpack_from(payload)
            if not rflags & p.FUSE_IOCTL_RETRY:
                return result, payload[p.IOCTL_OUT.size :]
            iovs = [p.IOCTL_IOVEC.unpack_from(payload, p.IOCTL_OUT.size + 16 * i) for i in range(n_in + n_out)]
            assert all(base == arg for base, _ in iovs), "the retry must name the caller's own pointer"
            if n_in:
                if data is None:
                    return -14, b""  # EFAULT, as the kernel's copy_from_user fails
                in_data = data[: sum(length for _, length in iovs[:n_in])]
            out_size = sum(length for _, length in iovs[n_in:])
        raise AssertionError("server asked for a second retry")
