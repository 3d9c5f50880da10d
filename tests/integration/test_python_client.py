"""The same sequence from Python, with ctypes (examples/pyksm.py)."""

import errno
import mmap
import os

import pytest
from pyksm import KSM_GET_API_VERSION, KSM_START_STOP_KTHREAD, Ksm, buffer_address, raw_ioctl

from tests.integration.conftest import DEVICE


def test_python_client_sequence():
    with Ksm(DEVICE) as ksm:
        assert ksm.api_version() == 1
        assert ksm.start(0, 100) == 1  # quirk: positive EPERM, nothing changed
        assert ksm.start(32, 700) == 0
        info = ksm.info()
        assert (info.flags, info.pages_to_scan, info.sleep) == (1, 32, 700)
        assert ksm.stop() == 0
        assert ksm.info().flags == 0
        buf = mmap.mmap(-1, 8 * mmap.PAGESIZE)
        with ksm.create_sma() as sma:
            assert sma.fd not in (ksm.fd, -1)
            assert os.fstat(sma.fd).st_rdev == os.fstat(ksm.fd).st_rdev  # an open file of the device
            assert os.readlink(f"/proc/self/fd/{sma.fd}") == DEVICE
            assert sma.register(buffer_address(buf), 8) == 0
            assert raw_ioctl(sma.fd, KSM_GET_API_VERSION) == 22
            assert sma.remove() == 0
        with pytest.raises(OSError) as e:
            raw_ioctl(ksm.fd, KSM_START_STOP_KTHREAD, 8)
        assert e.value.errno == errno.EFAULT
        buf.close()


def test_demo_runs(capsys):
    import pyksm

    pyksm.demo(DEVICE)
    out = capsys.readouterr().out
    assert "API version 1" in out and "returns SMA fd" in out
