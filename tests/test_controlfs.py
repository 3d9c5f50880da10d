"""The control filesystem: the table over an engine, then a real FUSE mount of it."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from cuse_ksm import abi, controlfs
from cuse_ksm.controlfs import PROCESSES_INODE, ROOT_INODE, ControlTree, read_value, write_value
from cuse_ksm.device import Done, KsmDevice
from cuse_ksm.engine import Engine
from tests.engine.fakes import FakeSpace, full_scans, page, unique_page

ROOT = Path(__file__).resolve().parents[1]
READ_ONLY = [v.name for v in controlfs.VALUES if not v.writable]

# -- the table, without FUSE ----------------------------------------------------------


def kthread_ioctl(engine: Engine, info: abi.KthreadInfo) -> Done:
    dev = KsmDevice(engine, FakeSpace)
    fh = dev.open().fh
    out = dev.ioctl(fh, abi.KSM_START_STOP_KTHREAD, 1, info.pack())
    assert isinstance(out, Done)
    return out


def get_info(engine: Engine) -> abi.KthreadInfo:
    dev = KsmDevice(engine, FakeSpace)
    out = dev.ioctl(dev.open().fh, abi.KSM_GET_INFO_KTHREAD, 1, b"", abi.STRUCT_SIZE)
    assert isinstance(out, Done)
    return abi.KthreadInfo.unpack(out.out)


def test_the_files_are_those_of_the_issue():
    assert [v.name for v in controlfs.VALUES if v.writable] == [
        "run",
        "sleep",
        "sleep_millisecs",
        "pages_to_scan",
        "max_kernel_pages",
    ]
    assert sorted(READ_ONLY) == sorted(
        [
            "kernel_pages_allocated",
            "pages_shared",
            "pages_sharing",
            "pages_unshared",
            "pages_volatile",
            "full_scans",
            "pages_scanned",
        ]
    )


def test_initial_values_are_one_number_and_a_newline():
    e = Engine()
    for v in controlfs.VALUES:
        assert read_value(e, v.name) == b"0\n", v.name


def test_writes_act_on_the_state_the_ioctls_see():
    e = Engine()
    write_value(e, "pages_to_scan", b"100\n")
    write_value(e, "sleep", b"250\n")
    write_value(e, "run", b"1\n")
    assert get_info(e) == abi.KthreadInfo(sleep=250, pages_to_scan=100, flags=1)
    write_value(e, "sleep_millisecs", b"7")
    assert get_info(e).sleep == 7000 and read_value(e, "sleep") == b"7000\n"
    write_value(e, "run", b"0\n")
    assert get_info(e).flags == 0
    # ...and the reverse: the ioctl's change shows in the files.
    assert kthread_ioctl(e, abi.KthreadInfo(sleep=1500, pages_to_scan=64, flags=1)) == Done(0)
    assert [read_value(e, n) for n in ("run", "sleep", "sleep_millisecs", "pages_to_scan")] == [
        b"1\n",
        b"1500\n",
        b"1\n",  # 1.5 ms, rounded down
        b"64\n",
    ]
    write_value(e, "max_kernel_pages", b"4096\n")
    assert e.max_kernel_pages == 4096 and read_value(e, "max_kernel_pages") == b"4096\n"


def test_run_keeps_the_other_flag_bits():
    e = Engine()
    kthread_ioctl(e, abi.KthreadInfo(sleep=1, pages_to_scan=1, flags=0b110))
    assert read_value(e, "run") == b"0\n"
    write_value(e, "run", b"1")
    assert e.kthread.flags == 0b111
    write_value(e, "run", b"0")
    assert e.kthread.flags == 0b110


def test_run_with_no_pages_to_scan_is_stored_unlike_the_ioctl_quirk():
    e = Engine()
    # The 2009 ioctl: +1 and nothing changes.
    assert kthread_ioctl(e, abi.KthreadInfo(sleep=5, pages_to_scan=0, flags=1)) == Done(1)
    assert e.kthread.flags == 0
    # The file: stored, as later kernels do; the scanner still has nothing to do.
    write_value(e, "run", b"1\n")
    assert get_info(e) == abi.KthreadInfo(sleep=0, pages_to_scan=0, flags=1)


BAD_WRITES = [
    ("run", b"2\n"),  # later kernels' unmerge: not in the 2009 driver
    ("run", b"-1\n"),
    ("run", b"yes\n"),
    ("run", b""),
    ("run", b"\n"),
    ("run", b"1 1\n"),
    ("run", b"0x1\n"),
    ("run", b"+1\n"),
    ("sleep", b"4294967296\n"),  # 2**32: not a __u32
    ("sleep", b"1.5\n"),
    ("sleep_millisecs", b"4294968\n"),  # * 1000 > 2**32 - 1
    ("pages_to_scan", b"4294967296\n"),
    ("pages_to_scan", b"10 pages\n"),
    ("max_kernel_pages", b"18446744073709551616\n"),  # 2**64
    ("max_kernel_pages", b"1" * 100),
    ("pages_to_scan", "\u0663\n".encode()),  # an Arabic-Indic three: a digit to str.isdigit, not to us
]


@pytest.mark.parametrize(("name", "data"), BAD_WRITES)
def test_bad_writes_are_einval_and_change_nothing(name, data):
    e = Engine()
    kthread_ioctl(e, abi.KthreadInfo(sleep=300, pages_to_scan=32, flags=1))
    e.max_kernel_pages = 9
    before = (e.kthread, e.max_kernel_pages)
    with pytest.raises(OSError) as exc:
        write_value(e, name, data)
    assert exc.value.errno == errno.EINVAL
    assert (e.kthread, e.max_kernel_pages) == before


def test_largest_values_fit():
    e = Engine()
    write_value(e, "sleep_millisecs", b"4294967\n")
    assert e.kthread.sleep == 4294967000
    write_value(e, "sleep", b"4294967295\n")
    write_value(e, "pages_to_scan", b"4294967295\n")
    assert get_info(e) == abi.KthreadInfo(sleep=abi.U32_MAX, pages_to_scan=abi.U32_MAX, flags=0)
    write_value(e, "max_kernel_pages", b"18446744073709551615\n")
    assert e.max_kernel_pages == abi.U64_MAX


@pytest.mark.parametrize("name", READ_ONLY)
def test_counters_are_read_only(name):
    with pytest.raises(OSError) as exc:
        write_value(Engine(), name, b"1\n")
    assert exc.value.errno == errno.EACCES


@given(st.integers(min_value=0, max_value=abi.U32_MAX), st.sampled_from(["sleep", "pages_to_scan"]))
def test_any_u32_round_trips(value, name):
    e = Engine()
    write_value(e, name, b"%d\n" % value)
    assert read_value(e, name) == b"%d\n" % value
    assert getattr(get_info(e), name) == value


def engine_with_duplicates(n: int = 8, tgids: tuple[int, ...] = (4242,)) -> Engine:
    """Each process maps ``n`` identical pages and two unique ones; one full pass of merging done."""
    e = Engine()
    for t, tgid in enumerate(tgids):
        space = FakeSpace(tgid)
        space.map(0x10000, [page(7)] * n + [unique_page(2 * t), unique_page(2 * t + 1)])
        e.register(e.new_sma(), space, 0x10000, n + 2)
    full_scans(e, 3)
    return e


def test_counters_are_the_engines():
    e = engine_with_duplicates(8, (100, 200))
    c = e.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 15)
    for name in READ_ONLY:
        assert read_value(e, name) == b"%d\n" % getattr(c, name), name


def test_tree_lists_values_and_a_directory_per_process():
    e = engine_with_duplicates(8, (300, 100))
    tree = ControlTree(e)
    assert [name for name, _ in tree.entries(ROOT_INODE)] == [v.name for v in controlfs.VALUES] + ["processes"]
    assert [name for name, _ in tree.entries(PROCESSES_INODE)] == ["100", "300"]
    proc = tree.path("processes/100")
    assert proc is not None and tree.node(proc).is_dir
    assert [name for name, _ in tree.entries(proc)] == ["ksm_merging_pages", "regions"]
    assert tree.read(tree.path("processes/100/ksm_merging_pages")) == b"8\n"
    sma = e.slots[1].sma.id
    assert tree.read(tree.path("processes/100/regions")) == f"sma addr npages merged\n{sma} 0x10000 10 8\n".encode()
    assert tree.read(tree.path("pages_sharing")) == b"15\n"
    assert tree.path("processes/999") is None and tree.path("nothing") is None
    # REMOVE: the directory goes with the process's last region.
    e.remove_regions(e.slots[0].sma)
    assert [name for name, _ in tree.entries(PROCESSES_INODE)] == ["100"]
    assert tree.node(ControlTree.process_inode(300)) is None


def test_tree_writes_only_the_knobs():
    e = Engine()
    tree = ControlTree(e)
    tree.write(tree.path("pages_to_scan"), b"5\n")
    assert e.kthread.pages_to_scan == 5
    with pytest.raises(OSError) as exc:
        tree.write(tree.path("pages_shared"), b"5\n")
    assert exc.value.errno == errno.EACCES


# -- a real mount --------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root (allow_other)"
)


@contextlib.contextmanager
def mount_dir() -> Iterator[str]:
    """A mount point under a 0755 directory, so that other users can reach it."""
    parent = tempfile.mkdtemp(prefix="cuse-ksm-test-", dir="/tmp")
    os.chmod(parent, 0o755)
    try:
        yield os.path.join(parent, "ksm")
    finally:
        path = os.path.join(parent, "ksm")
        if is_mounted(path):  # the test failed; do not leave a mount behind
            subprocess.run(["umount", "-l", path], check=False)
        shutil.rmtree(parent, ignore_errors=True)


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


# Every access to a mounted path goes through a worker thread: the FUSE server
# runs in the test's own trio loop, so a blocking call in the loop's thread
# would wait forever for an answer only that thread can give.


async def read(path: str) -> str:
    """Read a file in a worker thread."""
    return await trio.to_thread.run_sync(Path(path).read_text)


async def write(path: str, data: bytes) -> int:
    """Write as ``echo`` does (O_WRONLY|O_TRUNC, one write); 0 or the errno."""

    def go() -> int:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as e:
            return e.errno or -1
        try:
            os.write(fd, data)
        except OSError as e:
            return e.errno or -1
        finally:
            os.close(fd)
        return 0

    return await trio.to_thread.run_sync(go)


async def run(*argv: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    if user is not None:
        argv = ("setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv)
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    )


async def wait_for(path: str, want: str, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while (await read(path)).strip() != want:
            await trio.sleep(0.02)


@pytest.fixture
async def mounted(nursery) -> AsyncIterator[tuple[Engine, str]]:
    engine = Engine()
    space = FakeSpace(4242)
    space.map(0x10000, [page(7)] * 16 + [unique_page(1)])
    engine.register(engine.new_sma(), space, 0x10000, 17)
    with mount_dir() as path:
        await nursery.start(engine.run)
        await nursery.start(controlfs.serve, engine, path)
        yield engine, path
        nursery.cancel_scope.cancel()


@needs_fuse
async def test_mount_shows_a_running_engines_counters(mounted):
    engine, path = mounted
    assert sorted(await trio.to_thread.run_sync(os.listdir, path)) == sorted(
        [v.name for v in controlfs.VALUES] + ["processes"]
    )
    assert await read(f"{path}/pages_sharing") == "0\n"
    # Start the scanner through the files, as an administrator would.
    assert await write(f"{path}/pages_to_scan", b"100\n") == 0
    assert await write(f"{path}/run", b"1\n") == 0
    assert engine.kthread.flags == 1 and engine.kthread.pages_to_scan == 100
    await wait_for(f"{path}/pages_sharing", "15")
    assert await read(f"{path}/pages_shared") == "1\n"
    assert await read(f"{path}/kernel_pages_allocated") == "1\n"
    assert int(await read(f"{path}/full_scans")) >= 2
    assert await read(f"{path}/processes/4242/ksm_merging_pages") == "16\n"
    regions = (await read(f"{path}/processes/4242/regions")).splitlines()
    assert regions[0] == "sma addr npages merged" and regions[1].split()[1:] == ["0x10000", "17", "16"]
    # Stop it: the counters stay, scanning stops.
    assert await write(f"{path}/run", b"0\n") == 0
    assert get_info(engine).flags == 0
    scanned = await read(f"{path}/pages_scanned")
    await trio.sleep(0.1)
    assert await read(f"{path}/pages_scanned") == scanned


@needs_fuse
async def test_ioctl_changes_show_in_the_files(mounted):
    engine, path = mounted
    kthread_ioctl(engine, abi.KthreadInfo(sleep=20000, pages_to_scan=3, flags=1))
    assert [await read(f"{path}/{n}") for n in ("run", "sleep", "sleep_millisecs", "pages_to_scan")] == [
        "1\n",
        "20000\n",
        "20\n",
        "3\n",
    ]


@needs_fuse
async def test_bad_writes_fail_with_einval_through_the_mount(mounted):
    engine, path = mounted
    assert await write(f"{path}/sleep", b"123\n") == 0
    before = (engine.kthread, engine.max_kernel_pages)
    for name, data in BAD_WRITES:
        assert await write(f"{path}/{name}", data or b"\n") == errno.EINVAL, (name, data)
    assert (engine.kthread, engine.max_kernel_pages) == before
    # A read-only counter cannot be opened for writing, not even by root.
    for name in READ_ONLY:
        assert await write(f"{path}/{name}", b"1\n") == errno.EACCES, name
    assert await read(f"{path}/sleep") == "123\n"


@needs_fuse
async def test_any_user_reads_only_root_writes(mounted):
    engine, path = mounted
    result = await run("cat", f"{path}/pages_to_scan", f"{path}/processes/4242/regions", user=65534)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("0\nsma addr npages merged\n")
    result = await run("sh", "-c", f"echo 5 > {path}/pages_to_scan", user=65534)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    assert engine.kthread.pages_to_scan == 0
    # A shell redirect from root works (O_TRUNC is accepted and ignored, as sysfs does).
    result = await run("sh", "-c", f"echo 5 > {path}/pages_to_scan")
    assert result.returncode == 0, result.stderr
    assert engine.kthread.pages_to_scan == 5
    st = await trio.to_thread.run_sync(os.stat, f"{path}/run")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    assert (await trio.to_thread.run_sync(os.stat, f"{path}/pages_shared")).st_mode & 0o777 == 0o444


@needs_fuse
async def test_mount_is_gone_after_cancel_and_after_a_crash():
    engine = Engine()
    with mount_dir() as path:
        async with trio.open_nursery() as nursery:
            await nursery.start(controlfs.serve, engine, path)
            assert is_mounted(path)
            mounts = Path("/proc/self/mounts").read_text().splitlines()
            assert f"cuse-ksm {path} fuse" in [" ".join(line.split()[:3]) for line in mounts]
            assert await read(f"{path}/run") == "0\n"
            nursery.cancel_scope.cancel()
        assert not is_mounted(path)

        # A crash elsewhere in the daemon's nursery takes the mount down too.
        with pytest.raises(ZeroDivisionError):
            async with trio.open_nursery() as nursery:
                await nursery.start(controlfs.serve, engine, path)
                assert is_mounted(path)
                raise ZeroDivisionError
        assert not is_mounted(path)


SERVE_SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from cuse_ksm import controlfs
    from cuse_ksm.engine import Engine

    async def main():
        async with trio.open_nursery() as n:
            await n.start(controlfs.serve, Engine(), sys.argv[1])
            print("mounted", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def start_server_process(path: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, path], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "mounted\n", proc.stderr.read() if proc.stderr else ""
    return proc


@needs_fuse
async def test_a_crashed_daemons_stale_mount_is_cleared(caplog):
    caplog.set_level(logging.INFO, logger="cuse_ksm")
    with mount_dir() as path:
        proc = await trio.to_thread.run_sync(start_server_process, path)
        proc.send_signal(signal.SIGKILL)  # no chance to unmount
        await trio.to_thread.run_sync(proc.wait)
        with pytest.raises(OSError) as exc:
            await trio.to_thread.run_sync(os.stat, path)
        assert exc.value.errno == errno.ENOTCONN
        engine = Engine()
        async with trio.open_nursery() as nursery:
            await nursery.start(controlfs.serve, engine, path)
            assert await read(f"{path}/pages_shared") == "0\n"
            nursery.cancel_scope.cancel()
        assert not is_mounted(path)
    assert any("stale mount" in r.getMessage() for r in caplog.records)


@needs_fuse
async def test_a_live_mount_is_not_mounted_over():
    with mount_dir() as path:
        proc = await trio.to_thread.run_sync(start_server_process, path)
        try:
            with pytest.raises(controlfs.MountError, match="already a mount point"):
                await controlfs.serve(Engine(), path)
        finally:
            proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: the serve task's finally unmounts
            await trio.to_thread.run_sync(proc.wait)
        assert not is_mounted(path)


def test_missing_mount_directories_are_created_0755(tmp_path):
    target = tmp_path / "run" / "cuse-ksm" / "ksm"
    old = os.umask(0o077)
    try:
        controlfs.prepare_mountpoint(str(target))
    finally:
        os.umask(old)
    assert target.is_dir()
    assert (target.stat().st_mode & 0o777, target.parent.stat().st_mode & 0o777) == (0o755, 0o755)
    assert controlfs.default_dir("ksm") == "/run/cuse-ksm/ksm"
