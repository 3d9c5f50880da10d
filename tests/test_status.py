"""``cuse-ksm status``: the report, the errors, --watch, and a run against a real mount."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import trio

from cuse_ksm import controlfs, kksmd, status
from cuse_ksm.controltree import ControlTree
from cuse_ksm.engine import Engine
from tests.conftest import mount_dir, needs_fuse, python, run
from tests.engine.fakes import FakeSpace, page

VALUES = {
    "run": 1,
    "sleep": 200,
    "sleep_millisecs": 0,
    "pages_to_scan": 100,
    "max_kernel_pages": 0,
    "kernel_pages_allocated": 2,
    "pages_shared": 2,
    "pages_sharing": 510,
    "pages_unshared": 7,
    "pages_volatile": 3,
    "full_scans": 4,
    "pages_scanned": 2048,
}


def fake_dir(tmp_path: Path, values: dict[str, int] = VALUES) -> Path:
    """A directory shaped like the mount: status only reads files, so plain files will do."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (tmp_path / name).write_text(f"{value}\n")
    proc = tmp_path / "processes" / "1234"
    proc.mkdir(parents=True)
    (proc / "ksm_merging_pages").write_text("512\n")
    (proc / "regions").write_text(
        "sma addr npages merged mapped\n1 0x7f0000000000 500 500 500\n2 0x7f1000000000 20 12 20\n"
    )
    return tmp_path


def test_report_shows_counters_savings_and_processes(tmp_path: Path) -> None:
    text = status.render(status.read_snapshot(str(fake_dir(tmp_path))))
    lines = text.splitlines()
    assert lines[0] == f"cuse-ksm status of {tmp_path}"
    assert lines[1] == "scanner: running (100 pages every 200 us), max_kernel_pages unlimited"
    table = {line.split()[0]: line.split()[1:] for line in lines[3:10] if line.strip()}
    assert table["pages_sharing"] == ["510", "1.99"]  # 510 * 4096 bytes
    assert table["pages_shared"] == ["2", "0.01"]
    assert table["full_scans"] == ["4"]  # not pages: no MiB
    # Emulated figures: nothing is shared, and the report must not read as if it were.
    assert "would save: 1.99 MiB (510 pages: pages_sharing)" in lines
    assert "would cost: 0.01 MiB (2 shared pages kept: pages_shared)" in lines
    assert not any(line.startswith("saved") for line in lines)
    assert "no memory is shared: these are the emulator's figures (--merge kernel shares for real)" in lines
    assert "sharing ratio: 255.0 sites per shared page" in lines
    assert lines[-2].split() == ["pid", "regions", "pages", "merged", "MiB", "merged"]
    assert lines[-1].split() == ["1234", "2", "520", "512", "2.00"]


def test_kernel_mode_shows_what_is_really_shared(tmp_path: Path) -> None:
    host = {"host_pages_shared": 4, "host_pages_sharing": 16380, "host_ksm_merging_pages": 16384}
    directory = fake_dir(tmp_path, {**VALUES, **host})
    (directory / "processes" / "1234" / "host_ksm_merging_pages").write_text("16384\n")
    lines = status.render(status.read_snapshot(str(directory))).splitlines()
    assert "would save: 1.99 MiB (510 pages: pages_sharing)" in lines  # the emulated figures stay
    assert "really shared (host KSM): 16384 pages (64.00 MiB) of the registered processes" in lines
    assert (
        "  host-wide: pages_shared 4, pages_sharing 16380: 63.98 MiB saved, counting every user of KSM on the host"
        in lines
    )
    assert not any(line.startswith("no memory is shared") for line in lines)
    assert not any("paused" in line for line in lines)  # no cross_check file: nothing said about it
    (directory / "cross_check").write_text("0\n")
    paused = status.render(status.read_snapshot(str(directory))).splitlines()
    assert "(the emulated scanner is paused in kernel mode, so these stay 0: --cross-check runs it)" in paused
    assert lines[-2].split() == ["pid", "regions", "pages", "merged", "MiB", "merged", "host", "merged"]
    assert lines[-1].split() == ["1234", "2", "520", "512", "2.00", "16384"]


