"""``cuse-ksm pages``: arguments, the files parsed, the summary, ``-v`` runs and ``--map``, on the host.

The files are the control tree's own text over an engine with fake memory
(tests/engine/fakes.py, ``mixed``: every state a scanned region can show),
written to a directory laid out as the daemon's mount is.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from cuse_ksm import cli, pages
from cuse_ksm.abi import PAGE_SIZE
from cuse_ksm.controltree import ControlTree
from cuse_ksm.engine import STATE_NAMES, Engine
from tests.engine.fakes import MIXED_ADDR, MIXED_PAGES, FakeSpace, mixed, page

A = MIXED_ADDR
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def control_dir(tmp_path: Path, engine: Engine, *pids: int) -> str:
    """The files `cuse-ksm pages` reads, as the daemon would serve them for ``engine``."""
    tree = ControlTree(engine)
    (tmp_path / "pages_shared").write_text("0\n")
    for pid in pids:
        d = tmp_path / "processes" / str(pid)
        d.mkdir(parents=True)
        for name in ("pages", "page_runs"):
            inode = tree.path(f"processes/{pid}/{name}")
            assert inode is not None
            (d / name).write_bytes(tree.read(inode))
    return str(tmp_path)


def args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["pages", *argv])


def report(directory: str, *argv: str, width: int = 80) -> tuple[int, str]:
    out: list[str] = []
    rc = pages.run(args(*argv, "--dir", directory), out.append, width=width)
    return rc, "".join(out)


# -- arguments ---------------------------------------------------------------------------


def test_pid_and_address_or_range() -> None:
    a = args("42")
    assert (a.pid, a.range, a.verbose, a.map) == (42, None, False, False)
    assert args("42", "7f0000001234").range == (0x7F00_0000_1000, 0x7F00_0000_2000)  # the page holding it
    assert args("42", "0x7f0000001000-0x7f0000003000").range == (0x7F00_0000_1000, 0x7F00_0000_3000)
    assert args("42", "7f0000001000-7f0000003000", "-v", "--map").range == (0x7F00_0000_1000, 0x7F00_0000_3000)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x"], "'x' is not a process id"),
        (["0"], "'0' is not a process id"),
        (["-5"], ""),  # argparse takes it for an option
        (["42", "zz"], "'zz' is not a hexadecimal address"),
        (["42", "0x"], "'0x' is not a hexadecimal address"),
        (["42", "1000-"], "'' is not a hexadecimal address"),
        (["42", "3000-1000"], "'3000-1000': the end must lie above the start"),
        (["42", "1000-1000"], "the end must lie above the start"),
        (["42", "1000", "2000"], "unrecognized arguments: 2000"),
        ([], "the following arguments are required: PID"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["pages", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# -- the files and the summary -----------------------------------------------------------


def test_the_renderer_knows_every_state_the_daemon_names() -> None:
    assert list(pages.LOOKS) == list(STATE_NAMES.values())
    assert len({look.glyph for look in pages.LOOKS.values()}) == len(pages.LOOKS)


def test_summary_counts_each_state_and_the_shared_pages(tmp_path: Path) -> None:
    e, _, _ = mixed(tgid=77)
    rc, text = report(control_dir(tmp_path, e, 77), "77")
    assert rc == 0
    lines = text.splitlines()
    assert lines[0] == f"cuse-ksm pages of process 77 ({tmp_path})"
    assert lines[2] == f"region {A:#x}-{A + MIXED_PAGES * PAGE_SIZE:#x}: sma 1, 700 pages (2.73 MiB)"
    rows = {line.split()[0]: line.split()[1] for line in lines[3:] if line.split()[0] in pages.LOOKS}
    assert rows == {
        "merged": "11",
        "unstable": "10",
        "volatile": "5",
        "seen_once": "1",
        "written": "1",
        "at_limit": "1",
        "not_present": str(MIXED_PAGES - 33),
        "zero_page": "3",
        "unreadable": "1",
    }
    assert "into 2 shared pages: #1 (10 sharers, 10 here), #2 (1 sharer, 1 here)" in text
    assert pages.LOOKS["at_limit"].why in text and pages.LOOKS["not_scanned"].why not in text


def test_a_range_counts_only_its_pages(tmp_path: Path) -> None:
    e, _, _ = mixed(tgid=77)
    d = control_dir(tmp_path, e, 77)
    rc, text = report(d, "77", f"{A + 5 * PAGE_SIZE:x}-{A + 21 * PAGE_SIZE:x}")
    assert rc == 0
    counts = {w[0]: int(w[1]) for line in text.splitlines() if (w := line.split()) and w[0] in pages.LOOKS}
    assert counts == {"merged": 6, "unstable": 5, "volatile": 5}  # pages 5-9 and 20; 10-14; 15-19
    assert "into 2 shared pages: #1 (10 sharers, 5 here), #2 (1 sharer, 1 here)" in text
    rc, text = report(d, "77", f"{A + 31 * PAGE_SIZE + 7:#x}")  # the page holding this address
    assert rc == 0 and re.search(r"\n  at_limit +1 +100\.0%", text)


def test_runs_list_each_address_range_with_its_state(tmp_path: Path) -> None:
    e, _, _ = mixed(tgid=77)
    rc, text = report(control_dir(tmp_path, e, 77), "77", "-v")
    assert rc == 0
    runs = text.split(f"\nregion {A:#x}-{A + MIXED_PAGES * PAGE_SIZE:#x}:\n")[1].splitlines()
    assert runs[0] == f"  {A:#x}-{A + 10 * PAGE_SIZE:#x}         10 merged into #1 (10 sharers)"
    assert runs[5].split() == [f"{A + 22 * PAGE_SIZE:#x}-{A + 24 * PAGE_SIZE:#x}", "2", "zero_page"]
    assert len(runs) == 16


def test_zeros_are_named_in_runs_and_shared_pages(tmp_path: Path) -> None:
    e = Engine()
    space = FakeSpace(9)
    space.map(0x10000, [bytes(PAGE_SIZE)] * 3 + [page(5)])
    e.register(e.new_sma(), space, 0x10000, 4)
    e.scan_now(8)
    rc, text = report(control_dir(tmp_path, e, 9), "9", "-v")
    assert rc == 0
    assert "into 1 shared pages: #1 (3 sharers, 3 here, zeros)" in text
    assert "  0x10000-0x13000          3 merged into #1 (3 sharers, zeros)" in text


# -- the map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [40, 80, 200])
def test_the_map_fits_the_width_and_shows_the_dominant_state(tmp_path: Path, width: int) -> None:
    e, _, _ = mixed(tgid=77)
    rc, text = report(control_dir(tmp_path, e, 77), "77", "--map", width=width)
    assert rc == 0 and "\x1b[" not in text  # not a terminal: plain glyphs
    strip = text.split("  1 cell = ")[1].splitlines()
    per_cell = int(strip[0].split()[0])
    rows = [line for line in strip[1:] if line.startswith("  0x")]
    assert all(len(line) <= width for line in rows)
    cells = "".join(line.split()[1] for line in rows)
    assert len(cells) == -(-MIXED_PAGES // per_cell)
    if per_cell == 1:  # wide enough for a page a cell: the pages themselves
        assert cells[:33] == "#" * 10 + "+" * 5 + "~" * 5 + "#w00X" + "." * 5 + "+Lo"
    assert cells[-1] == "."  # not present dominates the end
    assert strip[-1].startswith("  legend: # merged  + unstable")


def test_map_cells_by_majority_ties_to_the_state_shown_first() -> None:
    region = pages.Region(1, 0, 6)
    region.runs = [
        pages.PageRun(0, 2, "not_present"),
        pages.PageRun(2 * PAGE_SIZE, 2, "merged", 1, 2),
        pages.PageRun(4 * PAGE_SIZE, 1, "volatile"),
        pages.PageRun(5 * PAGE_SIZE, 1, "not_present"),
    ]
    # 2 against 2, 1 against 1: the state shown first wins
    assert pages.map_cells(region, 4) == ["merged", "volatile"]
    assert pages.map_cells(region, 3) == ["not_present", "merged"]
    assert pages.map_cells(region, 1) == ["not_present"] * 2 + ["merged"] * 2 + ["volatile", "not_present"]


def test_a_terminal_gets_colours() -> None:
    e, _, _ = mixed(tgid=77)
    tree = ControlTree(e)
    inode = tree.path("processes/77/page_runs")
    assert inode is not None
    region = pages.parse_pages(tree.read(inode).decode())[0]
    text = pages.render_map(region, 80, colour=True)
    assert "\x1b[32m#\x1b[0m" in text  # merged, green
    assert ANSI.sub("", text) == pages.render_map(region, 80, colour=False)


# -- errors ------------------------------------------------------------------------------------


def test_no_daemon_no_process_no_pages_in_range_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = report(str(tmp_path / "none"), "77")
    assert rc == 1 and "is the cuse-ksm daemon running?" in capsys.readouterr().err
    e, _, _ = mixed(tgid=77)
    d = control_dir(tmp_path, e, 77)
    rc, _ = report(d, "78")
    assert rc == 1 and "process 78 has no registered memory" in capsys.readouterr().err
    rc, _ = report(d, "77", "1000-2000")
    assert rc == 1 and "process 77 registered no page in 0x1000-0x2000" in capsys.readouterr().err
    (Path(d) / "processes" / "77" / "pages").write_text("state merged 3\n")
    rc, _ = report(d, "77")
    assert rc == 1 and "not the format of cuse-ksm's pages file" in capsys.readouterr().err
