"""Tests for cuse_ksm.host.ptrace.borrow, the borrowed syscall, on the host, as root.

Mostly its first case, the fd hand-out's openat (``borrow_open``); one test
borrows the thread for a call without stack bytes (madvise), the next case.

A small C program plays the caller of the ioctl: each of its worker threads
blocks in a system call (read() on a pipe, mostly) and the test's reply()
callback "completes" that syscall by writing a byte into the pipe.  After the
hand-out the worker reports what its syscall returned and whether that value
is a working fd of the expected file.

The "asm" workers issue the read with a raw `syscall` instruction after
loading a canary into every register the syscall ABI preserves and filling
3.75 KiB of stack below the red zone with a pattern; afterwards they report a
bitmask of what changed.  That is how we check that the hand-out leaves the
caller's registers and stack alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from cuse_ksm.host.ptrace import DEFAULT_GRACE, DEFAULT_TIMEOUT, WALL, borrow, borrow_from_ioctl
from cuse_ksm.host.syscall import MADV_MERGEABLE, BorrowError, Errand, Syscall, madvise, openat

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or os.geteuid() != 0 or shutil.which("gcc") is None,
    reason="needs x86_64, root and gcc",
)

NR_READ = 0
NR_MMAP = 9
NR_VFORK = 58
NR_OPENAT = 257
PROT_READ, MAP_PRIVATE, MAP_ANONYMOUS = 1, 0x02, 0x20
PAGE_SIZE = 4096

CHILD_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct chk { long args[3]; long ret; long fail; };
long checked_read(long fd, void *buf, long n, struct chk *st);

#define PAT "0x5a5aa5a5c3c33c3c"
#define CHECK(val, reg, bit) \
    "  movabs $" val ", %rax\n  cmp %rax, " reg "\n  je 1f\n  or $" #bit ", %r11\n1:\n"

/* read(fd, buf, n) with canaries: see the test module docstring.
   fail bits: 1 rbx, 2 rbp, 4 r12, 8 r13, 16 r14, 32 r15, 64 r8, 128 r9,
   256 r10, 512 rdi, 1024 rsi, 2048 rdx, 4096 stack below the red zone. */
__asm__(
    ".text\n"
    ".globl checked_read\n"
    ".type checked_read, @function\n"
    "checked_read:\n"
    "  push %rbx\n  push %rbp\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
    "  push %rcx\n"
    "  mov %rdi, 0(%rcx)\n  mov %rsi, 8(%rcx)\n  mov %rdx, 16(%rcx)\n"
    "  lea -4096(%rsp), %rdi\n  movabs $" PAT ", %rax\n  mov $480, %ecx\n"
    "  cld\n  rep stosq\n"
    "  mov 0(%rsp), %rcx\n"
    "  mov 0(%rcx), %rdi\n  mov 8(%rcx), %rsi\n  mov 16(%rcx), %rdx\n"
    "  movabs $0x1111111111111111, %rbx\n"
    "  movabs $0x2222222222222222, %rbp\n"
    "  movabs $0x3333333333333333, %r12\n"
    "  movabs $0x4444444444444444, %r13\n"
    "  movabs $0x5555555555555555, %r14\n"
    "  movabs $0x6666666666666666, %r15\n"
    "  movabs $0x7777777777777777, %r8\n"
    "  movabs $0x8888888888888888, %r9\n"
    "  movabs $0x9999999999999999, %r10\n"
    "  xor %eax, %eax\n"
    "  syscall\n"
    "  mov 0(%rsp), %rcx\n"
    "  mov %rax, 24(%rcx)\n"
    "  xor %r11d, %r11d\n"
    CHECK("0x1111111111111111", "%rbx", 1)
    CHECK("0x2222222222222222", "%rbp", 2)
    CHECK("0x3333333333333333", "%r12", 4)
    CHECK("0x4444444444444444", "%r13", 8)
    CHECK("0x5555555555555555", "%r14", 16)
    CHECK("0x6666666666666666", "%r15", 32)
    CHECK("0x7777777777777777", "%r8", 64)
    CHECK("0x8888888888888888", "%r9", 128)
    CHECK("0x9999999999999999", "%r10", 256)
    "  cmp 0(%rcx), %rdi\n  je 1f\n  or $512, %r11\n1:\n"
    "  cmp 8(%rcx), %rsi\n  je 1f\n  or $1024, %r11\n1:\n"
    "  cmp 16(%rcx), %rdx\n  je 1f\n  or $2048, %r11\n1:\n"
    "  mov %r11, 32(%rcx)\n"
    "  lea -4096(%rsp), %rdi\n  movabs $" PAT ", %rax\n  mov $480, %ecx\n"
    "  repe scasq\n  je 1f\n  mov 0(%rsp), %rcx\n  orq $4096, 32(%rcx)\n1:\n"
    "  pop %rcx\n  mov 24(%rcx), %rax\n"
    "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n"
    "  ret\n"
    ".size checked_read, .-checked_read\n"
);

static volatile sig_atomic_t usr1_count;
static volatile pid_t usr1_tid;
static volatile unsigned long spin_counter;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)si; (void)uc;
    usr1_count++;
    usr1_tid = (pid_t)syscall(SYS_gettid);
}

struct worker { int idx; char mode[16]; long arg; };

/* "done idx tid ret errno fail usr1_count usr1_tid dev ino hexdata" */
static void report(int idx, long ret, int err, long fail)
{
    char data[160] = "-";
    unsigned long dev = 0, ino = 0;
    struct stat st;
    if (ret >= 0 && fstat((int)ret, &st) == 0) {
        unsigned char buf[64];
        ssize_t n = pread((int)ret, buf, sizeof buf, 0);
        dev = st.st_dev;
        ino = st.st_ino;
        for (ssize_t i = 0; i < n; i++)
            sprintf(data + 2 * i, "%02x", buf[i]);
    }
    printf("done %d %ld %ld %d %ld %d %d %lu %lu %s\n", idx,
           (long)syscall(SYS_gettid), ret, err, fail, (int)usr1_count,
           (int)usr1_tid, dev, ino, data);
}

static void *work(void *arg)
{
    struct worker *w = arg;
    char buf[8];
    long ret = 0, fail = 0;
    int err = 0;
    stack_t ss = { .ss_sp = malloc(1 << 16), .ss_size = 1 << 16 };

    /* Handlers run on an alternate stack, so that a signal frame does not
       overwrite the pattern below the red zone. */
    sigaltstack(&ss, NULL);
    printf("ready %d %ld %lu\n", w->idx, (long)syscall(SYS_gettid),
           (unsigned long)&spin_counter);
    if (!strcmp(w->mode, "asm")) {
        struct chk st;
        memset(&st, 0, sizeof st);
        ret = checked_read(w->arg, buf, 1, &st);
        fail = st.fail;
    } else if (!strcmp(w->mode, "libc")) {
        ret = read((int)w->arg, buf, 1);
        err = ret < 0 ? errno : 0;
    } else if (!strcmp(w->mode, "int80")) {
        char *low = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
        __asm__ volatile("int $0x80" : "=a"(ret)
                         : "a"(3L), "b"(w->arg), "c"((long)low), "d"(1L)
                         : "r8", "r9", "r10", "r11", "memory");
    } else if (!strcmp(w->mode, "spin")) {
        for (;;)
            spin_counter++;
    } else if (!strcmp(w->mode, "vfork")) {
        pid_t p = vfork();
        if (p == 0) {   /* the child: exit once the test says so */
            _exit(read((int)w->arg, buf, 1) != 1);
        }
        ret = p;
        err = p < 0 ? errno : 0;
    }
    if (strcmp(w->mode, "libc") && strcmp(w->mode, "vfork") && ret < 0) {
        err = (int)-ret;
        ret = -1;
    }
    report(w->idx, ret, err, fail);
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    int n = argc - 1;
    pthread_t *th = calloc(n, sizeof *th);
    struct worker *w = calloc(n, sizeof *w);

    setvbuf(stdout, NULL, _IOLBF, 0);
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;   /* no SA_RESTART on purpose */
    sigaction(SIGUSR1, &sa, NULL);
    for (int i = 0; i < n; i++) {
        w[i].idx = i;
        sscanf(argv[i + 1], "%15[^:]:%ld", w[i].mode, &w[i].arg);
        pthread_create(&th[i], NULL, work, &w[i]);
    }
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    return 0;
}
"""


