"""The control tree without FUSE: the table of values over an engine, and the directory tree.

No mount, no trio, no root: what the files are, what a read returns and
what a write does.  tests/test_controlfs.py serves the same tree through a
real FUSE mount.
"""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuse_ksm import abi, controltree
from cuse_ksm.controltree import PROCESSES_INODE, ROOT_INODE, ControlTree, read_value, write_value
from cuse_ksm.device import Done
from cuse_ksm.engine import Engine
from tests.conftest import BAD_WRITES, READ_ONLY, get_info, kthread_ioctl
from tests.engine.fakes import MIXED_ADDR, MIXED_PAGES, FakeSpace, full_scans, mixed, page, unique_page


def test_the_files_and_which_of_them_are_writable() -> None:
    assert [v.name for v in controltree.VALUES if v.writable] == [
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
            "general_profit",
        ]
    )


def test_initial_values_are_one_number_and_a_newline() -> None:
    e = Engine()
    for v in controltree.VALUES:
        assert read_value(e, v.name) == b"0\n", v.name


def test_writes_act_on_the_state_the_ioctls_see() -> None:
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


def test_run_keeps_the_other_flag_bits() -> None:
    e = Engine()
    kthread_ioctl(e, abi.KthreadInfo(sleep=1, pages_to_scan=1, flags=0b110))
    assert read_value(e, "run") == b"0\n"
    write_value(e, "run", b"1")
    assert e.kthread.flags == 0b111
    write_value(e, "run", b"0")
    assert e.kthread.flags == 0b110


def test_run_with_no_pages_to_scan_is_stored_unlike_the_ioctl_quirk() -> None:
    e = Engine()
    # The 2009 ioctl: +1 and nothing changes.
    assert kthread_ioctl(e, abi.KthreadInfo(sleep=5, pages_to_scan=0, flags=1)) == Done(1)
    assert e.kthread.flags == 0
    # The file: stored, as later kernels do; the scanner still has nothing to do.
    write_value(e, "run", b"1\n")
    assert get_info(e) == abi.KthreadInfo(sleep=0, pages_to_scan=0, flags=1)


@pytest.mark.parametrize(("name", "data"), BAD_WRITES)
def test_bad_writes_are_einval_and_change_nothing(name: str, data: bytes) -> None:
    e = Engine()
    kthread_ioctl(e, abi.KthreadInfo(sleep=300, pages_to_scan=32, flags=1))
    e.max_kernel_pages = 9
    before = (e.kthread, e.max_kernel_pages)
    with pytest.raises(OSError) as exc:
        write_value(e, name, data)
    assert exc.value.errno == errno.EINVAL
    assert (e.kthread, e.max_kernel_pages) == before


def test_largest_values_fit() -> None:
    e = Engine()
    write_value(e, "sleep_millisecs", b"4294967\n")
    assert e.kthread.sleep == 4294967000
    write_value(e, "sleep", b"4294967295\n")
    write_value(e, "pages_to_scan", b"4294967295\n")
    assert get_info(e) == abi.KthreadInfo(sleep=abi.U32_MAX, pages_to_scan=abi.U32_MAX, flags=0)
    write_value(e, "max_kernel_pages", b"18446744073709551615\n")
    assert e.max_kernel_pages == abi.U64_MAX


@pytest.mark.parametrize("name", READ_ONLY)
def test_counters_are_read_only(name: str) -> None:
    with pytest.raises(OSError) as exc:
        write_value(Engine(), name, b"1\n")
    assert exc.value.errno == errno.EACCES


@given(st.integers(min_value=0, max_value=abi.U32_MAX), st.sampled_from(["sleep", "pages_to_scan"]))
def test_any_u32_round_trips(value: int, name: str) -> None:
    e = Engine()
    write_value(e, name, b"%d\n" % value)
    assert read_value(e, name) == b"%d\n" % value
    assert getattr(get_info(e), name) == value


