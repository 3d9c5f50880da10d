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
from cuse_ksm.device import OpenFile, SmaFile

log = logging.getLogger(__name__)


def ioctl(
    req: protocol.Ioctl,
    file: OpenFile | None,
    devpath: str,
    result: int,
    out: bytes,
    started: float,
    *,
    sma_id: int = 0,
) -> None:
    """Log ``req``, answered with ``result`` and ``out`` after starting at ``started`` (time.perf_counter).

    The file is named from the daemon's side (the device or SMA n: the
    caller's fd number is not known here); ``file`` is the open file behind
    ``req.fh``, if any.  The struct is the one copied in, or for
    GET_INFO_KTHREAD the one copied out.  A negative result is shown as
    ``-1 ERRNO (text)``; the positive quirks (+1, +22) as the plain numbers
    the caller receives.  ``sma_id``: the SMA a CREATE_SHARED_MEMORY_AREA
    handed out.
    """
    ms = (time.perf_counter() - started) * 1e3
    where = f"sma#{file.sma.id}" if isinstance(file, SmaFile) else devpath if file else f"fh#{req.fh}"
    arg = describe_arg(req.cmd, req.in_data, out, req.arg)
    if result < 0:
        name = errno.errorcode.get(-result, str(-result))
        shown = f"-1 {name} ({os.strerror(-result)})"
    else:
        shown = str(result)
    extra = f" (sma#{sma_id})" if sma_id else ""
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
    """The ioctl's argument: the decoded struct when one crossed, else the raw pointer value."""
    try:
        if cmd == abi.KSM_GET_INFO_KTHREAD and len(copied_out) >= abi.STRUCT_SIZE:
            return abi.KthreadInfo.unpack(copied_out[: abi.STRUCT_SIZE]).describe()
        if len(copied_in) >= abi.STRUCT_SIZE:
            if cmd == abi.KSM_START_STOP_KTHREAD:
                return abi.KthreadInfo.unpack(copied_in[: abi.STRUCT_SIZE]).describe()
            if cmd == abi.KSM_REGISTER_MEMORY_REGION:
                return abi.MemoryRegion.unpack(copied_in[: abi.STRUCT_SIZE]).describe()
    except ValueError:
        pass
    return f"{arg:#x}" if arg else "0"
