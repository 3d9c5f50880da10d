"""The wire codec: layouts of the kernel's fuse.h, and clear errors on bad bytes."""

import struct

import pytest

from cuse_ksm import protocol as p


def header(length, opcode, unique, pid=1234):
    return struct.pack("<IIQQIIIHH", length, opcode, unique, 0, 1000, 1000, pid, 0, 0)


def test_parse_ioctl_with_data():
    body = struct.pack("<QIIQII", 7, p.FUSE_IOCTL_UNRESTRICTED, 0x4018AB02, 0x7FFD0000, 24, 0) + b"x" * 24
    req = p.parse_request(header(40 + len(body), 39, 99) + body)
    assert isinstance(req, p.Ioctl)
    assert (req.fh, req.cmd, req.arg, len(req.in_data), req.out_size) == (7, 0x4018AB02, 0x7FFD0000, 24, 0)
    assert req.in_data == b"x" * 24
    assert req.pid == 1234 and req.unique == 99
    assert not req.is_32bit


def test_parse_each_supported_opcode():
    def build(op, body):
        return p.parse_request(p.build_request(op, 5, body, pid=42))

    init = build(p.Opcode.CUSE_INIT, struct.pack("<IIII", 7, 38, 0, 1))
    assert isinstance(init, p.CuseInit) and (init.major, init.minor) == (7, 38)
    assert isinstance(build(p.Opcode.OPEN, struct.pack("<II", 2, 0)), p.Open)
    rel = build(p.Opcode.RELEASE, struct.pack("<QIIQ", 9, 0, 0, 0))
    assert isinstance(rel, p.Release) and rel.fh == 9
    assert isinstance(build(p.Opcode.FLUSH, struct.pack("<QIIQ", 9, 0, 0, 0)), p.Flush)
    intr = build(p.Opcode.INTERRUPT, struct.pack("<Q", 77))
    assert isinstance(intr, p.Interrupt) and intr.target == 77
    assert isinstance(build(p.Opcode.DESTROY, b""), p.Destroy)
    assert isinstance(build(p.Opcode.READ, struct.pack("<QQIIQII", 0, 0, 0, 0, 0, 0, 0)), p.Unsupported)
    assert isinstance(build(12345, b""), p.Unsupported)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "shorter than"),
        (b"\x00" * 39, "shorter than"),
        (header(100, 39, 1), "header says 100"),
        (header(48, 39, 1) + b"\x00" * 8, "needs 32"),
        (header(40 + 32, 39, 1) + struct.pack("<QIIQII", 1, 0, 0, 0, 24, 0), "announces 24"),
        (header(40, 4096, 1), "needs 16"),
    ],
)
def test_malformed_requests_raise_protocol_error(data, message):
    with pytest.raises(p.ProtocolError, match=message):
        p.parse_request(data)


def test_reply_layouts():
    assert p.reply_error(5, 38) == struct.pack("<IiQ", 16, -38, 5)
    assert p.reply_empty(6) == struct.pack("<IiQ", 16, 0, 6)
    assert p.reply_open(7, 3) == struct.pack("<IiQ", 32, 0, 7) + struct.pack("<QII", 3, 0, 0)
    out = p.reply_ioctl(8, 22, b"abc")
    assert out == struct.pack("<IiQ", 35, 0, 8) + struct.pack("<iIII", 22, 0, 0, 0) + b"abc"
    retry = p.reply_ioctl_retry(9, 0x1000, 24, 16)
    assert retry == (
        struct.pack("<IiQ", 16 + 16 + 32, 0, 9)
        + struct.pack("<iIII", 0, p.FUSE_IOCTL_RETRY, 1, 1)
        + struct.pack("<QQ", 0x1000, 24)
        + struct.pack("<QQ", 0x1000, 16)
    )
    # One way only: one range, and the other count 0.
    assert p.reply_ioctl_retry(10, 0x3000, 0, 24) == (
        struct.pack("<IiQ", 16 + 16 + 16, 0, 10)
        + struct.pack("<iIII", 0, p.FUSE_IOCTL_RETRY, 0, 1)
        + struct.pack("<QQ", 0x3000, 24)
    )
    with pytest.raises(ValueError):
        p.reply_error(1, -5)


def test_cuse_init_reply_names_the_device_and_unrestricts_ioctls():
    raw = p.reply_cuse_init(1, "ksm", minor=31)
    length, error, unique = struct.unpack_from("<IiQ", raw)
    assert (length, error, unique) == (len(raw), 0, 1)
    major, minor, _unused, flags, _max_read, max_write, dev_major, dev_minor = struct.unpack_from("<8I", raw, 16)
    assert (major, minor, flags) == (7, 31, p.CUSE_UNRESTRICTED_IOCTL)
    assert (dev_major, dev_minor) == (0, 0) and max_write >= 4096
    assert raw[16 + 72 :] == b"DEVNAME=ksm\0"
    with pytest.raises(ValueError):
        p.reply_cuse_init(1, "a/b", minor=31)
