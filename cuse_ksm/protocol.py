"""The CUSE/FUSE wire protocol, sans I/O: bytes in, typed requests out, replies to bytes.

Nothing in this module touches a file descriptor.  The daemon reads one request
per ``read()`` of ``/dev/cuse`` and hands the bytes to :func:`parse_request`; it
writes whatever a ``reply_*`` function returns as one ``write()``.  Layouts are
those of ``include/uapi/linux/fuse.h`` (protocol 7.x, little-endian on x86_64).

Only the requests a character device needs are decoded; any other opcode comes
out as :class:`Unsupported`, which the caller answers with ENOSYS.  Malformed
input (short header, length field that disagrees with the buffer, body too short
for its opcode) raises :class:`ProtocolError` and never a bare ``struct.error``.

Requests are slotted dataclasses, treated as values but not ``frozen``: a
frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``
and made decoding four times slower, on the path every ioctl takes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

FUSE_KERNEL_VERSION = 7
# Minor version we speak.  CUSE requires >= 11; everything used here exists in 7.11.
FUSE_KERNEL_MINOR_VERSION = 31

CUSE_UNRESTRICTED_IOCTL = 1 << 0

FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2
FUSE_IOCTL_32BIT = 1 << 3
FUSE_IOCTL_DIR = 1 << 4
FUSE_IOCTL_COMPAT_X32 = 1 << 5
FUSE_IOCTL_MAX_IOV = 256

# The kernel refuses a read() of /dev/cuse shorter than this (FUSE_MIN_READ_BUFFER).
MIN_READ_BUFFER = 8192


class Opcode(enum.IntEnum):
    OPEN = 14
    READ = 15
    WRITE = 16
    RELEASE = 18
    FLUSH = 25
    INTERRUPT = 36
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    CUSE_INIT = 4096


class ProtocolError(ValueError):
    """The bytes are not a well-formed FUSE request."""


IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
CUSE_INIT_IN = struct.Struct("<IIII")  # major minor unused flags
# major minor unused flags max_read max_write dev_major dev_minor spare[10]
CUSE_INIT_OUT = struct.Struct("<IIIIIIII40x")
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
INTERRUPT_IN = struct.Struct("<Q")  # unique
IOCTL_IN = struct.Struct("<QIIQII")  # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("<iIII")  # result flags in_iovs out_iovs
IOCTL_IOVEC = struct.Struct("<QQ")  # base len
_IOCTL_REPLY = struct.Struct("<IiQiIII")  # OUT_HEADER + IOCTL_OUT, packed at once for every ioctl reply


@dataclass(slots=True)
class Header:
    """The parts of ``fuse_in_header`` a request handler needs."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int  # kernel thread id (tid) of the caller


@dataclass(slots=True)
class CuseInit:
    header: Header
    major: int
    minor: int
    flags: int


@dataclass(slots=True)
class Open:
    header: Header
    flags: int


@dataclass(slots=True)
class Release:
    header: Header
    fh: int
    flags: int


@dataclass(slots=True)
class Flush:
    header: Header
    fh: int


@dataclass(slots=True)
class Interrupt:
    """The caller of request ``target`` got a signal.  Never answered."""

    header: Header
    target: int


@dataclass(slots=True)
class Destroy:
    header: Header


@dataclass(slots=True)
class Ioctl:
    header: Header
    fh: int
    flags: int
    cmd: int
    arg: int  # the caller's pointer argument, as an integer
    in_size: int
    out_size: int
    in_data: bytes

    @property
    def is_32bit(self) -> bool:
        """Issued by a 32-bit (compat) task: the 2009 driver had no compat_ioctl."""
        return bool(self.flags & (FUSE_IOCTL_32BIT | FUSE_IOCTL_COMPAT))


@dataclass(slots=True)
class Unsupported:
    """Any other opcode; answer ENOSYS."""

    header: Header


Request = CuseInit | Open | Release | Flush | Interrupt | Destroy | Ioctl | Unsupported


def _body(data: bytes, layout: struct.Struct, opcode: int) -> tuple[int, ...]:
    if len(data) < IN_HEADER.size + layout.size:
        raise ProtocolError(f"opcode {opcode}: body of {len(data) - IN_HEADER.size} bytes, needs {layout.size}")
    return layout.unpack_from(data, IN_HEADER.size)


# Plain ints for the dispatch in parse_request: comparing with an IntEnum
# member costs an attribute lookup through the enum's metaclass each time.
_IOCTL, _OPEN, _RELEASE, _FLUSH, _INTERRUPT, _CUSE_INIT, _DESTROY = (
    int(op)
    for op in (
        Opcode.IOCTL,
        Opcode.OPEN,
        Opcode.RELEASE,
        Opcode.FLUSH,
        Opcode.INTERRUPT,
        Opcode.CUSE_INIT,
        Opcode.DESTROY,
    )
)
_IOCTL_DATA = IN_HEADER.size + IOCTL_IN.size


