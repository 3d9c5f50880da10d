"""CPU per ioctl on the daemon's request loop, on the host (no CUSE needed).

    python -m bench.requests [--case api|info] [IOCTLS]

Runs the real ``Server.serve`` loop, with its ``CuseSession``, under trio on one end of a
SOCK_SEQPACKET socketpair; a child process on the other end plays the kernel
with 64 requests in flight, as 64 client processes would keep it.  Reports
the daemon process's CPU (user and system) per ioctl: GET_API_VERSION (one
request) and GET_INFO_KTHREAD (the RETRY dance: two requests).  The figure
that matters is the one under QEMU in docs/benchmarks.md; this one shows,
in seconds instead of minutes, what a change to the request path saves.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket

import trio

from cuse_ksm import abi
from cuse_ksm import protocol as p
from cuse_ksm.daemon import Server
from cuse_ksm.device import KsmDevice
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory
from cuse_ksm.host.ptrace import borrow_from_ioctl
from cuse_ksm.session import CuseSession

IN_FLIGHT = 64


def _kernel(sock: socket.socket, requests: list[bytes], n: int) -> None:
    """The child: send ``n`` rounds of ``requests`` keeping IN_FLIGHT queued, read every reply."""
    total = n * len(requests)
    sent = received = 0
    while received < total:
        while sent < total and sent - received < IN_FLIGHT:
            sock.send(requests[sent % len(requests)])
            sent += 1
        sock.recv(4096)
        received += 1
    sock.close()


def measure(cmd: int, requests_per_ioctl: int, n: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the daemon per ioctl."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = KsmDevice(Engine(), ProcessMemory.open)
    session = CuseSession(device, dev_dir="/nonexistent")
    # The device is up: CUSE_INIT was answered (the reply goes nowhere).
    session.receive(p.parse_request(p.build_request(p.Opcode.CUSE_INIT, 0, p.CUSE_INIT_IN.pack(7, 31, 0, 0))))
    fh = device.open().fh
    out_sizes = [0, abi.STRUCT_SIZE][:requests_per_ioctl]
    requests = [
        p.build_request(p.Opcode.IOCTL, 2, p.IOCTL_IN.pack(fh, p.FUSE_IOCTL_UNRESTRICTED, cmd, 0x1000, 0, size))
        for size in out_sizes
    ]
    child = os.fork()
    if child == 0:
        ours.close()
        try:
            _kernel(theirs, requests, n)
        finally:
            os._exit(0)
    theirs.close()
    ours.setblocking(False)
    server = Server(ours.fileno(), session, borrow_from_ioctl)
    before = resource.getrusage(resource.RUSAGE_SELF)
    trio.run(server.serve)
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(child, 0)
    ours.close()
    return (after.ru_utime - before.ru_utime) / n, (after.ru_stime - before.ru_stime) / n


CASES = {
    "api": ("GET_API_VERSION", abi.KSM_GET_API_VERSION, 1),
    "info": ("GET_INFO_KTHREAD (2 requests)", abi.KSM_GET_INFO_KTHREAD, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ioctls", nargs="?", type=int, default=100_000, help="ioctls per case (default 100000)")
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="only this case (repeatable)")
    args = parser.parse_args()
    for key in args.case or list(CASES):
        name, cmd, requests = CASES[key]
        user, system = measure(cmd, requests, args.ioctls)
        print(f"{name:30s} user {user * 1e6:5.2f} us  system {system * 1e6:5.2f} us  per ioctl ({args.ioctls} ioctls)")


if __name__ == "__main__":
    main()
