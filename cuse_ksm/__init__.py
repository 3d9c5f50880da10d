"""cuse-ksm: the 2009 /dev/ksm driver (Kernel Samepage Merging), emulated from user space through CUSE."""

__version__ = "0.1.0"
