"""The KSM engine: registered memory, kthread parameters and the scanner.

Pure logic over an :class:`AddressSpace` interface; it never imports the
transport (``protocol``, ``daemon``) nor the device semantics.
"""

from cuse_ksm.engine.core import AddressSpace, Counters, Engine, Slot, Sma
from cuse_ksm.engine.trees import KsmPage, RmapChunk, RmapItem, StableTree, UnstableTree

__all__ = [
    "AddressSpace",
    "Counters",
    "Engine",
    "KsmPage",
    "RmapChunk",
    "RmapItem",
    "Slot",
    "Sma",
    "StableTree",
    "UnstableTree",
]