@pytest.fixture(scope="module")
def child_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("child")
    (d / "child.c").write_text(CHILD_C)
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-pthread", "-o", str(d / "child"), str(d / "child.c")],
        check=True,
    )
    return d / "child"


libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)


def tgkill(pid: int, tid: int, sig: int) -> None:
    if libc.syscall(*(ctypes.c_long(n) for n in (234, pid, tid, sig))) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


PURPOSE = "hand out the test's file"


async def borrow_open(
    tid: int,
    path: bytes,
    flags: int,
    reply: Callable[[], None],
    *,
    expect_syscall: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    grace: float = DEFAULT_GRACE,
) -> int:
    """The fd hand-out's case: thread ``tid`` opens ``path`` itself."""
    call = openat(path, flags, purpose=PURPOSE)
    (fd,) = await borrow(tid, Errand((call,)), reply, expect_syscall=expect_syscall, timeout=timeout, grace=grace)
    return fd


class Completer:
    """A reply() that completes the worker's read() (one byte into its pipe, if any) and counts its calls."""

    def __init__(self, w: int = -1) -> None:
        self.w = w
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.w >= 0:
            os.write(self.w, b"x")


def tracer_pid(pid: int, tid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    except FileNotFoundError:
        return None
    return int(text.split("TracerPid:")[1].split()[0])


def vm_flags(pid: int, addr: int) -> list[str]:
    """The VmFlags of the mapping of ``pid`` that holds ``addr`` (/proc/PID/smaps)."""
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= addr < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping of {pid} holds {addr:#x}")


def task_state(pid: int, tid: int) -> str:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.002)
        return
    raise AssertionError(f"timed out waiting for {what}")


class Child:
    """The C child; worker i is described by specs[i] ("mode:arg")."""

    def __init__(self, binary: Path, specs: list[str], pass_fds: tuple[int, ...]) -> None:
        self.proc = subprocess.Popen(
            [str(binary), *specs],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[list[str] | None] = queue.Queue()
        self.pending: list[list[str]] = []
        self.tids: dict[int, int] = {}
        self.spin_counter = 0  # address of the spinning workers' counter
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.decode().split())
        self.lines.put(None)

    def _take(self, kind: str, idx: int) -> list[str] | None:
        while True:
            for words in self.pending:
                if words[0] == kind and int(words[1]) == idx:
                    self.pending.remove(words)
                    return words
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return None
            if line is None:
                raise AssertionError(f"child exited (rc {self.proc.poll()})")
            self.pending.append(line)

    async def line(self, kind: str, idx: int, timeout: float = 5.0) -> list[str]:
        with trio.move_on_after(timeout):
            while (words := self._take(kind, idx)) is None:
                await trio.sleep(0.002)
            return words
        raise AssertionError(f"no {kind!r} line from worker {idx}")

    def has_line(self, kind: str, idx: int) -> bool:
        words = self._take(kind, idx)
        if words is not None:
            self.pending.insert(0, words)
        return words is not None

    async def ready(self, idx: int, nr: int | None) -> int:
        """Tid of worker idx, once it is blocked in syscall nr."""
        words = await self.line("ready", idx)
        tid = int(words[2])
        self.tids[idx] = tid
        self.spin_counter = int(words[3])
        if nr is not None:
            path = Path(f"/proc/{self.pid}/task/{tid}/syscall")
            await wait_until(lambda: path.read_text().split()[0] == str(nr), f"syscall {nr}")
        return tid

    async def done(self, idx: int, timeout: float = 5.0) -> dict[str, int | str]:
        w = await self.line("done", idx, timeout)
        keys = ("tid", "ret", "err", "fail", "usr1", "usr1_tid", "dev", "ino")
        result: dict[str, int | str] = dict(zip(keys, map(int, w[2:10]), strict=True))
        result["data"] = w[10]
        return result

    def fds(self) -> set[int]:
        return {int(name) for name in os.listdir(f"/proc/{self.pid}/fd")}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)


