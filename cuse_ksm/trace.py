"""``--trace``: one line per completed ioctl, as strace would show it, from what the daemon saw.

The lines go to their own logger, ``cuse_ksm.trace``, which the CLI sets to
INFO, so that they show whatever the daemon's ``--log-level``.  The session
calls :func:`ioctl` only when tracing is on: off, the ioctl path does nothing
extra.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from cuse_ksm import abi, protocol
from cuse_ksm.device import DeviceFile, OpenFile, ScanFile, file_label

log = logging.getLogger(__name__)


def ioctl(
    req: protocol.Ioctl,
    file: OpenFile | None,
    devpath: str,
    result: int,
    out: bytes,
    started: float,
    *,
    handed: str = "",
) -> None:
    """Log ``req``, answered with ``result`` and ``out`` after starting at ``started`` (time.perf_counter).

    The file is named from the daemon's side (the device, ``sma#N`` or
    ``scan#N``: the caller's fd number is not known here); ``file`` is the
    open file behind ``req.fh``, if any.  The request is named with its ABI
    (:func:`cuse_ksm.abi.ioctl_name`).  The struct is the one copied in, or
    for GET_INFO_KTHREAD the one copied out.  A negative result is shown as
    ``-1 ERRNO (text)``; the positive quirks (+1, +22) as the plain numbers
    the caller receives.  ``handed``: the file a CREATE_SHARED_MEMORY_AREA
    or KSM_CREATE_SCAN handed out.
    """
    ms = (time.perf_counter() - started) * 1e3
    if isinstance(file, DeviceFile):
        where = devpath
    elif file is None:
        where = f"fh#{req.fh}"
    else:
        where = file_label(file.scan if isinstance(file, ScanFile) else file.sma)
    arg = describe_arg(req.cmd, req.in_data, out, req.arg)
    if result < 0:
        name = errno.errorcode.get(-result, str(-result))
        shown = f"-1 {name} ({os.strerror(-result)})"
    else:
        shown = str(result)
    extra = f" ({handed})" if handed else ""
    bits = " [32-bit]" if req.is_32bit else ""
    log.info(
        "trace: pid %d %s %s %s = %s%s <%.3f ms>%s",
        req.pid,
        where,
        abi.ioctl_name(req.cmd),
        arg,
        shown,
        extra,
        ms,
        bits,
    )


def describe_arg(cmd: int, copied_in: bytes, copied_out: bytes, arg: int) -> str:
    """The ioctl's argument: the decoded struct when one crossed (in, or out for GET_INFO), else the raw pointer."""
    call = abi.CALLS.get(cmd)
    crossed = copied_out or copied_in
    if call is not None and call.struct is not None and len(crossed) >= call.struct.FORMAT.size:
        return call.struct.unpack(crossed[: call.struct.FORMAT.size]).describe()
    return f"{arg:#x}" if arg else "0"
