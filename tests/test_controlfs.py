"""The control files through a real FUSE mount: the pyfuse3 adapter over the tree, and the mount's lifetime.

The mount tests need /dev/fuse and root (``allow_other``); what the files
hold is tested without FUSE in tests/test_controltree.py.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from cuse_ksm import abi, controlfs, controltree, kksmd
from cuse_ksm.controltree import ControlTree
from cuse_ksm.engine import Engine
from tests.conftest import BAD_WRITES, READ_ONLY, ROOT, get_info, is_mounted, kthread_ioctl, mount_dir, needs_fuse, run
from tests.engine.fakes import FakeSpace, page, unique_page


def test_the_trees_root_is_fuses() -> None:
    assert controltree.ROOT_INODE == pyfuse3.ROOT_INODE


# -- a real mount --------------------------------------------------------------------

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


async def wait_for(path: str, want: str, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while (await read(path)).strip() != want:
            await trio.sleep(0.02)


@pytest.fixture
async def mounted(nursery: trio.Nursery) -> AsyncIterator[tuple[Engine, str]]:
    engine = Engine()
    space = FakeSpace(4242)
    space.map(0x10000, [page(7)] * 16 + [unique_page(1)])
    engine.register(engine.new_sma(), space, 0x10000, 17)
    with mount_dir() as path:
        await nursery.start(kksmd.run, engine)
        await nursery.start(controlfs.serve, ControlTree(engine), path)
        yield engine, path
        nursery.cancel_scope.cancel()


@needs_fuse
async def test_mount_shows_a_running_engines_counters(mounted: tuple[Engine, str]) -> None:
    engine, path = mounted
    assert sorted(await trio.to_thread.run_sync(os.listdir, path)) == sorted(
        [v.name for v in controltree.VALUES] + list(controltree.TEXT_FILES) + ["processes"]
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
    assert regions[0] == "sma addr npages merged mapped" and regions[1].split()[1:] == ["0x10000", "17", "16", "17"]
    # The profit files, longer than one number, come through the mount whole.
    stat = controltree.parse_stat(await read(f"{path}/processes/4242/ksm_stat"))
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"]) == ("17", "16")
    assert stat["ksm_process_profit"] == str(16 * 4096 - 17 * 64)
    assert await read(f"{path}/general_profit") == f"{15 * 4096 - 17 * 64}\n"
    memory = controltree.parse_stat(await read(f"{path}/emulator_memory"))
    assert int(memory["emulator_profit"]) == 15 * 4096 - int(memory["metadata"])
    # Stop it: the counters stay, scanning stops.
    assert await write(f"{path}/run", b"0\n") == 0
    assert get_info(engine).flags == 0
    scanned = await read(f"{path}/pages_scanned")
    await trio.sleep(0.1)
    assert await read(f"{path}/pages_scanned") == scanned


@needs_fuse
async def test_ioctl_changes_show_in_the_files(mounted: tuple[Engine, str]) -> None:
    engine, path = mounted
    kthread_ioctl(engine, abi.KthreadInfo(sleep=20000, pages_to_scan=3, flags=1))
    assert [await read(f"{path}/{n}") for n in ("run", "sleep", "sleep_millisecs", "pages_to_scan")] == [
        "1\n",
        "20000\n",
        "20\n",
        "3\n",
    ]


@needs_fuse
async def test_bad_writes_fail_with_einval_through_the_mount(mounted: tuple[Engine, str]) -> None:
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
async def test_any_user_reads_only_root_writes(mounted: tuple[Engine, str]) -> None:
    engine, path = mounted
    result = await run("cat", f"{path}/pages_to_scan", f"{path}/processes/4242/regions", user=65534)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("0\nsma addr npages merged mapped\n")
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
async def test_mount_is_gone_after_cancel_and_after_a_crash() -> None:
    engine = Engine()
    with mount_dir() as path:
        async with trio.open_nursery() as nursery:
            await nursery.start(controlfs.serve, ControlTree(engine), path)
            assert is_mounted(path)
            mounts = Path("/proc/self/mounts").read_text().splitlines()
            assert f"cuse-ksm {path} fuse" in [" ".join(line.split()[:3]) for line in mounts]
            assert await read(f"{path}/run") == "0\n"
            nursery.cancel_scope.cancel()
        assert not is_mounted(path)

        # A crash elsewhere in the daemon's nursery takes the mount down too,
        # and serve adds nothing to the error (a trio with strict exception
        # groups wraps it in the nursery's group, an older one does not).
        with pytest.RaisesGroup(ZeroDivisionError, allow_unwrapped=True):
            async with trio.open_nursery() as nursery:
                await nursery.start(controlfs.serve, ControlTree(engine), path)
                assert is_mounted(path)
                raise ZeroDivisionError
        assert not is_mounted(path)


@needs_fuse
async def test_a_crash_inside_the_filesystem_unmounts_and_fails_the_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: ControlTree, inode: int) -> Iterator[bytes]:
        raise ZeroDivisionError("a bug in the tree")

    monkeypatch.setattr(ControlTree, "read_parts", bug)
    engine = Engine()
    with mount_dir() as path:
        got: list[OSError] = []

        def read_run() -> None:
            with pytest.raises(OSError) as exc:
                Path(f"{path}/run").read_text()
            got.append(exc.value)

        # The error leaves pyfuse3's own nursery and then ours: nested groups
        # on a trio with strict exception groups, the bare error on an older one.
        with pytest.RaisesGroup(ZeroDivisionError, allow_unwrapped=True, flatten_subgroups=True):
            async with trio.open_nursery() as nursery:
                await nursery.start(controlfs.serve, ControlTree(engine), path)
                await trio.to_thread.run_sync(read_run)
        assert not is_mounted(path)
        # The request that hit the bug is never answered; closing the FUSE
        # channel aborts the connection instead of leaving the reader hung
        # (which of the two errors it sees depends on whether its request was
        # pending or not yet sent when the channel closed).
        assert len(got) == 1 and got[0].errno in (errno.ECONNABORTED, errno.ENOTCONN), got


async def test_a_refused_mount_is_raised_by_start_and_the_nursery_goes_on(tmp_path: Path) -> None:
    """The daemon catches MountError around ``nursery.start`` and serves the device without control files."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    async with trio.open_nursery() as nursery:
        with pytest.raises(controlfs.MountError, match="is not a directory"):
            await nursery.start(controlfs.serve, ControlTree(Engine()), str(not_a_dir))
        nursery.start_soon(trio.sleep, 0)  # still open for the device's tasks
    assert not is_mounted(str(not_a_dir))


