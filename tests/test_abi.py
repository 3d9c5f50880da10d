"""The ABI must match what programs compiled against the 2009 header see."""

import re
import subprocess
from pathlib import Path

import pytest

from cuse_ksm import abi

HEADER = Path(__file__).resolve().parent.parent / "include"


def test_ioctl_numbers_are_the_x86_64_values():
    assert abi.KSM_GET_API_VERSION == 0xAB00
    assert abi.KSM_CREATE_SHARED_MEMORY_AREA == 0xAB01
    assert abi.KSM_START_STOP_KTHREAD == 0x4018AB02
    assert abi.KSM_GET_INFO_KTHREAD == 0x4018AB03
    assert abi.KSM_REGISTER_MEMORY_REGION == 0x4018AB20
    assert abi.KSM_REMOVE_MEMORY_REGION == 0xAB21


def test_structs_are_24_bytes_little_endian():
    region = abi.MemoryRegion(npages=3, addr=0x7F00_0000_1000, pad=0xDEADBEEF, reserved_bits=0x1122334455667788)
    raw = region.pack()
    assert len(raw) == 24
    assert raw[:4] == (3).to_bytes(4, "little")
    assert raw[8:16] == (0x7F00_0000_1000).to_bytes(8, "little")
    assert abi.MemoryRegion.unpack(raw) == region
    info = abi.KthreadInfo(sleep=10, pages_to_scan=100, flags=1)
    assert abi.KthreadInfo.unpack(info.pack()) == info
    assert info.pack()[8:12] == (1).to_bytes(4, "little")


def test_c_header_agrees_with_python(tmp_path):
    """Compile a program against include/linux/ksm.h and compare every number and offset."""
    src = tmp_path / "probe.c"
    src.write_text(
        """
#include <stdio.h>
#include <stddef.h>
#include <linux/ksm.h>
int main(void) {
    printf("%lx %lx %lx %lx %lx %lx\\n", (unsigned long)KSM_GET_API_VERSION,
           (unsigned long)KSM_CREATE_SHARED_MEMORY_AREA, (unsigned long)KSM_START_STOP_KTHREAD,
           (unsigned long)KSM_GET_INFO_KTHREAD, (unsigned long)KSM_REGISTER_MEMORY_REGION,
           (unsigned long)KSM_REMOVE_MEMORY_REGION);
    printf("%zu %zu %zu %zu\\n", sizeof(struct ksm_memory_region), sizeof(struct ksm_kthread_info),
           offsetof(struct ksm_memory_region, addr), offsetof(struct ksm_kthread_info, flags));
    printf("%d %d\\n", KSM_API_VERSION, ksm_control_flags_run);
    return 0;
}
"""
    )
    exe = tmp_path / "probe"
    try:
        subprocess.run(["cc", "-Wall", "-Werror", "-I", str(HEADER), "-o", str(exe), str(src)], check=True)
    except FileNotFoundError:
        pytest.skip("no C compiler")
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    numbers = [int(x, 16) for x in lines[0].split()]
    assert numbers == [
        abi.KSM_GET_API_VERSION,
        abi.KSM_CREATE_SHARED_MEMORY_AREA,
        abi.KSM_START_STOP_KTHREAD,
        abi.KSM_GET_INFO_KTHREAD,
        abi.KSM_REGISTER_MEMORY_REGION,
        abi.KSM_REMOVE_MEMORY_REGION,
    ]
    assert [int(x) for x in lines[1].split()] == [24, 24, 8, 8]
    assert [int(x) for x in lines[2].split()] == [abi.KSM_API_VERSION, abi.KSM_CONTROL_FLAGS_RUN]


def test_header_is_our_own_text():
    text = (HEADER / "linux" / "ksm.h").read_text()
    assert re.search(r"cuse-ksm", text)