@pytest.fixture
def spawn(child_bin: Path) -> Iterator[Callable[..., tuple[Child, list[int]]]]:
    """spawn("asm", "libc", ...) -> (child, write ends of each worker's pipe)."""
    children: list[Child] = []
    fds: list[int] = []

    def start(*modes: str) -> tuple[Child, list[int]]:
        specs, readers, writers = [], [], []
        for mode in modes:
            if ":" in mode:
                specs.append(mode)
                writers.append(-1)
                continue
            r, w = os.pipe()
            readers.append(r)
            writers.append(w)
            specs.append(f"{mode}:{r}")
        child = Child(child_bin, specs, tuple(readers))
        for r in readers:
            os.close(r)
        fds.extend(w for w in writers if w >= 0)
        children.append(child)
        return child, writers

    yield start
    for child in children:
        child.kill()
    for fd in fds:
        os.close(fd)


def make_file(tmp_path: Path, name: str) -> tuple[Path, bytes]:
    content = f"contents of {name}\n".encode()
    path = tmp_path / name
    path.write_bytes(content)
    return path, content


def assert_is_file(result: dict[str, int | str], path: Path, content: bytes) -> None:
    st = os.stat(path)
    assert (result["dev"], result["ino"]) == (st.st_dev, st.st_ino)
    assert result["data"] == content.hex()


