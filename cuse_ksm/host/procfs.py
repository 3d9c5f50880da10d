"""``/proc/<pid>/...``, read in one place.

The OS adapters need facts the kernel publishes there about a thread: the
memory reader its thread group (``Tgid``), the syscall borrower also its
state and tracer, the host KSM adapter what KSM made of a process.  Each
of them must tell "the process is gone" from a real error, the same way.
``status`` is ``Key:<tab>value`` lines; values keep their own spacing, only
the padding around them is dropped.
"""

from __future__ import annotations

import re

# A mapping's line in /proc/<pid>/maps (and the header lines of smaps): "start-end perms ...".
_MAPPING = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ", re.MULTILINE)


def read(tid: int, name: str) -> str | None:
    """The text of /proc/<tid>/<name>, or None when the thread is gone (or the kernel has no such file)."""
    try:
        with open(f"/proc/{tid}/{name}", encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def status(tid: int) -> dict[str, str] | None:
    """Fields of /proc/<tid>/status, or None when the thread is gone."""
    text = read(tid, "status")
    if text is None:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def tgid(tid: int) -> int:
    """The process (thread group) of thread ``tid``; ProcessLookupError when it is gone."""
    fields = status(tid)
    if fields is None:
        raise ProcessLookupError(f"thread {tid} is gone")
    return int(fields["Tgid"])


def mappings(maps: bytes) -> list[tuple[int, int]]:
    """[start, end) of each mapping in the text of /proc/<pid>/maps, in address order (as the kernel lists them)."""
    return [(int(start, 16), int(end, 16)) for start, end in _MAPPING.findall(maps)]