SERVE_SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from cuse_ksm import controlfs
    from cuse_ksm.controltree import ControlTree
    from cuse_ksm.engine import Engine

    async def main():
        async with trio.open_nursery() as n:
            await n.start(controlfs.serve, ControlTree(Engine()), sys.argv[1])
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
async def test_a_crashed_daemons_stale_mount_is_cleared(caplog: pytest.LogCaptureFixture) -> None:
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
            await nursery.start(controlfs.serve, ControlTree(engine), path)
            assert await read(f"{path}/pages_shared") == "0\n"
            nursery.cancel_scope.cancel()
        assert not is_mounted(path)
    assert any("stale mount" in r.getMessage() for r in caplog.records)


@needs_fuse
async def test_a_live_mount_is_not_mounted_over() -> None:
    with mount_dir() as path:
        proc = await trio.to_thread.run_sync(start_server_process, path)
        try:
            with pytest.raises(controlfs.MountError, match="already a mount point"):
                await controlfs.serve(ControlTree(Engine()), path)
        finally:
            proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: the serve task's finally unmounts
            await trio.to_thread.run_sync(proc.wait)
        assert not is_mounted(path)


def test_missing_mount_directories_are_created_0755(tmp_path: Path) -> None:
    target = tmp_path / "run" / "cuse-ksm" / "ksm"
    old = os.umask(0o077)
    try:
        controlfs.prepare_mountpoint(str(target))
    finally:
        os.umask(old)
    assert target.is_dir()
    assert (target.stat().st_mode & 0o777, target.parent.stat().st_mode & 0o777) == (0o755, 0o755)
    assert controltree.default_dir("ksm") == "/run/cuse-ksm/ksm"


@needs_fuse
async def test_the_loop_runs_between_the_pieces_of_a_large_pages_file(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    """A ``pages`` file is built a chunk at a time; the daemon's other tasks (the scanner) run in between."""
    monkeypatch.setattr(controlfs, "READ_SLICE", 0.0)  # a checkpoint after every piece
    engine = Engine()
    space = FakeSpace(31)
    for i in range(0, 1 << 14, 1 << 8):  # one page in each of 64 chunks
        space.map(0x10_0000 + i * abi.PAGE_SIZE, [unique_page(i)])
    engine.register(engine.new_sma(), space, 0x10_0000, 1 << 14)
    engine.scan_now(1 << 14)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    seen: list[int] = []
    real = ControlTree.read_parts

    def watched(self: ControlTree, inode: int) -> Iterator[bytes]:
        for part in real(self, inode):
            seen.append(ticks)
            yield part

    monkeypatch.setattr(ControlTree, "read_parts", watched)
    with mount_dir() as path:
        nursery.start_soon(tick)
        await nursery.start(controlfs.serve, ControlTree(engine), path)
        text = await read(f"{path}/processes/31/pages")
        nursery.cancel_scope.cancel()
    assert "state seen_once 64\n" in text
    # Another task ran between the pieces.  Not between every two: trio may run
    # the reader twice in a row when it reverses a batch of runnable tasks.
    assert len(seen) == 64 + 1 and len(set(seen)) >= 16, seen


@pytest.mark.parametrize("running", [False, True])
async def test_while_the_scanner_runs_a_large_file_takes_a_small_share_of_the_loop(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock, running: bool
) -> None:
    """Between pieces the build waits READ_SHARE's complement of its time, but only while the scanner runs."""
    monkeypatch.setattr(controlfs, "READ_SLICE", 0.0)  # a pause after every piece
    engine = Engine()
    space = FakeSpace(31)
    for i in range(0, 1 << 12, 1 << 8):
        space.map(0x10_0000 + i * abi.PAGE_SIZE, [unique_page(i)])
    engine.register(engine.new_sma(), space, 0x10_0000, 1 << 12)
    engine.scan_now(1 << 12)
    if running:
        engine.set_kthread(sleep=0, pages_to_scan=100, flags=1)
    tree = ControlTree(engine)
    inode = tree.path("processes/31/pages")
    assert inode is not None
    before = trio.current_time()
    text = await controlfs.ControlOperations(tree).contents(inode)
    assert text == tree.read(inode)
    # Virtual time passes only in the pauses: none when the scanner is idle.
    assert (trio.current_time() > before) == running