@pytest.mark.trio
async def test_handout_success(spawn, tmp_path: Path) -> None:
    path, content = make_file(tmp_path, "sma")
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    before = child.fds()
    calls: list[int] = []

    def reply() -> None:
        calls.append(tracer_pid(child.pid, tid) or 0)
        os.write(w, b"x")

    fd = await borrow_open(tid, bytes(path), os.O_RDWR, reply, expect_syscall=NR_READ)
    assert calls == [os.getpid()]  # called once, with T already seized
    assert fd >= 0 and fd not in before
    assert tracer_pid(child.pid, tid) == 0
    result = await child.done(0)
    assert result["ret"] == fd  # not 1, the byte count of the read
    assert result["fail"] == 0  # registers and stack as they were
    assert_is_file(result, path, content)


@pytest.mark.trio
async def test_a_call_without_stack_bytes(spawn) -> None:
    """The next case of the mechanism: madvise(addr, len, MADV_MERGEABLE) on the caller's own memory.

    Only the caller can mark its memory mergeable; its ioctl then returns 0.
    Its VMA shows the flag ("mg" in smaps), so the call ran in its mm.
    """
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    page = child.spin_counter & ~(PAGE_SIZE - 1)
    reply = Completer(w)
    errand = Errand((madvise(page, PAGE_SIZE, MADV_MERGEABLE, purpose="merge"),))
    assert await borrow(tid, errand, reply, expect_syscall=NR_READ) == (0,)
    assert reply.calls == 1
    result = await child.done(0)
    assert (result["ret"], result["fail"]) == (0, 0)  # madvise's 0, not the read's 1; registers intact
    assert "mg" in vm_flags(child.pid, page)


