"""ProcessMemory's reading side and the engine on real child processes (host, root)."""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import closing

import pytest

from cuse_ksm.abi import PAGE_COPIED, PAGE_SIZE, PAGE_ZERO
from cuse_ksm.engine import Engine, ReadDone
from cuse_ksm.engine.check import check_engine
from cuse_ksm.engine.scanner import WINDOW_PAGES
from cuse_ksm.host import procmem, uring
from cuse_ksm.host.procmem import ProcessMemory, pidfd_exited
from tests.conftest import needs_root
from tests.engine.fakes import full_scans
from tests.host.child import Child

pytestmark = needs_root


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def spawn(children: list[Child], npages: int) -> Child:
    child = Child.start(npages)
    children.append(child)
    return child


def test_reads_present_pages_and_never_faults_in_the_others(children: list[Child]) -> None:
    child = spawn(children, 64)
    child.fill(0, 8, 0x11)
    child.fill(20, 4, 0x22)
    with closing(ProcessMemory.open(child.pid)) as space:
        buf = mmap.mmap(-1, 64 * PAGE_SIZE)
        present = space.read_pages(child.addr, 64, buf)
        assert present == bytes([1] * 8 + [0] * 12 + [1] * 4 + [0] * 40)
        assert buf[: 8 * PAGE_SIZE] == b"\x11" * (8 * PAGE_SIZE)
        assert buf[20 * PAGE_SIZE : 24 * PAGE_SIZE] == b"\x22" * (4 * PAGE_SIZE)
        # Reading did not fault anything in.
        assert space.present(child.addr, 64) == present
        assert space.read_page(child.page_addr(21)) == b"\x22" * PAGE_SIZE
        assert space.read_page(child.page_addr(30)) is None


def test_pages_only_read_map_the_zero_page_and_are_not_scanned(children: list[Child]) -> None:
    """As the kernel's KSM: a page never written holds no memory of its own to merge.

    The read marks such pages PAGE_ZERO (copied: no), so that `cuse-ksm pages` can say why.
    """
    child = spawn(children, 32)
    child.fill(0, 8, 0)  # written zeros: eight private pages that happen to be zero
    child.touch(8, 16)  # read only: all map the shared zero page
    space = ProcessMemory.open(child.pid)
    engine = Engine()
    try:
        assert space.present(child.addr, 32) == bytes([1] * 8 + [PAGE_ZERO] * 16 + [0] * 8)
        engine.register(engine.new_sma(), space, child.addr, 32)
        full_scans(engine, 3)
        c = engine.counters()
        assert (c.pages_shared, c.pages_sharing) == (1, 7)  # not 1/23
        check_engine(engine)
    finally:
        engine.release_sma(next(iter(engine.smas.values())))


def test_unmapped_range_reads_as_not_present(children: list[Child]) -> None:
    child = spawn(children, 16)
    child.fill(0, 16, 0x33)
    with closing(ProcessMemory.open(child.pid)) as space:
        child.unmap(4, 4)
        buf = mmap.mmap(-1, 16 * PAGE_SIZE)
        assert space.read_pages(child.addr, 16, buf) == bytes([1] * 4 + [0] * 4 + [1] * 8)
        # Far beyond the user address space: nothing there, and no error.
        assert space.read_pages(0xFFFF_FFFF_F000, 4, buf) == bytes(4)


def test_protected_pages_are_read_as_the_kernels_scanner_reads_them(children: list[Child]) -> None:
    """PROT_NONE takes nothing from what ksmd sees (it reads the page itself), nor from what we see.

    /proc/<tid>/mem reads with FOLL_FORCE, as a debugger does.
    """
    child = spawn(children, 16)
    child.fill(0, 16, 0x44)
    child.protect(3, 1)
    child.protect(9, 2)
    with closing(ProcessMemory.open(child.pid)) as space:
        buf = mmap.mmap(-1, 16 * PAGE_SIZE)
        assert space.read_pages(child.addr, 16, buf) == bytes([1] * 16)
        assert buf[:] == b"\x44" * (16 * PAGE_SIZE)


def test_exit_makes_the_space_gone(children: list[Child]) -> None:
    child = spawn(children, 4)
    child.fill(0, 4, 1)
    with closing(ProcessMemory.open(child.pid)) as space:
        assert space.alive()
        child.exit()
        buf = mmap.mmap(-1, 4 * PAGE_SIZE)
        assert space.read_pages(child.addr, 4, buf) is None
        assert not space.alive()
        # The pinned pagemap fd returns nothing once the mm is gone.
        assert os.pread(space.pagemap_fd, 8, 0) == b""


