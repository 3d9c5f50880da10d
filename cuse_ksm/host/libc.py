"""The libc entry points the OS adapters call through ctypes, declared once.

Both the memory reader (``procmem``) and the fd hand-out (``ptrace``) copy
memory across processes with process_vm_readv/writev, and ``uring`` makes
the io_uring system calls, which glibc has no wrapper for; their prototypes
live here so there is one declaration of each.
"""

from __future__ import annotations

import ctypes
import ctypes.util

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Iovec(ctypes.Structure):
    """struct iovec."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# ssize_t process_vm_readv(pid_t, const struct iovec *local, unsigned long liovcnt,
#                          const struct iovec *remote, unsigned long riovcnt, unsigned long flags)
for _fn in (libc.process_vm_readv, libc.process_vm_writev):
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)

process_vm_readv = libc.process_vm_readv
process_vm_writev = libc.process_vm_writev

# long syscall(long number, ...): variadic, so no argtypes; callers pass ctypes values.
libc.syscall.restype = ctypes.c_long
syscall = libc.syscall