def at(tree: ControlTree, path: str) -> int:
    """The inode at ``path``, which must exist."""
    inode = tree.path(path)
    assert inode is not None, path
    return inode


def engine_with_duplicates(n: int = 8, tgids: tuple[int, ...] = (4242,)) -> Engine:
    """Each process maps ``n`` identical pages and two unique ones; one full pass of merging done."""
    e = Engine()
    for t, tgid in enumerate(tgids):
        space = FakeSpace(tgid)
        space.map(0x10000, [page(7)] * n + [unique_page(2 * t), unique_page(2 * t + 1)])
        e.register(e.new_sma(), space, 0x10000, n + 2)
    full_scans(e, 3)
    return e


def test_counters_are_the_engines() -> None:
    e = engine_with_duplicates(8, (100, 200))
    c = e.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 15)
    for name in READ_ONLY:
        assert read_value(e, name) == b"%d\n" % getattr(c, name), name


def test_tree_lists_values_and_a_directory_per_process() -> None:
    e = engine_with_duplicates(8, (300, 100))
    tree = ControlTree(e)
    assert [name for name, _ in tree.entries(ROOT_INODE)] == [
        *(v.name for v in controltree.VALUES),
        "emulator_memory",
        "processes",
    ]
    assert [name for name, _ in tree.entries(PROCESSES_INODE)] == ["100", "300"]
    proc = tree.path("processes/100")
    assert proc is not None
    node = tree.node(proc)
    assert node is not None and node.is_dir
    assert [name for name, _ in tree.entries(proc)] == [
        "ksm_merging_pages",
        "regions",
        "ksm_stat",
        "pages",
        "page_runs",
    ]
    assert tree.read(at(tree, "processes/100/ksm_merging_pages")) == b"8\n"
    sma = e.slots[1].sma.id
    regions = tree.read(at(tree, "processes/100/regions"))
    assert regions == f"sma addr npages merged mapped\n{sma} 0x10000 10 8 10\n".encode()
    assert tree.read(at(tree, "pages_sharing")) == b"15\n"
    assert tree.path("processes/999") is None and tree.path("nothing") is None
    # REMOVE: the directory goes with the process's last region.
    e.remove_regions(e.slots[0].sma)
    assert [name for name, _ in tree.entries(PROCESSES_INODE)] == ["100"]
    assert tree.node(ControlTree.process_inode(300)) is None


def test_profit_files_follow_the_kernels_formulas() -> None:
    """Two processes of 8 equal and 2 unique pages: 16 sharers of one shared page, 20 rmap items."""
    e = engine_with_duplicates(8, (100, 200))
    tree = ControlTree(e)
    # (pages_sharing + ksm_zero_pages) * 4096 - rmap_items * 64
    assert tree.read(at(tree, "general_profit")) == b"%d\n" % (15 * 4096 - 20 * 64)
    # Today's /proc/PID/ksm_stat, line for line: (ksm_merging_pages + zero) * 4096 - ksm_rmap_items * 64.
    assert tree.read(at(tree, "processes/100/ksm_stat")) == (
        b"ksm_rmap_items 10\n"
        b"ksm_zero_pages 0\n"
        b"ksm_merging_pages 8\n"
        b"ksm_process_profit %d\n"
        b"ksm_merge_any: no\n"
        b"ksm_mergeable: yes\n" % (8 * 4096 - 10 * 64)
    )
    assert tree.path("processes/999/ksm_stat") is None


def test_all_unique_pages_make_a_loss_of_64_bytes_a_page() -> None:
    e = Engine()
    space = FakeSpace(100)
    space.map(0x10000, [unique_page(i) for i in range(300)])
    e.register(e.new_sma(), space, 0x10000, 300)
    full_scans(e, 3)
    tree = ControlTree(e)
    assert tree.read(at(tree, "general_profit")) == b"-19200\n"
    stat = controltree.parse_stat(tree.read(at(tree, "processes/100/ksm_stat")).decode())
    assert stat == {
        "ksm_rmap_items": "300",
        "ksm_zero_pages": "0",
        "ksm_merging_pages": "0",
        "ksm_process_profit": "-19200",
        "ksm_merge_any": "no",
        "ksm_mergeable": "yes",
    }


