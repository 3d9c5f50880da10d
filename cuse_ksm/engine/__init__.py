"""The KSM engine: registered memory, kthread parameters and the scanner.

Pure logic over an :class:`AddressSpace` interface: it never imports the
transport (``protocol``, ``daemon``), the device semantics, nor trio - it
never waits.  The trio task that runs the scanner is cuse_ksm/kksmd.py.

- ``trees``: the stable and unstable trees and the reverse-map items;
- ``registry``: SMAs, slots and the address spaces they pin;
- ``scanner``: the scan cursor and the per-page algorithm;
- ``counters``: the scanner's running counts, the counters they mean and
  today's kernel's profit formulas;
- ``memory``: what the engine itself spends on memory;
- ``pages``: each page's state as the scanner last saw it (``cuse-ksm pages``);
- ``core``: :class:`Engine`, the face the device and control files use;
- ``check``: a full consistency walk, for tests.
"""

from cuse_ksm.engine.core import Engine
from cuse_ksm.engine.counters import Counters, ProcessStat
from cuse_ksm.engine.memory import EngineMemory
from cuse_ksm.engine.pages import STATE_NAMES, PageSurvey, Run
from cuse_ksm.engine.registry import AddressSpace, PendingRead, ReadDone, Slot, Sma
from cuse_ksm.engine.trees import KsmPage, RmapChunk, RmapItem, StableTree, UnstableTree

__all__ = [
    "STATE_NAMES",
    "AddressSpace",
    "Counters",
    "Engine",
    "EngineMemory",
    "KsmPage",
    "PageSurvey",
    "PendingRead",
    "ProcessStat",
    "ReadDone",
    "RmapChunk",
    "RmapItem",
    "Run",
    "Slot",
    "Sma",
    "StableTree",
    "UnstableTree",
]
