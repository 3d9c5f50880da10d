"""The engine reads the registering caller's memory and no one else's, even after pid reuse (host, root).

* pid reuse: a registered process exits and a new process is forced onto
  its pid (``/proc/sys/kernel/ns_last_pid``), with memory at the very same
  address; the scanner never reads it, the pinned pagemap fd returns 0
  bytes for the dead mm - while a naive read by pid *would* get the new
  process's memory (checked, so the test can fail);
* a REGISTER names memory of the caller only: an address that the daemon
  (here, this process) maps but the caller does not is never read, and one
  both map is read from the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.engine import Engine
from cuse_ksm.engine.check import check_engine
from cuse_ksm.host.libc import Iovec, process_vm_readv
from cuse_ksm.host.procmem import ProcessMemory, pidfd_exited
from tests.conftest import needs_root

pytestmark = needs_root

NPAGES = 16
FIXED = 0x5A5A_0000_0000  # an address both processes map (MAP_FIXED_NOREPLACE)
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"

# A process that maps NPAGES pages at FIXED, fills them with BYTE, says "ready" and waits.
CHILD = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
addr, n, byte = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
got = libc.mmap(addr, n * 4096, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100000, -1, 0)
assert got == addr, (got, ctypes.get_errno())
ctypes.memset(addr, byte, n * 4096)
print("ready", flush=True)
sys.stdin.read()
"""


def spawn(byte: int, addr: int = FIXED) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(addr), str(NPAGES), str(byte)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe:
            pipe.close()


def read_by_pid(pid: int, addr: int, size: int) -> bytes | None:
    """What a naive reader that trusts the pid number would get."""
    buf = ctypes.create_string_buffer(size)
    local = Iovec(ctypes.cast(buf, ctypes.c_void_p).value, size)
    remote = Iovec(addr, size)
    got = process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return buf.raw[:got] if got > 0 else None


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        stop(p)


def spawn_on_pid(pid: int, byte: int, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str] | None:
    """Force a new process onto ``pid``: set the last pid handed out to pid - 1, then fork."""
    for _ in range(50):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        proc = spawn(byte)
        procs.append(proc)
        if proc.pid == pid:
            return proc
        stop(proc)  # something else took it first: try again
    return None


def test_pid_reuse_never_redirects_the_scanner(procs: list[subprocess.Popen[str]]) -> None:
    try:
        with open(NS_LAST_PID, "r+") as f:
            f.write(f.read())
    except OSError as e:
        pytest.skip(f"cannot set {NS_LAST_PID}: {e}")
    victim = spawn(0x11)
    procs.append(victim)
    engine = Engine()
    sma = engine.new_sma()
    space = ProcessMemory.open(victim.pid)
    engine.register(sma, space, FIXED, NPAGES)
    engine.scan_now(3 * NPAGES)
    check_engine(engine)
    assert engine.counters().pages_sharing == NPAGES - 1  # its pages were read and merged
    scanned = engine.counters().pages_scanned

    old_pid = victim.pid
    stop(victim)
    successor = spawn_on_pid(old_pid, 0x5E, procs)
    assert successor is not None, f"could not get pid {old_pid} again"
    # The setup is a real threat: by pid, the same address now holds the successor's bytes.
    assert read_by_pid(old_pid, FIXED, PAGE_SIZE) == b"\x5e" * PAGE_SIZE

    # The pinned handles know better.
    assert pidfd_exited(space.pidfd)
    assert os.pread(space.pagemap_fd, 8 * NPAGES, (FIXED >> 12) * 8) == b""
    assert not space.alive()
    buf = mmap.mmap(-1, NPAGES * PAGE_SIZE)
    assert space.read_pages(FIXED, NPAGES, buf) is None
    assert b"\x5e" not in buf[: NPAGES * PAGE_SIZE]
    assert space.read_page(FIXED) is None

    # And the scanner: the dead process's pages leave the trees, nothing of the successor enters.
    engine.scan_now(10 * NPAGES)
    check_engine(engine)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (0, 0, 0, 0)
    assert c.pages_scanned == scanned
    assert all(b"\x5e" not in kpage.data for kpage in engine.stable)
    engine.release_sma(sma)
    assert space.closed


def test_register_reads_the_callers_memory_never_the_daemons(procs: list[subprocess.Popen[str]]) -> None:
    """The address is resolved in the caller's address space, whatever the daemon has there."""
    mine = mmap.mmap(-1, NPAGES * PAGE_SIZE)  # the "daemon's" secret, duplicated pages
    mine.write(b"\x33" * (NPAGES * PAGE_SIZE))
    my_addr = ctypes.addressof(ctypes.c_char.from_buffer(mine))
    caller = spawn(0x22)  # maps FIXED, not my_addr
    procs.append(caller)
    engine = Engine()
    sma = engine.new_sma()
    try:
        engine.register(sma, ProcessMemory.open(caller.pid), my_addr, NPAGES)  # our address, their space
        engine.scan_now(5 * NPAGES)
        check_engine(engine)
        assert engine.counters().pages_scanned == 0, "read pages the caller does not have"
        assert len(engine.stable) == 0
        engine.register(sma, ProcessMemory.open(caller.pid), FIXED, NPAGES)
        engine.scan_now(5 * NPAGES)
        check_engine(engine)
        assert [kpage.data for kpage in engine.stable] == [b"\x22" * PAGE_SIZE]
    finally:
        engine.release_sma(sma)
        with contextlib.suppress(TypeError):
            mine.close()