def test_emulator_memory_is_the_engines_count() -> None:
    e = engine_with_duplicates(8, (100,))
    tree = ControlTree(e)
    m = e.memory()
    got = controltree.parse_stat(tree.read(at(tree, "emulator_memory")).decode())
    assert list(got) == [
        "rmap_chunks",
        "unstable_table",
        "stable_pages",
        "slots",
        "read_buffer",
        "metadata",
        "shared_copies",
        "registered_pages",
        "rmap_items",
        "metadata_per_page",
        "metadata_per_rmap_item",
        "emulator_profit",
    ]
    parts = [int(got[k]) for k in ("rmap_chunks", "unstable_table", "stable_pages", "slots", "read_buffer")]
    assert sum(parts) == int(got["metadata"]) == m.metadata
    assert (got["registered_pages"], got["rmap_items"]) == ("10", "10")
    assert int(got["emulator_profit"]) == 7 * 4096 - m.metadata
    assert float(got["metadata_per_page"]) == round((m.metadata - m.buffer) / 10, 1)
    with pytest.raises(OSError) as exc:
        tree.write(at(tree, "emulator_memory"), b"1\n")
    assert exc.value.errno == errno.EACCES


def test_tree_writes_only_the_knobs() -> None:
    e = Engine()
    tree = ControlTree(e)
    tree.write(at(tree, "pages_to_scan"), b"5\n")
    assert e.kthread.pages_to_scan == 5
    with pytest.raises(OSError) as exc:
        tree.write(at(tree, "pages_shared"), b"5\n")
    assert exc.value.errno == errno.EACCES


def test_regions_show_how_many_of_their_pages_are_mapped() -> None:
    e = Engine()
    space = FakeSpace(600)
    space.add_mapping(0x7F00_0000_0000, 3)
    space.add_mapping(0x7F00_0000_8000, 1)
    sma = e.new_sma()
    e.register(sma, space, 0x1000_0000_0000, 2**32 - 1)  # issue 14: nothing there
    e.register(sma, space, 0x7F00_0000_0000, 16)  # 3 + 1 of its pages
    tree = ControlTree(e)
    assert tree.read(at(tree, "processes/600/regions")).decode().splitlines()[1:] == [
        f"{sma.id} 0x100000000000 4294967295 0 0",
        f"{sma.id} 0x7f0000000000 16 0 4",
    ]
    space.gone = True  # its process exited; another still holds the SMA fd
    assert tree.read(at(tree, "processes/600/regions")).decode().splitlines()[2].endswith(" 0 -")


def test_a_process_with_several_regions() -> None:
    """Its directory lists every region in registration order; ksm_merging_pages is the engine's per-process figure."""
    e = Engine()
    space = FakeSpace(500)
    space.map(0x10000, [page(7)] * 4)
    space.map(0x40000, [page(7)] * 3 + [unique_page(9)])
    first, second = e.new_sma(), e.new_sma()
    e.register(first, space, 0x40000, 4)
    e.register(second, space, 0x10000, 4)
    full_scans(e, 3)
    tree = ControlTree(e)
    assert [name for name, _ in tree.entries(PROCESSES_INODE)] == ["500"]
    assert tree.read(at(tree, "processes/500/ksm_merging_pages")) == b"7\n"
    assert e.merged_pages_by_tgid() == {500: 7}
    assert tree.read(at(tree, "processes/500/regions")) == (
        f"sma addr npages merged mapped\n{first.id} 0x40000 4 3 4\n{second.id} 0x10000 4 4 4\n".encode()
    )
    # A process file is no directory, and a directory has no contents.
    with pytest.raises(OSError) as exc:
        tree.entries(at(tree, "processes/500/regions"))
    assert exc.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as exc:
        tree.read(at(tree, "processes/500"))
    assert exc.value.errno == errno.EISDIR


