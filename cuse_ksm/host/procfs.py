"""``/proc/<tid>/status``, read in one place.

Both OS adapters need facts the kernel publishes there about a thread: the
memory reader its thread group (``Tgid``), the syscall borrower also its
state and tracer.  The file is ``Key:<tab>value`` lines; values keep their
own spacing, only the padding around them is dropped.
"""

from __future__ import annotations


def status(tid: int) -> dict[str, str] | None:
    """Fields of /proc/<tid>/status, or None when the thread is gone."""
    try:
        with open(f"/proc/{tid}/status", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def tgid(tid: int) -> int:
    """The process (thread group) of thread ``tid``; ProcessLookupError when it is gone."""
    fields = status(tid)
    if fields is None:
        raise ProcessLookupError(f"thread {tid} is gone")
    return int(fields["Tgid"])
