"""Integration tests: run inside the VM against the real /dev/ksm served by the daemon."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
C_BIN = ROOT / "tests" / "c" / "bin"
ROBUST = ROOT / "tests" / "robust"
ROBUST_BIN = ROBUST / "bin"
DEVICE = os.environ.get("CUSE_KSM_DEVICE", "/dev/ksm")
VM_OUT = ROOT / "tests" / "vm" / "out"  # logs kept for after the run
STATS = Path(os.environ.get("CUSE_KSM_STATS_DIR", "/run/cuse-ksm/ksm"))  # the main daemon's control files

sys.path.insert(0, str(ROOT / "examples"))


def pytest_collection_modifyitems(config, items):
    try:
        is_dev = stat.S_ISCHR(os.stat(DEVICE).st_mode)
    except FileNotFoundError:
        is_dev = False
    if not is_dev:
        skip = pytest.mark.skip(reason=f"{DEVICE} is not served here: these run in the VM (make test-vm)")
        for item in items:
            item.add_marker(skip)


def find_daemon_pid() -> int:
    if "CUSE_KSM_DAEMON_PID" in os.environ:
        return int(os.environ["CUSE_KSM_DAEMON_PID"])
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"cuse_ksm" in cmd or any(part.endswith(b"cuse-ksm") for part in cmd[:2]):
                return int(entry)
    raise LookupError("no cuse-ksm daemon running")


@pytest.fixture
def scanner_restored() -> Iterator[None]:
    """The programs set the scanner through the ioctl; put back what was there."""
    from pyksm import Ksm

    with Ksm(DEVICE) as ksm:
        before = ksm.info()
    yield
    with Ksm(DEVICE) as ksm:
        if before.flags & 1 and before.pages_to_scan:
            ksm.start(before.pages_to_scan, before.sleep)
        else:
            ksm.stop()


@pytest.fixture
def daemon_pid() -> int:
    return find_daemon_pid()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the main daemon's control files ------------------------------------------------------------


def value(name: str, directory: Path = STATS) -> int:
    text = (directory / name).read_text()
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return int(text)


def write(name: str, data: str, directory: Path = STATS) -> int:
    """Write as ``echo data > file`` does; 0 or the errno."""
    try:
        fd = os.open(directory / name, os.O_WRONLY | os.O_TRUNC)
    except OSError as e:
        return e.errno or -1
    try:
        os.write(fd, data.encode())
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)
    return 0


def run_c(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = C_BIN / name
    if not exe.exists():
        subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "c")], check=True)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)


def keep_sample(name: str, text: str) -> None:
    """Save real output next to the VM logs (tests/vm/out), where the README's samples come from."""
    if VM_OUT.is_dir():
        (VM_OUT / name).write_text(text)


