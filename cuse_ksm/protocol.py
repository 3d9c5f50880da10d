"""The CUSE/FUSE wire protocol, sans I/O: bytes in, typed requests out, replies to bytes.

Nothing in this module touches a file descriptor.  The daemon reads one request
per ``read()`` of ``/dev/cuse`` and hands the bytes to :func:`parse_request`; it
writes whatever a ``reply_*`` function returns as one ``write()``.  Layouts are
those of ``include/uapi/linux/fuse.h`` (protocol 7.x, little-endian on x86_64).

Only the requests a character device needs are decoded; any other opcode comes
out as :class:`Unsupported`, which the caller answers with ENOSYS.  Malformed
input (short header, length field that disagrees with the buffer, body too short
for its opcode) raises :class:`ProtocolError` and never a bare ``struct.error``.

Every request carries two fields of ``fuse_in_header``: ``unique``, which its
reply must echo, and ``pid``, the calling thread.  The others are dropped: a
character device has a single node, and the kernel checked the caller's
access when it opened it.

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
_IOCTL_COMPAT = FUSE_IOCTL_32BIT | FUSE_IOCTL_COMPAT


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
class CuseInit:
    unique: int  # the request's id: its reply carries it back
    pid: int  # kernel thread id (tid) of the caller, 0 for the kernel's own requests
    major: int
    minor: int
    flags: int


@dataclass(slots=True)
class Open:
    unique: int
    pid: int
    flags: int


@dataclass(slots=True)
class Release:
    unique: int
    pid: int
    fh: int
    flags: int


@dataclass(slots=True)
class Flush:
    unique: int
    pid: int
    fh: int


@dataclass(slots=True)
class Interrupt:
    """The caller of request ``target`` got a signal.  Never answered."""

    unique: int
    pid: int
    target: int


@dataclass(slots=True)
class Destroy:
    unique: int
    pid: int


@dataclass(slots=True)
class Ioctl:
    unique: int
    pid: int
    fh: int
    cmd: int
    arg: int  # the caller's pointer argument, as an integer
    out_size: int  # how many bytes the reply may copy out to it
    in_data: bytes  # the bytes copied in from it (fuse_ioctl_in.in_size of them)
    # Issued by a 32-bit (compat) task: the 2009 driver had no compat_ioctl.
    # A field rather than a property: it is read for every ioctl.
    is_32bit: bool


@dataclass(slots=True)
class Unsupported:
    """Any other opcode; answer ENOSYS."""

    unique: int
    pid: int
    opcode: int


Request = CuseInit | Open | Release | Flush | Interrupt | Destroy | Ioctl | Unsupported


def _too_short(data: bytes, layout: struct.Struct, opcode: int) -> ProtocolError:
    return ProtocolError(f"opcode {opcode}: body of {len(data) - IN_HEADER.size} bytes, needs {layout.size}")


def _body(data: bytes, layout: struct.Struct, opcode: int) -> tuple[int, ...]:
    if len(data) < IN_HEADER.size + layout.size:
        raise _too_short(data, layout, opcode)
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
# The header and an ioctl's fixed part, decoded together in one call.
_IOCTL_REQUEST = struct.Struct("<" + IN_HEADER.format[1:] + IOCTL_IN.format[1:])
_IOCTL_DATA = _IOCTL_REQUEST.size


def parse_request(data: bytes) -> Request:
    """Decode one request as read from ``/dev/cuse``."""
    size = len(data)
    # IOCTL first, header and body in one unpack: it is nearly every request
    # a running device sees.  Anything else, a malformed ioctl included, takes
    # the general path below.
    if size >= _IOCTL_DATA:
        length, opcode, unique, _nodeid, _uid, _gid, pid, _extlen, _pad, fh, flags, cmd, arg, in_size, out_size = (
            _IOCTL_REQUEST.unpack_from(data)
        )
        if opcode == _IOCTL and length == size:
            if size - _IOCTL_DATA != in_size:
                raise ProtocolError(f"ioctl announces {in_size} bytes of input, carries {size - _IOCTL_DATA}")
            in_data = data[_IOCTL_DATA:]
            return Ioctl(unique, pid, fh, cmd, arg, out_size, in_data, flags & _IOCTL_COMPAT != 0)
    if size < IN_HEADER.size:
        raise ProtocolError(f"request of {size} bytes is shorter than the {IN_HEADER.size}-byte header")
    length, opcode, unique, _nodeid, _uid, _gid, pid, _extlen, _pad = IN_HEADER.unpack_from(data)
    if length != size:
        raise ProtocolError(f"header says {length} bytes, buffer holds {size}")
    if opcode == _IOCTL:
        raise _too_short(data, IOCTL_IN, opcode)  # a complete one was decoded above
    if opcode == _OPEN:
        flags, _open_flags = _body(data, OPEN_IN, opcode)
        return Open(unique, pid, flags)
    if opcode == _RELEASE:
        fh, flags, _rflags, _owner = _body(data, RELEASE_IN, opcode)
        return Release(unique, pid, fh, flags)
    if opcode == _FLUSH:
        fh, _unused, _pad2, _owner = _body(data, FLUSH_IN, opcode)
        return Flush(unique, pid, fh)
    if opcode == _INTERRUPT:
        (target,) = _body(data, INTERRUPT_IN, opcode)
        return Interrupt(unique, pid, target)
    if opcode == _CUSE_INIT:
        major, minor, _unused, flags = _body(data, CUSE_INIT_IN, opcode)
        return CuseInit(unique, pid, major, minor, flags)
    if opcode == _DESTROY:
        return Destroy(unique, pid)
    return Unsupported(unique, pid, opcode)


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


def reply_ioctl_retry(unique: int, arg: int, copy_in: int, copy_out: int) -> bytes:
    """Ask the kernel to call again with the caller's memory at ``arg``: ``copy_in`` bytes in, ``copy_out`` out.

    With unrestricted ioctls the first call carries no data; this names the
    bytes at the caller's pointer to copy in for the retried call, and how
    many the reply may copy out to it.  FUSE takes lists of ranges; every
    /dev/ksm command passes one struct at its argument, so this asks for at
    most one range each way.
    """
    iovs = b""
    if copy_in:
        iovs += IOCTL_IOVEC.pack(arg, copy_in)
    if copy_out:
        iovs += IOCTL_IOVEC.pack(arg, copy_out)
    head = IOCTL_OUT.pack(0, FUSE_IOCTL_RETRY, 1 if copy_in else 0, 1 if copy_out else 0)
    return _reply(unique, 0, head + iovs)


def parse_reply_header(data: bytes) -> tuple[int, int, int]:
    """``(len, error, unique)`` of a reply: for tests and traces."""
    return OUT_HEADER.unpack_from(data)


def build_request(
    opcode: int, unique: int, body: bytes = b"", *, pid: int = 0, uid: int = 0, gid: int = 0, nodeid: int = 0
) -> bytes:
    """Encode a request as the kernel writes it to ``/dev/cuse``.

    The daemon never calls this (it only parses requests).  It is how the
    host tests' fake kernel (a SOCK_SEQPACKET socketpair standing in for
    ``/dev/cuse``) and ``bench.requests`` feed the real ``Server``, and how the
    codec tests build their input.
    """
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid, 0, 0) + body