def parse_request(data: bytes) -> Request:
    """Decode one request as read from ``/dev/cuse``."""
    if len(data) < IN_HEADER.size:
        raise ProtocolError(f"request of {len(data)} bytes is shorter than the {IN_HEADER.size}-byte header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(data)
    if length != len(data):
        raise ProtocolError(f"header says {length} bytes, buffer holds {len(data)}")
    h = Header(opcode, unique, nodeid, uid, gid, pid)
    # IOCTL first: it is nearly every request a running device sees.
    if opcode == _IOCTL:
        fh, flags, cmd, arg, in_size, out_size = _body(data, IOCTL_IN, opcode)
        in_data = bytes(data[_IOCTL_DATA:])
        if len(in_data) != in_size:
            raise ProtocolError(f"ioctl announces {in_size} bytes of input, carries {len(in_data)}")
        return Ioctl(h, fh, flags, cmd, arg, in_size, out_size, in_data)
    if opcode == _OPEN:
        flags, _open_flags = _body(data, OPEN_IN, opcode)
        return Open(h, flags)
    if opcode == _RELEASE:
        fh, flags, _rflags, _owner = _body(data, RELEASE_IN, opcode)
        return Release(h, fh, flags)
    if opcode == _FLUSH:
        fh, _unused, _pad2, _owner = _body(data, FLUSH_IN, opcode)
        return Flush(h, fh)
    if opcode == _INTERRUPT:
        (target,) = _body(data, INTERRUPT_IN, opcode)
        return Interrupt(h, target)
    if opcode == _CUSE_INIT:
        major, minor, _unused, flags = _body(data, CUSE_INIT_IN, opcode)
        return CuseInit(h, major, minor, flags)
    if opcode == _DESTROY:
        return Destroy(h)
    return Unsupported(h)


def _reply(unique: int, error: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload


def reply_error(unique: int, errno: int) -> bytes:
    """A failed request: ``errno`` is positive (ENOSYS, EINVAL...)."""
    if errno <= 0:
        raise ValueError(f"errno must be positive, got {errno}")
    return _reply(unique, -errno)


def reply_empty(unique: int) -> bytes:
    """Success with no payload (RELEASE, FLUSH, DESTROY)."""
    return _reply(unique, 0)


def reply_cuse_init(
    unique: int,
    devname: str,
    *,
    minor: int,
    max_read: int = 4096,
    max_write: int = 4096,
    flags: int = CUSE_UNRESTRICTED_IOCTL,
) -> bytes:
    """Accept CUSE_INIT and name the device: it appears as ``/dev/<devname>``.

    ``minor`` is the protocol minor to agree on: the smaller of the kernel's
    and ours.  Device numbers 0/0 let the kernel pick a free dynamic major.
    """
    if not devname or "\0" in devname or "/" in devname:
        raise ValueError(f"bad device name {devname!r}")
    info = f"DEVNAME={devname}\0".encode()
    body = CUSE_INIT_OUT.pack(FUSE_KERNEL_VERSION, minor, 0, flags, max_read, max_write, 0, 0)
    return _reply(unique, 0, body + info)


def reply_open(unique: int, fh: int, open_flags: int = 0) -> bytes:
    return _reply(unique, 0, OPEN_OUT.pack(fh, open_flags, 0))


def reply_ioctl(unique: int, result: int, out_data: bytes = b"") -> bytes:
    """The ioctl's return value as the caller sees it, and the bytes copied out.

    ``result`` travels unchanged to the caller's ``ioctl()``: a positive value is
    a success the caller sees as that number, a value in -4095..-1 sets errno.
    """
    return _IOCTL_REPLY.pack(_IOCTL_REPLY.size + len(out_data), 0, unique, result, 0, 0, 0) + out_data


def reply_ioctl_retry(unique: int, in_iovs: list[tuple[int, int]], out_iovs: list[tuple[int, int]]) -> bytes:
    """Ask the kernel to call again with the caller's memory: ``(address, length)`` lists.

    With unrestricted ioctls the first call carries no data; this names which
    ranges of the caller to copy in for the retried call, and which to copy
    the reply's data out to.
    """
    if len(in_iovs) + len(out_iovs) > FUSE_IOCTL_MAX_IOV:
        raise ValueError("too many iovecs")
    head = IOCTL_OUT.pack(0, FUSE_IOCTL_RETRY, len(in_iovs), len(out_iovs))
    iovs = b"".join(IOCTL_IOVEC.pack(base, length) for base, length in [*in_iovs, *out_iovs])
    return _reply(unique, 0, head + iovs)


def parse_reply_header(data: bytes) -> tuple[int, int, int]:
    """``(len, error, unique)`` of a reply: for tests and traces."""
    return OUT_HEADER.unpack_from(data)


def build_request(
    opcode: int, unique: int, body: bytes = b"", *, pid: int = 0, uid: int = 0, gid: int = 0, nodeid: int = 0
) -> bytes:
    """Encode a request as the kernel would: used by tests and the host-side loopback transport."""
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid, 0, 0) + body
