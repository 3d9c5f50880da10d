"""The KSM engine: registered memory, kthread parameters and (issue 3) the scanner.

Pure logic over an :class:`AddressSpace` interface; it never imports the
transport (``protocol``, ``daemon``) nor the device semantics.
"""

from cuse_ksm.engine.core import AddressSpace, Engine, Slot, Sma

__all__ = ["AddressSpace", "Engine", "Slot", "Sma"]