EMULATOR_MEMORY = (
    "rmap_chunks 2400000\nunstable_table 3000000\nstable_pages 10000\nslots 600\nread_buffer 548920\n"
    "metadata 5959520\nshared_copies 8258\nregistered_pages 262144\nrmap_items 262144\n"
    "metadata_per_page 20.6\nmetadata_per_rmap_item 20.6\nemulator_profit -3870560\n"
)


def test_profit_lines_say_would_and_charge_the_emulators_real_cost(tmp_path: Path) -> None:
    # 510 pages saved, 520 rmap items: 510 * 4096 - 520 * 64 = 2055680 bytes.
    directory = fake_dir(tmp_path, {**VALUES, "general_profit": 2055680})
    (directory / "emulator_memory").write_text(EMULATOR_MEMORY)
    lines = status.render(status.read_snapshot(str(directory))).splitlines()
    assert (
        "profit, today's kernel's formula: would be 1.96 MiB "
        "(general_profit: 510 pages saved less 64 B for each of 520 rmap items)"
    ) in lines
    assert (
        "profit, the emulator's real cost: would be -3.69 MiB "
        "(emulator_profit: 510 pages saved less 5.68 MiB of metadata, 20.6 B per registered page; see emulator_memory)"
    ) in lines
    # A loss reads as one: the file's minus sign is kept.
    (directory / "general_profit").write_text("-16640\n")
    lines = status.render(status.read_snapshot(str(directory))).splitlines()
    assert any(line.startswith("profit, today's kernel's formula: would be -0.02 MiB") for line in lines)
    assert any("less 64 B for each of 32900 rmap items" in line for line in lines)


def test_the_hosts_general_profit_where_it_has_one(tmp_path: Path) -> None:
    host = {"host_pages_shared": 4, "host_pages_sharing": 16380, "host_ksm_merging_pages": 16384}
    directory = fake_dir(tmp_path, {**VALUES, **host})
    lines = status.render(status.read_snapshot(str(directory))).splitlines()
    assert not any("host-wide profit" in line for line in lines)  # a 6.1 host: no such file
    (directory / "host_general_profit").write_text("-1048576\n")
    lines = status.render(status.read_snapshot(str(directory))).splitlines()
    assert "  host-wide profit: -1.00 MiB (the host's general_profit)" in lines


def test_a_kernels_own_directory_shows_real_savings(tmp_path: Path) -> None:
    """``--dir /sys/kernel/mm/ksm``: no processes/, and its counters are real sharing."""
    for name, value in VALUES.items():
        (tmp_path / name).write_text(f"{value}\n")
    (tmp_path / "general_profit").write_text("2055680\n")
    lines = status.render(status.read_snapshot(str(tmp_path))).splitlines()
    assert "saved: 1.99 MiB (510 pages: pages_sharing)" in lines
    assert "profit: 1.96 MiB (general_profit)" in lines
    assert not any(line.startswith(("would", "no memory")) or "would be" in line for line in lines)


def test_scanner_states(tmp_path: Path) -> None:
    stopped = status.render(status.read_snapshot(str(fake_dir(tmp_path, {**VALUES, "run": 0}))))
    assert "scanner: stopped" in stopped
    idle = {**VALUES, "pages_to_scan": 0, "max_kernel_pages": 64}
    text = status.render(status.read_snapshot(str(fake_dir(tmp_path / "b", idle))))
    assert "set to run, but idle: pages_to_scan is 0" in text and "max_kernel_pages 64" in text