@contextmanager
def ready_program(name: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """A program of tests/c that prints "ready <pid> <addr>" and then waits until its stdin is closed.

    Yields the process, and the pid and address it printed.  Closing its
    stdin (the test may do it first) lets it close its fds and exit; it is
    killed if it has not within 30 s.
    """
    run_c("ksm_abi_sequence")  # builds tests/c if needed
    proc = subprocess.Popen([str(C_BIN / name), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    out = ""
    for line in proc.stdout:
        out += line
        if line.startswith("ready "):
            break
    words = out.splitlines()[-1].split() if out else []
    try:
        assert len(words) == 3 and words[0] == "ready", f"{name} did not get ready: {out}"
        yield proc, int(words[1]), int(words[2], 16)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- a second daemon ------------------------------------------------------------------------

# Options for a daemon started beside the VM's main one when the test needs
# no control files of its own: the main daemon keeps /run/cuse-ksm/ksm, and
# only warnings reach the test's output.
SECOND_DAEMON = ("--no-stats-dir", "--log-level", "warning")


def start_daemon(name: str, *options: str, log: Path | None = None) -> subprocess.Popen[str]:
    """A daemon serving /dev/<name>, returned once the node is there.

    Its stderr goes to a pipe that :func:`stop_daemon` reads, or with
    ``log`` to that file, which a test can read while the daemon runs.
    """
    with open(log or os.devnull, "w") as log_file:  # the daemon keeps its own copy of the fd
        proc = subprocess.Popen(
            [sys.executable, "-m", "cuse_ksm", "--name", name, *options],
            cwd=ROOT,
            stderr=log_file if log else subprocess.PIPE,
            text=True,
        )
    # A daemon starts in seconds, but in a loaded VM under software emulation
    # (the first one needs 15 s there) 30 s has proved too short.
    deadline = time.monotonic() + 60
    while not os.path.exists(f"/dev/{name}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.communicate()[1]
            pytest.fail(f"/dev/{name} did not appear: {err if err is not None else log.read_text() if log else ''}")
        time.sleep(0.05)
    return proc


def stop_daemon(proc: subprocess.Popen[str], signum: int = signal.SIGTERM) -> str:
    """Send a daemon of :func:`start_daemon` ``signum`` and wait for it to exit; returns its stderr ("" with a log).

    A clean stop is exit status 0 (``proc.returncode``), which the caller
    asserts, with the stderr returned here to show when it is not.
    """
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=15)
    return err or ""


# -- --merge kernel: a daemon that drives the host kernel's KSM ------------------------------

SYS_KSM = Path("/sys/kernel/mm/ksm")
HOST_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")  # what --merge kernel writes, and restores


def host_knobs() -> dict[str, int]:
    return {name: int((SYS_KSM / name).read_text()) for name in HOST_KNOBS}


@dataclass(frozen=True)
class KernelDaemon:
    """A daemon of :func:`kernel_daemon`: /dev/<name>, its control files, its log."""

    proc: subprocess.Popen[str]
    name: str
    log: Path

    @property
    def device(self) -> str:
        return f"/dev/{self.name}"

    @property
    def stats(self) -> Path:
        return Path("/run/cuse-ksm") / self.name

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def kernel_daemon(name: str, *options: str) -> Iterator[KernelDaemon]:
    """A ``--merge kernel`` daemon serving /dev/<name>, logging at info to tests/vm/out/daemon-<name>.log.

    ``options`` go on its command line (``--cross-check`` keeps the emulated scanner running).

    On the way out it must stop cleanly on SIGTERM and leave the host's KSM
    settings as they were before it started.
    """
    VM_OUT.mkdir(parents=True, exist_ok=True)
    log = VM_OUT / f"daemon-{name}.log"
    before = host_knobs()
    proc = start_daemon(name, "--merge", "kernel", "--log-level", "info", *options, log=log)
    try:
        yield KernelDaemon(proc, name, log)
    finally:
        if proc.poll() is None:
            stop_daemon(proc)
    assert proc.returncode == 0, log.read_text()
    assert host_knobs() == before, "the host's KSM settings were not restored"


def wait_for(predicate: Callable[[], object], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Client:
    """tests/robust/ksm_client, one command per line."""

    def __init__(self, device: str = DEVICE) -> None:
        self.proc = subprocess.Popen(
            [str(ROBUST_BIN / "ksm_client"), device], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        first = self.readline()
        assert first.startswith("ok pid"), first
        self.pid = self.proc.pid

    def readline(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "ksm_client did not answer: a hang"
        return self.proc.stdout.readline().strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def __call__(self, line: str) -> str:
        self.send(line)
        return self.readline()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe:
                pipe.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- the daemon's resources, before and after ---------------------------------------------

# The daemon's memory may grow a little (allocator, caches); a leak per call
# over hundreds of calls would exceed this.
RSS_SLACK_KIB = 32 * 1024


def build_robust() -> None:
    """Build tests/robust (the C clients the robustness tests drive)."""
    subprocess.run(["make", "-s", "-C", str(ROBUST)], check=True)


@dataclass(frozen=True)
class Snapshot:
    fds: int
    threads: int
    rss_kib: int
    traced: tuple[int, ...]  # processes the daemon is attached to


def traced_by(pid: int) -> tuple[int, ...]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for task in os.listdir(f"/proc/{entry}/task"):
                with open(f"/proc/{entry}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith("TracerPid:") and int(line.split()[1]) == pid:
                            out.append(int(task))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return tuple(out)


def own_threads(pid: int) -> int:
    """The daemon's threads, but for io_uring's kernel workers ("iou-wrk-PID").

    The kernel starts one while the scanner reads ahead (cuse_ksm/host/uring.py)
    and ends it after 5 s without work: a worker of the kernel's, not ours.
    """
    n = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                n += not f.read().startswith("iou-wrk")
        except FileNotFoundError:
            continue  # a worker that just ended
    return n


def daemon_snapshot(pid: int) -> Snapshot:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Snapshot(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=own_threads(pid),
        rss_kib=rss,
        traced=traced_by(pid),
    )


def settle_to(pid: int, before: Snapshot, timeout: float = 15) -> Snapshot:
    """Wait until the daemon is back to ``before`` (releases are asynchronous), then check."""
    deadline = time.monotonic() + timeout
    while True:
        now = daemon_snapshot(pid)
        back = (now.fds, now.threads, now.traced) == (before.fds, before.threads, ())
        if back or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert os.path.exists(f"/proc/{pid}"), "the daemon died"
    assert now.fds == before.fds, f"daemon fds {before.fds} -> {now.fds}"
    assert now.threads == before.threads, f"daemon threads {before.threads} -> {now.threads}"
    assert now.traced == (), f"the daemon is still attached to {now.traced}"
    assert now.rss_kib - before.rss_kib < RSS_SLACK_KIB, f"daemon RSS {before.rss_kib} -> {now.rss_kib} KiB"
    return now


def status_field(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0
