"""The emulated ksm_stat against the host kernel's own, on one process the kernel has merged.

The host kernel merges a 64 MiB half-duplicate workload for real (as
``make bench`` has it do, under the benchmarks' lock), and its
/proc/PID/ksm_stat is the reference: the engine, scanning the same process,
must report the same items, merged pages and profit, field for field, for
every field the host kernel has.
"""

from __future__ import annotations

from pathlib import Path

from bench import kernel, workload
from cuse_ksm.controltree import ksm_stat_text, parse_stat
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory
from tests.conftest import needs_root

SIZE = 64 << 20  # 16384 pages; 8 copies of each of 1024 contents, below max_page_sharing


@needs_root
def test_ksm_stat_matches_the_host_kernels_for_the_same_process() -> None:
    w = workload.start("dup50", SIZE, mergeable=True)
    try:
        run = kernel.measure(w, pages_to_scan=100_000, timeout=120)
        assert run.merging_pages == w.npages // 2
        host = parse_stat(Path(f"/proc/{w.pid}/ksm_stat").read_text())
        e = Engine()
        e.register(e.new_sma(), ProcessMemory.open(w.pid), w.addr, w.npages)
        for _ in range(3):
            e.scan_now(1 << 40, stop_at_wrap=True)
        ours = parse_stat(ksm_stat_text(e, w.pid).decode())
    finally:
        w.stop()
    # The workload's own figures, worked out: every page seen, the even half merged.
    assert ours["ksm_rmap_items"] == str(w.npages)
    assert ours["ksm_process_profit"] == str(w.npages // 2 * 4096 - w.npages * 64)
    shared = [name for name in ours if name in host and not name.startswith("ksm_merge")]
    assert "ksm_rmap_items" in shared  # every kernel with ksm_stat (6.1+) has it
    assert {n: ours[n] for n in shared} == {n: host[n] for n in shared}