def test_rates_per_second_between_two_frames() -> None:
    before = status.Snapshot("/d", 10.0, dict(VALUES))
    after = status.Snapshot("/d", 12.0, {**VALUES, "pages_scanned": 2048 + 1000, "full_scans": 6})
    lines = status.render(after, before).splitlines()
    assert lines[3].split() == ["pages", "MiB", "/s"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[4:10]}
    assert rows["pages_scanned"] == ["3048", "11.91", "500.0"]
    assert rows["full_scans"] == ["6", "1.0"]
    assert rows["pages_sharing"][-1] == "0.0"


def test_watch_redraws_with_rates(tmp_path: Path) -> None:
    args = argparse.Namespace(dir=str(fake_dir(tmp_path)), watch=0.05, count=3)
    frames: list[str] = []
    assert status.run(args, out=frames.append) == 0
    assert len(frames) == 3
    assert "/s" not in frames[0] and "/s" in frames[1] and "/s" in frames[2]


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    for directory, message in [
        (tmp_path / "missing", "no control files at"),
        (tmp_path, "not a cuse-ksm control directory"),
    ]:
        result = python("-m", "cuse_ksm", "status", "--dir", str(directory))
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# ``python -m cuse_ksm ARGS`` in a process where ``import pyfuse3`` fails, as
# it does on a machine without pyfuse3 (a None in sys.modules halts the import).
WITHOUT_PYFUSE3 = (
    "import runpy, sys; sys.modules['pyfuse3'] = None; "
    "runpy.run_module('cuse_ksm', run_name='__main__', alter_sys=True)"
)


def without_pyfuse3(*argv: str) -> subprocess.CompletedProcess[str]:
    return python("-c", WITHOUT_PYFUSE3, *argv)


def test_status_and_help_run_without_pyfuse3(tmp_path: Path) -> None:
    # The wrapper does take pyfuse3 away: the FUSE adapter cannot be imported.
    blocked = python("-c", "import sys; sys.modules['pyfuse3'] = None; import cuse_ksm.controlfs")
    assert blocked.returncode == 1 and "ModuleNotFoundError: import of pyfuse3 halted" in blocked.stderr
    directory = str(fake_dir(tmp_path))
    result = without_pyfuse3("status", "--dir", directory)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == status.render(status.read_snapshot(directory))
    result = without_pyfuse3("--help")
    assert result.returncode == 0, result.stderr
    assert "--stats-dir DIR" in result.stdout and "{status,pages}" in result.stdout
    result = without_pyfuse3("status", "--help")
    assert result.returncode == 0 and "--watch [SECONDS]" in result.stdout, result.stderr
    # A status error is still the one clear line, not an ImportError.
    result = without_pyfuse3("status", "--dir", str(tmp_path / "missing"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "no control files at" in result.stderr


@needs_fuse
async def test_status_of_a_live_mount(nursery: trio.Nursery) -> None:
    engine = Engine()
    space = FakeSpace(777)
    space.map(0x20000, [page(3)] * 64)
    engine.register(engine.new_sma(), space, 0x20000, 64)
    engine.set_kthread(0, 64, 1)
    with mount_dir() as path:
        await nursery.start(kksmd.run, engine)
        await nursery.start(controlfs.serve, ControlTree(engine), path)
        with trio.fail_after(10):
            while engine.counters().pages_sharing != 63:
                await trio.sleep(0.01)
        result = await run(sys.executable, "-m", "cuse_ksm", "status", "--dir", path)
        assert result.returncode == 0, result.stderr
        assert "would save: 0.25 MiB (63 pages: pages_sharing)" in result.stdout
        # 63 pages saved, 64 rmap items: 63 * 4096 - 64 * 64 bytes, 0.24 MiB.
        assert (
            "profit, today's kernel's formula: would be 0.24 MiB "
            "(general_profit: 63 pages saved less 64 B for each of 64 rmap items)"
        ) in result.stdout.splitlines()
        assert "profit, the emulator's real cost: would be " in result.stdout
        assert result.stdout.splitlines()[-1].split() == ["777", "1", "64", "64", "0.25"]
        nursery.cancel_scope.cancel()