@pytest.mark.trio
async def test_a_call_with_six_arguments(spawn) -> None:
    """mmap(NULL, 3 pages, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0): every argument register is set.

    The asm worker leaves canaries in r8-r10; mmap fails with EINVAL if
    the flags (r10) or the offset (r9) were left at theirs.
    """
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    length = 3 * PAGE_SIZE
    args = (0, length, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    mmap = Syscall("mmap", NR_MMAP, args, what="map 3 pages", purpose="test the argument registers")
    (addr,) = await borrow(tid, Errand((mmap,)), Completer(w), expect_syscall=NR_READ)
    result = await child.done(0)
    assert (result["ret"], result["fail"]) == (addr, 0)
    mapped = []
    for line in Path(f"/proc/{child.pid}/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= addr and addr + length <= end:
            mapped.append(perms)
    assert mapped == ["r--p"]  # read-only, private: the mapping asked for (it may merge with a neighbour)


UNMAPPED = 0x10000  # below every mapping of the worker (mmap_min_addr is 64 KiB): madvise says ENOMEM


@pytest.mark.trio
async def test_an_errand_with_a_fixed_result_runs_every_call(spawn) -> None:
    """REGISTER's case in kernel mode: madvise calls whose failure must not change the ioctl's 0.

    The failing call (an unmapped range) is among the results, the next
    call still runs, and the thread's read() returns 0, not -ENOMEM.
    """
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    page = child.spin_counter & ~(PAGE_SIZE - 1)
    calls = (UNMAPPED, page, UNMAPPED)
    errand = Errand(tuple(madvise(a, PAGE_SIZE, MADV_MERGEABLE, purpose="merge") for a in calls), returns=0)
    assert await borrow(tid, errand, Completer(w), expect_syscall=NR_READ) == (-errno.ENOMEM, 0, -errno.ENOMEM)
    result = await child.done(0)
    assert (result["ret"], result["fail"]) == (0, 0)
    assert "mg" in vm_flags(child.pid, page)


@pytest.mark.trio
async def test_an_errand_without_a_fixed_result_stops_at_a_failure(spawn) -> None:
    """The first failing call ends the errand, and its errno is the thread's result."""
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    page = child.spin_counter & ~(PAGE_SIZE - 1)
    errand = Errand(tuple(madvise(a, PAGE_SIZE, MADV_MERGEABLE, purpose="merge") for a in (UNMAPPED, page)))
    with pytest.raises(BorrowError) as info:
        await borrow(tid, errand, Completer(w), expect_syscall=NR_READ)
    assert info.value.errno == errno.ENOMEM
    assert f"could not mark {UNMAPPED:#x}-{UNMAPPED + PAGE_SIZE:#x} mergeable" in str(info.value)
    result = await child.done(0)
    assert (result["ret"], result["err"], result["fail"]) == (-1, errno.ENOMEM, 0)
    assert "mg" not in vm_flags(child.pid, page)  # the second call never ran


@pytest.mark.trio
async def test_each_call_of_an_errand_gets_its_own_stack_bytes(spawn, tmp_path: Path) -> None:
    """Two opens in one borrow: each call's path argument points at its own bytes."""
    (first, _), (second, content) = make_file(tmp_path, "first"), make_file(tmp_path, "second")
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    errand = Errand(tuple(openat(bytes(p), os.O_RDONLY, purpose=PURPOSE) for p in (first, second)))
    fd1, fd2 = await borrow(tid, errand, Completer(w), expect_syscall=NR_READ)
    result = await child.done(0)
    assert (result["ret"], result["fail"]) == (fd2, 0)
    assert os.readlink(f"/proc/{child.pid}/fd/{fd1}") == str(first)
    assert_is_file(result, second, content)


@pytest.mark.trio
async def test_concurrent_handouts(spawn, tmp_path: Path) -> None:
    files = [make_file(tmp_path, f"sma{i}") for i in range(4)]
    child, writers = spawn("asm", "asm", "asm", "asm")
    tids = [await child.ready(i, NR_READ) for i in range(4)]
    before = child.fds()
    fds: dict[int, int] = {}

    async def one(i: int) -> None:
        fds[i] = await borrow_open(
            tids[i],
            bytes(files[i][0]),
            os.O_RDONLY,
            Completer(writers[i]),
        )

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    assert len(set(fds.values())) == 4
    assert not set(fds.values()) & before
    for i in range(4):
        result = await child.done(i)
        assert result["ret"] == fds[i]
        assert result["fail"] == 0
        assert_is_file(result, *files[i])


@pytest.mark.trio
async def test_open_blocks_while_daemon_keeps_serving(spawn, tmp_path: Path) -> None:
    """The injected openat blocks (a FIFO without writer) until another task
    of the same trio loop opens the writing end: waiting must not block."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    syscall_file = Path(f"/proc/{child.pid}/task/{tid}/syscall")
    writer: list[int] = []

    async def open_writer() -> None:
        await wait_until(lambda: syscall_file.read_text().split()[0] == str(NR_OPENAT), "openat")
        while True:  # ENXIO until T's openat has registered as the reader
            try:
                writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
            await trio.sleep(0.001)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_writer)
            fd = await borrow_open(tid, bytes(fifo), os.O_RDONLY, Completer(w))
        result = await child.done(0)
    finally:
        for fd_ in writer:
            os.close(fd_)
    assert writer and result["ret"] == fd >= 0
    assert result["fail"] == 0
    assert result["ino"] == os.stat(fifo).st_ino


@pytest.mark.trio
async def test_missing_path_fails_the_syscall(spawn, tmp_path: Path) -> None:
    child, (w,) = spawn("libc")
    tid = await child.ready(0, NR_READ)
    reply = Completer(w)
    with pytest.raises(BorrowError) as info:
        await borrow_open(tid, bytes(tmp_path / "nope"), os.O_RDWR, reply)
    assert info.value.errno == errno.ENOENT
    assert reply.calls == 1
    assert "nope" in str(info.value)
    result = await child.done(0)
    assert (result["ret"], result["err"]) == (-1, errno.ENOENT)
    assert tracer_pid(child.pid, tid) == 0


@pytest.mark.trio
async def test_already_traced(spawn, tmp_path: Path) -> None:
    path, _ = make_file(tmp_path, "sma")
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    attached, release = threading.Event(), threading.Event()
    seize_result: list[int] = []

    def other_tracer() -> None:  # a tracer is a thread: it detaches on exit
        seize_result.append(libc.ptrace(0x4206, tid, None, None))
        attached.set()
        release.wait(10)

    thread = threading.Thread(target=other_tracer)
    thread.start()
    try:
        assert attached.wait(5) and seize_result == [0]
        calls: list[int] = []
        with pytest.raises(BorrowError) as info:
            await borrow_open(tid, bytes(path), os.O_RDWR, lambda: calls.append(1))
    finally:
        release.set()
        thread.join()
    assert info.value.errno == errno.EBUSY
    assert calls == []  # not replied: the caller answers the ioctl itself
    # The other tracer is a thread of this very process, which stands in for the daemon.
    assert str(info.value) == (
        f"thread {tid} is already being traced by this daemon (an earlier borrowed call of it "
        f"is unfinished); cannot {PURPOSE}"
    )
    await wait_until(lambda: tracer_pid(child.pid, tid) == 0, "the other tracer's exit")
    os.write(w, b"x")  # T was never touched: its read completes normally
    result = await child.done(0)
    assert (result["ret"], result["fail"]) == (1, 0)


@pytest.mark.trio
async def test_no_such_thread() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    calls: list[int] = []
    with pytest.raises(BorrowError) as info:
        await borrow_open(pid_max + 1, b"/dev/null", os.O_RDWR, lambda: calls.append(1))
    assert info.value.errno == errno.ESRCH
    assert calls == []


@pytest.mark.trio
async def test_a_caller_outside_our_pid_namespace_gets_eperm() -> None:
    # The kernel writes pid 0 into a request whose caller our namespace cannot see.
    calls: list[int] = []
    with pytest.raises(BorrowError) as info:
        errand = Errand((openat(b"/dev/null", os.O_RDWR, purpose="test"),))
        await borrow_from_ioctl(0, errand, lambda: calls.append(1))
    assert info.value.errno == errno.EPERM
    assert "outside the daemon's pid namespace" in str(info.value)
    assert calls == []


@pytest.mark.trio
@pytest.mark.parametrize("when", ["at_reply", "during_openat"])
async def test_killed_during_handout(spawn, tmp_path: Path, when: str) -> None:
    fifo = tmp_path / "fifo"  # without writer: the injected openat blocks
    os.mkfifo(fifo)
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    syscall_file = Path(f"/proc/{child.pid}/task/{tid}/syscall")

    def reply() -> None:
        os.write(w, b"x")
        if when == "at_reply":
            os.kill(child.pid, signal.SIGKILL)

    async def killer() -> None:
        await wait_until(lambda: syscall_file.read_text().split()[0] == str(NR_OPENAT), "openat")
        os.kill(child.pid, signal.SIGKILL)

    # The error is caught inside the nursery: one that left it would come out
    # wrapped in an ExceptionGroup (trio's strict exception groups).
    async with trio.open_nursery() as nursery:
        if when == "during_openat":
            nursery.start_soon(killer)
        with pytest.raises(BorrowError) as info:
            await borrow_open(tid, bytes(fifo), os.O_RDONLY, reply)
    assert info.value.errno == errno.ESRCH
    assert "SIGKILL" in str(info.value)
    # T was reaped by us, so the process can be reaped by its parent: no
    # zombie, and T is no longer anyone's tracee.
    assert child.proc.wait(timeout=5) == -signal.SIGKILL
    assert not Path(f"/proc/{child.pid}").exists()
    with pytest.raises(ChildProcessError):
        os.waitpid(tid, os.WNOHANG | WALL)


@pytest.mark.trio
async def test_signal_during_handout_is_delivered_after(spawn, tmp_path: Path) -> None:
    path, content = make_file(tmp_path, "sma")
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)

    def reply() -> None:
        os.write(w, b"x")
        tgkill(child.pid, tid, signal.SIGUSR1)

    fd = await borrow_open(tid, bytes(path), os.O_RDWR, reply)
    result = await child.done(0)
    assert (result["usr1"], result["usr1_tid"]) == (1, tid)  # once, in T
    assert result["ret"] == fd  # not EINTR: the handler ran after the ioctl
    assert result["fail"] == 0
    assert_is_file(result, path, content)


@pytest.mark.trio
@pytest.mark.parametrize("target", ["thread", "process"])
async def test_sigstop_during_handout(spawn, tmp_path: Path, target: str) -> None:
    """SIGSTOP cannot be blocked: to T it is a signal-delivery-stop that we
    must requeue, or a group-stop we must not swallow.  Either way the
    process ends up stopped, and carries on after SIGCONT."""
    path, content = make_file(tmp_path, "sma")
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)

    def reply() -> None:
        os.write(w, b"x")
        if target == "thread":
            tgkill(child.pid, tid, signal.SIGSTOP)
        else:
            os.kill(child.pid, signal.SIGSTOP)

    fd = await borrow_open(tid, bytes(path), os.O_RDWR, reply)
    tasks = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
    await wait_until(lambda: all(task_state(child.pid, t) == "T" for t in tasks), "group-stop")
    assert tracer_pid(child.pid, tid) == 0
    if target == "thread":  # T stopped before returning to user space
        await trio.sleep(0.1)
        assert not child.has_line("done", 0)
    os.kill(child.pid, signal.SIGCONT)
    result = await child.done(0)
    assert (result["ret"], result["fail"], result["usr1"]) == (fd, 0, 0)
    assert_is_file(result, path, content)


@pytest.mark.trio
async def test_int80_is_refused(spawn, tmp_path: Path) -> None:
    path, _ = make_file(tmp_path, "sma")
    child, (w,) = spawn("int80")
    tid = await child.ready(0, 3)  # read in the i386 table
    reply = Completer(w)
    with pytest.raises(BorrowError) as info:
        await borrow_open(tid, bytes(path), os.O_RDWR, reply)
    assert info.value.errno == errno.ENOEXEC and reply.calls == 1
    assert "cd 80" in str(info.value)
    result = await child.done(0)
    assert (result["ret"], result["err"]) == (-1, errno.ENOEXEC)
    assert tracer_pid(child.pid, tid) == 0


@pytest.mark.trio
async def test_thread_running_user_code_is_left_alone(spawn) -> None:
    child, _ = spawn("spin:0")
    tid = await child.ready(0, None)
    # Wait for the counter to move: only then is T past the write() of its
    # "ready" line, whose return we would otherwise hijack like any syscall.
    mem = os.open(f"/proc/{child.pid}/mem", os.O_RDONLY)
    try:
        await wait_until(lambda: os.pread(mem, 8, child.spin_counter) != bytes(8), "spinning")
        with pytest.raises(BorrowError) as info:
            await borrow_open(tid, b"/dev/null", os.O_RDWR, lambda: None)
        assert info.value.errno == errno.EINVAL
        assert "not in a system call" in str(info.value)
        assert tracer_pid(child.pid, tid) == 0
        count = os.pread(mem, 8, child.spin_counter)
        await wait_until(lambda: os.pread(mem, 8, child.spin_counter) != count, "spinning on")
    finally:
        os.close(mem)


@pytest.mark.trio
async def test_unexpected_syscall_is_left_alone(spawn) -> None:
    """T is in read(), the daemon expects ioctl(): no hand-out, and the read
    interrupted by PTRACE_INTERRUPT is transparently restarted."""
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    with pytest.raises(BorrowError) as info:
        await borrow_open(tid, b"/dev/null", os.O_RDWR, lambda: None, expect_syscall=16)
    assert info.value.errno == errno.EINVAL
    assert tracer_pid(child.pid, tid) == 0
    syscall_file = Path(f"/proc/{child.pid}/task/{tid}/syscall")
    await wait_until(lambda: syscall_file.read_text().split()[0] == "0", "read again")
    assert not child.has_line("done", 0)
    os.write(w, b"x")
    result = await child.done(0)
    assert (result["ret"], result["fail"]) == (1, 0)


@pytest.mark.trio
async def test_timeout_in_blocking_openat(spawn, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    start = time.monotonic()
    reply = Completer(w)
    with pytest.raises(BorrowError) as info:
        await borrow_open(tid, bytes(fifo), os.O_RDONLY, reply, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 1.3
    assert info.value.errno == errno.ETIMEDOUT and reply.calls == 1
    result = await child.done(0)
    assert (result["ret"], result["err"], result["fail"]) == (-1, errno.ETIMEDOUT, 0)
    assert tracer_pid(child.pid, tid) == 0


@pytest.mark.trio
async def test_timeout_with_unstoppable_thread(spawn) -> None:
    """T sits in a killable sleep (vfork waiting for its child) that
    PTRACE_INTERRUPT cannot end: we give up, and a system task releases T
    with ETIMEDOUT once the vfork child exits (when we write to its pipe)."""
    child, (w,) = spawn("vfork")
    tid = await child.ready(0, NR_VFORK)
    start = time.monotonic()
    reply = Completer()
    with pytest.raises(BorrowError) as info:
        await borrow_open(tid, b"/dev/null", os.O_RDWR, reply, timeout=0.2, grace=0.2)
    assert time.monotonic() - start < 0.9
    assert info.value.errno == errno.ETIMEDOUT and reply.calls == 1
    assert "stays traced" in str(info.value)
    await trio.sleep(0.1)
    assert tracer_pid(child.pid, tid) != 0  # still ours, for now
    assert not child.has_line("done", 0)
    os.write(w, b"x")
    result = await child.done(0)
    assert (result["ret"], result["err"]) == (-1, errno.ETIMEDOUT)
    await wait_until(lambda: tracer_pid(child.pid, tid) == 0, "release")


@pytest.mark.trio
async def test_cancelled_during_openat(spawn, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)
    with trio.move_on_after(0.2) as scope:
        await borrow_open(tid, bytes(fifo), os.O_RDONLY, Completer(w))
    assert scope.cancelled_caught
    result = await child.done(0)
    assert (result["ret"], result["err"], result["fail"]) == (-1, errno.ECANCELED, 0)
    assert tracer_pid(child.pid, tid) == 0


@pytest.mark.trio
async def test_failing_reply_releases_thread(spawn, tmp_path: Path) -> None:
    path, _ = make_file(tmp_path, "sma")
    child, (w,) = spawn("asm")
    tid = await child.ready(0, NR_READ)

    def reply() -> None:
        os.write(w, b"x")
        raise RuntimeError("CUSE channel gone")

    with pytest.raises(RuntimeError, match="CUSE channel gone"):
        await borrow_open(tid, bytes(path), os.O_RDWR, reply)
    result = await child.done(0)
    assert (result["ret"], result["err"], result["fail"]) == (-1, errno.EIO, 0)
    assert tracer_pid(child.pid, tid) == 0