def test_the_tree_and_status_import_neither_pyfuse3_nor_trio() -> None:
    """``cuse-ksm status`` reads these files where pyfuse3 may not be installed."""
    code = "import sys, cuse_ksm.controltree, cuse_ksm.status; print(sorted({'pyfuse3', 'trio'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr


# -- processes/<pid>/pages and page_runs ---------------------------------------------


def test_pages_counts_every_state_and_names_the_shared_pages() -> None:
    e, _, _ = mixed(tgid=77)
    tree = ControlTree(e)
    assert tree.read(at(tree, "processes/77/pages")).decode().splitlines() == [
        f"region 1 {MIXED_ADDR:#x} {MIXED_PAGES}",
        "state merged 11",
        "state unstable 10",
        "state volatile 5",
        "state seen_once 1",
        "state written 1",
        "state at_limit 1",
        f"state not_present {MIXED_PAGES - 33}",
        "state zero_page 3",
        "state unreadable 1",
        "state not_scanned 0",
        "shared_pages 2",
        "shared 1 10 10",  # page(1): merged first, 10 sharers, all of them here
        "shared 2 1 1",
    ]


def test_page_runs_give_each_run_its_address_and_merged_runs_their_shared_page() -> None:
    e, space, _ = mixed(tgid=77)
    # A second region of the process: zeros written in two pages merge, into a page of zeros.
    space.map(0x10000, [bytes(abi.PAGE_SIZE)] * 2)
    e.register(e.new_sma(), space, 0x10000, 3)
    e.max_kernel_pages = 0
    full_scans(e, 2)
    zeros = next(k for k, kpage in e.stable.by_id.items() if kpage.data == bytes(abi.PAGE_SIZE))
    tree = ControlTree(e)
    a = MIXED_ADDR
    runs = tree.read(at(tree, "processes/77/page_runs")).decode().splitlines()
    assert runs[:2] == [f"region 1 {a:#x} {MIXED_PAGES}", f"run {a:#x} 10 merged 1 10"]
    assert sum(int(line.split()[2]) for line in runs if line.startswith("run ")) == MIXED_PAGES + 3
    assert runs[-3:] == ["region 2 0x10000 3", f"run 0x10000 2 merged {zeros} 2 zeros", "run 0x12000 1 not_present"]
    pages = tree.read(at(tree, "processes/77/pages")).decode()
    assert pages.endswith(f"shared_pages 1\nshared {zeros} 2 2 zeros\n")


def test_a_large_region_is_read_in_pieces_one_per_chunk_or_gap() -> None:
    """Between two pieces the daemon's loop may run the scanner (controlfs): no piece covers two chunks."""
    e = Engine()
    space = FakeSpace(5)
    base = 0x7F00_0000_0000
    for i in range(0, 1 << 16, 1 << 12):  # a page every 16 MiB of a 256 MiB region: 16 chunks, 16 gaps
        space.map(base + i * abi.PAGE_SIZE, [unique_page(i)])
    e.register(e.new_sma(), space, base, 1 << 16)
    full_scans(e, 1)
    tree = ControlTree(e)
    parts = list(tree.read_parts(at(tree, "processes/5/pages")))
    assert len(parts) == 16 + 15 + 1  # 16 chunks, the 15 gaps between them, then the text
    assert b"".join(parts) == tree.read(at(tree, "processes/5/pages"))
    assert b"state seen_once 16\n" in parts[-1]
    runs = list(tree.read_parts(at(tree, "processes/5/page_runs")))
    assert len(runs) == 16 + 15 + 1 + 1  # the steps, the region line, one piece of 31 runs
    text = b"".join(runs).decode()
    assert text.count("\nrun ") == 16 + 16  # each page, and the not-present pages after it
