"""The floor for any Python CUSE server: the daemon with GET_API_VERSION answered by a bare loop.

    python3 -m bench.cuse_c.floor_server --name ksmfloor --no-stats-dir   (repository root)

A measuring instrument, not part of the daemon.  It runs the real daemon
(CUSE_INIT, opens, every other request go through its session as usual) but
answers GET_API_VERSION on a device fd in a loop with no layers at all:
one unpack of the request, one dict lookup, one pack and one write(), the
least a Python server can do per request.  It answers each request as it
reads it, as the daemon did before it batched queued replies (see
``Server.serve``).  bench/cuse_c/floor.sh puts it next to the daemon and
the C server: pinned, the gap to the daemon is what the daemon's layers
cost per request; sharing CPUs with the clients, it shows how much of the
daemon's cost is the preemptions rather than its code.

Its loop is built from the Server's public parts (read, read_waiting, act)
and handed to the CLI, which puts everything else together as for the
daemon.
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


async def serve_floor(server: daemon.Server) -> None:
    """Server.serve without batching or lingering, and GET_API_VERSION on a device fd answered in place."""
    channel, session = server.channel, server.session
    files = session.device.files
    async with trio.open_nursery() as nursery:
        burst = 0
        while True:
            data = None
            if burst < daemon.READ_BURST:
                burst += 1
                data = server.read()
            if data is None:
                burst = 0
                data = await server.read_waiting()
            if not data:
                nursery.cancel_scope.cancel()
                return
            if len(data) >= _REQUEST.size:
                _len, opcode, unique, _n, _u, _g, _pid, _e, _p, fh, _f, cmd, _a, _i, _o = _REQUEST.unpack_from(data)
                if (
                    opcode == _IOCTL
                    and cmd == abi.KSM_GET_API_VERSION
                    and session.initialized
                    and type(files.get(fh)) is DeviceFile
                ):
                    os.write(channel, _REPLY.pack(_REPLY.size, 0, unique, abi.KSM_API_VERSION, 0, 0, 0))
                    continue
            server.act(session.receive(protocol.parse_request(data)), nursery)


if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:], serve_loop=serve_floor))
