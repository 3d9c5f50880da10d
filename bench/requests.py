"""CPU per ioctl on the daemon's request path, on the host (no CUSE needed).

    python -m bench.requests

Feeds encoded FUSE_IOCTL requests straight to ``Server._dispatch`` (decode,
device, reply, the reply's write() into a socketpair) and reports process
CPU per ioctl: GET_API_VERSION (one request) and GET_INFO_KTHREAD (the
RETRY dance: two requests).  trio's I/O wait is not included; see
docs/benchmarks.md for the end-to-end comparison in the VM.
"""

from __future__ import annotations

import socket
import struct
import time

from cuse_ksm import abi
from cuse_ksm import protocol as p
from cuse_ksm.daemon import Server
from cuse_ksm.device import KsmDevice
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory

N = 20000


def main() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    device = KsmDevice(Engine(), ProcessMemory.open)
    server = Server(ours.fileno(), device, dev_dir="/nonexistent")
    server.initialized.set()
    fh = device.open(1).fh

    def ioctl(cmd: int, out_size: int = 0) -> bytes:
        body = struct.pack("<QIIQII", fh, p.FUSE_IOCTL_UNRESTRICTED, cmd, 0x1000, 0, out_size)
        return p.build_request(p.Opcode.IOCTL, 2, body, pid=1)

    cases = {
        "GET_API_VERSION": [ioctl(abi.KSM_GET_API_VERSION)],
        "GET_INFO_KTHREAD (2 requests)": [ioctl(abi.KSM_GET_INFO_KTHREAD), ioctl(abi.KSM_GET_INFO_KTHREAD, 24)],
    }
    for name, requests in cases.items():
        started = time.process_time()
        for _ in range(N):
            for data in requests:
                server._dispatch(p.parse_request(data), None)  # type: ignore[arg-type]  # no hand-outs here
            while True:
                try:
                    theirs.recv(4096)
                except BlockingIOError:
                    break
        per = (time.process_time() - started) / N * 1e6
        print(f"{name:32s} {per:6.2f} us CPU per ioctl ({N} ioctls)")


if __name__ == "__main__":
    main()
