"""The floor for any Python CUSE server: the daemon with GET_API_VERSION answered by a bare loop.

    python3 -m bench.cuse_c.floor_server --name ksmfloor --no-stats-dir   (repository root)

A measuring instrument, not part of the daemon.  It runs the real daemon
(CUSE_INIT, opens, every other request go through it as usual) but
answers GET_API_VERSION on a device fd in a loop with no layers at all:
one unpack of the request, one dict lookup, one pack and one write(), the
least a Python server can do per request.  It answers each request as it
reads it, as the daemon did before it batched queued replies (see
``Server.serve``).  bench/cuse_c/floor.sh puts it next to the daemon and
the C server: pinned, the gap to the daemon is what the daemon's layers
cost per request; sharing CPUs with the clients, it shows how much of the
daemon's cost is the preemptions rather than its code.
"""

from __future__ import annotations

import os
import struct
import sys

import trio

from cuse_ksm import abi, cli, daemon, protocol
from cuse_ksm.device import DeviceFile

_REQUEST = struct.Struct("<IIQQIIIHHQIIQII")  # fuse_in_header + fuse_ioctl_in
_REPLY = struct.Struct("<IiQiIII")  # fuse_out_header + fuse_ioctl_out
_IOCTL = int(protocol.Opcode.IOCTL)


class FloorServer(daemon.Server):
    async def serve(self) -> None:
        channel, files = self.channel, self.device.files
        async with trio.open_nursery() as nursery:
            burst = 0
            while True:
                data = None
                if burst < daemon.READ_BURST:
                    burst += 1
                    data = self._read()
                if data is None:
                    burst = 0
                    data = await self._read_waiting()
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                if len(data) >= _REQUEST.size:
                    _len, opcode, unique, _n, _u, _g, _pid, _e, _p, fh, _f, cmd, _a, _i, _o = _REQUEST.unpack_from(data)
                    if (
                        opcode == _IOCTL
                        and cmd == abi.KSM_GET_API_VERSION
                        and self.initialized
                        and type(files.get(fh)) is DeviceFile
                    ):
                        os.write(channel, _REPLY.pack(_REPLY.size, 0, unique, abi.KSM_API_VERSION, 0, 0, 0))
                        continue
                request = protocol.parse_request(data)
                if isinstance(request, protocol.Ioctl) and self.initialized:
                    reply = self._ioctl(request, nursery)
                    if reply is not None:
                        self._send(reply)
                else:
                    self._dispatch(request, nursery)


if __name__ == "__main__":
    cli.Server = FloorServer  # type: ignore[misc]
    sys.exit(cli.main(sys.argv[1:]))