def test_exec_makes_the_space_gone_though_the_pid_lives_on(children: list[Child]) -> None:
    child = spawn(children, 4)
    child.fill(0, 4, 1)
    with closing(ProcessMemory.open(child.pid)) as space:
        child.exec_sleep()
        assert not pidfd_exited(space.pidfd)  # same process, same pid ...
        buf = mmap.mmap(-1, 4 * PAGE_SIZE)
        assert space.read_pages(child.addr, 4, buf) is None  # ... but not the memory we pinned


def frame(pid: int, addr: int) -> int:
    """The physical frame behind ``addr`` in process ``pid`` (root: pagemap shows frames)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        entry = int.from_bytes(os.pread(f.fileno(), 8, (addr // PAGE_SIZE) * 8), "little")
    assert entry >> 63, "not present"
    return entry & ((1 << 55) - 1)


def test_reading_leaves_a_shared_page_shared() -> None:
    """A page shared between processes stays one page after our read.

    A page left shared by fork() is, like a page KSM merged, not exclusive to
    either process: a read-only pin of it, which process_vm_readv takes, makes
    the kernel copy it first (Linux 5.19+), so the client would use more
    memory once scanned.  /proc/<tid>/mem takes no pin.
    """
    buf = mmap.mmap(-1, 4 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[:] = b"\x6b" * (4 * PAGE_SIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)
        os._exit(0)
    try:
        shared = [frame(os.getpid(), addr + i * PAGE_SIZE) for i in range(4)]
        assert [frame(pid, addr + i * PAGE_SIZE) for i in range(4)] == shared  # fork shares them
        with closing(ProcessMemory.open(pid)) as space:
            into = mmap.mmap(-1, 4 * PAGE_SIZE)
            assert space.read_pages(addr, 4, into) == bytes([1] * 4)
            assert into[:] == b"\x6b" * (4 * PAGE_SIZE)
        assert [frame(pid, addr + i * PAGE_SIZE) for i in range(4)] == shared, "the read copied the pages"
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def register(engine: Engine, child: Child, npages: int, first: int = 0) -> None:
    sma = engine.new_sma()
    engine.register(sma, ProcessMemory.open(child.pid), child.page_addr(first), npages)


@pytest.mark.parametrize("n", [2, 50, 600])
def test_identical_pages_across_two_processes(children: list[Child], n: int) -> None:
    a, b = spawn(children, n), spawn(children, n)
    first = n // 2
    a.fill(0, first, 0x5A)
    b.fill(0, n - first, 0x5A)
    engine = Engine()
    register(engine, a, n)
    register(engine, b, n)
    full_scans(engine, 1)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (0, 0)
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, n - 1)
    assert c.pages_scanned == 2 * n  # the untouched halves were skipped
    check_engine(engine)


def test_written_merged_page_is_unshared_and_volatile_page_not_merged(children: list[Child]) -> None:
    a = spawn(children, 8)
    a.fill(0, 8, 7)
    engine = Engine()
    register(engine, a, 8)
    full_scans(engine, 2)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 7)
    a.fill(3, 1, 8)  # a write to a merged page: COW
    full_scans(engine, 1)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 6)
    check_engine(engine)


def test_pages_equal_but_for_their_last_8_bytes_never_merge(children: list[Child]) -> None:
    a = spawn(children, 300)
    a.fill(0, 300, 0)
    a.stamp(0, 300, PAGE_SIZE - 8)
    engine = Engine()
    register(engine, a, 300)
    full_scans(engine, 3)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (0, 0, 300)


def test_exit_unmap_and_remove_mid_scan(children: list[Child]) -> None:
    a, b, c = spawn(children, 512), spawn(children, 512), spawn(children, 512)
    for child in (a, b, c):
        child.fill(0, 512, 0x42)
    engine = Engine()
    register(engine, a, 512)
    register(engine, b, 512)
    register(engine, c, 512)
    full_scans(engine, 2)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 1535)
    engine.scan_now(300)  # mid-slot
    a.exit()
    b.unmap(0, 256)
    full_scans(engine, 1)
    cnt = engine.counters()
    assert (cnt.pages_shared, cnt.pages_sharing) == (1, 767)
    check_engine(engine)
    engine.scan_now(700)
    engine.remove_regions(engine.slots[2].sma)
    cnt = engine.counters()
    assert (cnt.pages_shared, cnt.pages_sharing) == (1, 255)
    check_engine(engine)
    for sma in list(engine.smas.values()):
        engine.release_sma(sma)
    cnt = engine.counters()
    assert (cnt.pages_shared, cnt.pages_sharing, cnt.pages_unshared, cnt.pages_volatile) == (0, 0, 0, 0)
    assert engine.errors == 0


@pytest.mark.parametrize("query", [True, False], ids=["PROCMAP_QUERY", "text"])
def test_mapped_reads_the_mappings_through_the_pinned_maps_fd(
    children: list[Child], query: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(procmem, "_procmap_query", query)  # the text: kernels before 6.11, as the VM's 6.1
    child = spawn(children, 64)
    child.fill(0, 64, 1)
    with closing(ProcessMemory.open(child.pid)) as space:
        assert space.mapped(child.addr, 64) == [(child.addr, child.page_addr(64))]
        child.unmap(16, 16)
        assert space.mapped(child.addr, 64) == [
            (child.addr, child.page_addr(16)),
            (child.page_addr(32), child.page_addr(64)),
        ]
        assert space.mapped(child.page_addr(16), 16) == []
        # A range past the top of the address space has nothing mapped, and no error.
        assert space.mapped((1 << 64) - 4 * PAGE_SIZE, 2**32 - 1) == []
        child.exec_sleep()
        assert space.mapped(child.addr, 64) is None  # the mm we pinned is gone, the pid lives on


def test_the_issues_example_merges_within_two_passes_over_a_real_process(children: list[Child]) -> None:
    """Issue 14: 2^32-1 pages at an unmapped address registered first, then 256 identical pages."""
    child = spawn(children, 256)
    child.fill(0, 256, 7)
    hole = 0x1000_0000_0000
    engine = Engine()
    space = ProcessMemory.open(child.pid)
    assert space.mapped(hole, 2**32 - 1) == [], "the test needs this range unmapped"
    sma = engine.new_sma()
    engine.register(sma, space, hole, 2**32 - 1)
    engine.register(sma, space, child.addr, 256)
    assert engine.scan_now(512) == 512  # two passes of the real pages, as two rounds of `ksmctl start 256 ...`
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_scanned) == (1, 255, 512)
    assert [engine.mapped_pages(s) for s in engine.slots] == [0, 256]
    check_engine(engine)
    engine.remove_regions(sma)


# -- reads started ahead through io_uring (ProcessMemory.start_read) -------------------------------

needs_uring = pytest.mark.skipif(uring.ring() is None, reason="io_uring on x86_64 only")


class SyncMemory(ProcessMemory):
    """ProcessMemory with every read made at once, as before the read-ahead."""

    def start_read(self, addr: int, npages: int, into: mmap.mmap) -> ReadDone:
        return ReadDone(self.read_pages(addr, npages, into))


def states(engine: Engine) -> list[dict[int, bytes]]:
    return [{ci: chunk.state.tobytes() for ci, chunk in slot.chunks.items()} for slot in engine.slots]


@needs_uring
def test_scanning_with_reads_ahead_gives_what_synchronous_reads_give(
    children: list[Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 5 * WINDOW_PAGES + 77
    a, b = spawn(children, n), spawn(children, n)
    for child in (a, b):
        child.fill(0, n, 0)
        child.stamp(0, n, 0)  # every page unique within the child, the same pair across the two
    a.fill(100, 900, 0x11)
    b.fill(2000, 300, 0x11)
    b.unmap(1500, 200)  # a hole: no read ahead crosses it
    submitted = []
    submit = procmem._Read.submit

    def counted(read: procmem._Read, ring: uring.Ring) -> bool:
        ok = submit(read, ring)
        submitted.append(ok)
        return ok

    monkeypatch.setattr(procmem._Read, "submit", counted)
    engines = []
    for kind in (ProcessMemory, SyncMemory):
        engine = Engine()
        for child in (a, b):
            engine.register(engine.new_sma(), kind.open(child.pid), child.addr, n)
        engines.append(engine)
    ahead, sync = engines
    for n_pass in range(4):
        for engine in engines:
            full_scans(engine, 1)
            check_engine(engine)
        assert ahead.counters() == sync.counters()
        assert states(ahead) == states(sync)
        if n_pass == 1:
            a.fill(300, 50, 0x22)  # merged pages written: COW
            b.stamp(2100, 20, 8)
    c = ahead.counters()
    assert c.pages_shared >= 2 and c.pages_sharing > 1000 and c.pages_unshared > 0
    assert submitted and all(submitted)  # the io_uring path ran
    for engine in engines:
        for sma in list(engine.smas.values()):
            engine.release_sma(sma)


@needs_uring
def test_close_waits_for_a_read_in_flight_before_closing_its_fds(children: list[Child]) -> None:
    n = 8192  # 32 MiB: the copy takes milliseconds
    child = spawn(children, n)
    child.fill(0, n, 0x5A)
    space = ProcessMemory.open(child.pid)
    buf = mmap.mmap(-1, n * PAGE_SIZE)
    read = space.start_read(child.addr, n, buf)
    assert isinstance(read, procmem._Read) and space.inflight == [read] and not read.ready()
    mem_fd = space.mem_fd
    space.close()
    # Done before close() returned: the kernel's worker no longer holds mem_fd's number...
    assert space.inflight == [] and read.ready()
    # ... which the next opens may take, and the read did not go there.
    with tempfile.TemporaryFile() as f:
        f.write(b"\xee" * PAGE_SIZE)
        f.flush()
        fds = [os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY) for _ in range(4)]
    try:
        assert mem_fd in fds
        assert buf[-PAGE_SIZE:] == b"\x5a" * PAGE_SIZE and buf[:PAGE_SIZE] == b"\x5a" * PAGE_SIZE
        assert read.result() is None  # closed: its owner gets "gone"
    finally:
        for fd in fds:
            os.close(fd)


@needs_uring
def test_a_read_ahead_collected_after_its_process_exited_says_gone(children: list[Child]) -> None:
    n = 4 * WINDOW_PAGES
    child = spawn(children, n)
    child.fill(0, n, 0x33)
    space = ProcessMemory.open(child.pid)
    buf = mmap.mmap(-1, n * PAGE_SIZE)
    read = space.start_read(child.addr, n, buf)
    assert space.inflight == [read]
    child.exit()
    # The copy may well have been made before the exit: the check after it says gone.
    assert read.result() is None and space.inflight == []
    space.close()


@needs_uring
def test_the_scanner_drops_the_pages_of_a_process_that_exits_mid_window(children: list[Child]) -> None:
    n = 4 * WINDOW_PAGES
    a, b = spawn(children, n), spawn(children, n)
    for child in (a, b):
        child.fill(0, n, 0x44)
    engine = Engine()
    for child in (a, b):
        engine.register(engine.new_sma(), ProcessMemory.open(child.pid), child.addr, n)
    full_scans(engine, 2)
    assert (engine.counters().pages_shared, engine.counters().pages_sharing) == (1, 2 * n - 1)
    scanner = engine.scanner
    scanner.step(2 * n)  # the first batch of a, the next window of a in flight
    assert scanner._ahead is not None and isinstance(scanner._ahead.read, procmem._Read)
    a.exit()
    full_scans(engine, 1)
    c = engine.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, n - 1)
    assert engine.slots[0].chunks == {} and engine.errors == 0
    check_engine(engine)


@needs_uring
def test_a_single_run_goes_to_io_uring_and_several_runs_are_read_at_once(children: list[Child]) -> None:
    child = spawn(children, 64)
    child.fill(0, 64, 0x66)
    space = ProcessMemory.open(child.pid)
    try:
        buf = mmap.mmap(-1, 64 * PAGE_SIZE)
        one = space.start_read(child.addr, 64, buf)
        assert isinstance(one, procmem._Read) and one.ring is not None
        assert one.result() == bytes([PAGE_COPIED]) * 64 and buf[: 64 * PAGE_SIZE] == b"\x66" * (64 * PAGE_SIZE)
        child.unmap(10, 1)
        several = space.start_read(child.addr, 64, buf)
        assert isinstance(several, procmem._Read) and several.ring is None and space.inflight == []
        assert several.result() == bytes([PAGE_COPIED]) * 10 + b"\x00" + bytes([PAGE_COPIED]) * 53
    finally:
        space.close()


@needs_uring
def test_a_read_ahead_the_kernel_returned_short_is_copied_again_as_a_synchronous_read(
    children: list[Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short io_uring read does not say where the first unreadable page is: the run is read again here."""
    child = spawn(children, 64)
    child.fill(0, 64, 0x77)
    wait = uring.Ring.wait
    monkeypatch.setattr(uring.Ring, "wait", lambda ring, token: min(wait(ring, token), 20 * PAGE_SIZE + 100))
    with closing(ProcessMemory.open(child.pid)) as space:
        buf = mmap.mmap(-1, 64 * PAGE_SIZE)
        read = space.start_read(child.addr, 64, buf)
        assert isinstance(read, procmem._Read) and read.ring is not None
        assert read.result() == bytes([PAGE_COPIED]) * 64
        assert buf[:] == b"\x77" * (64 * PAGE_SIZE)
