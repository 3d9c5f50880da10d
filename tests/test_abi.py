"""The ABI must match what programs compiled against the 2009 header see."""

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from cuse_ksm import abi

HEADER = Path(__file__).resolve().parent.parent / "include"

IOCTLS = [
    "KSM_GET_API_VERSION",
    "KSM_CREATE_SHARED_MEMORY_AREA",
    "KSM_START_STOP_KTHREAD",
    "KSM_GET_INFO_KTHREAD",
    "KSM_REGISTER_MEMORY_REGION",
    "KSM_REMOVE_MEMORY_REGION",
]
CONSTANTS = ["KSMIO", "KSM_API_VERSION", "ksm_control_flags_run"]
# Every field of both structs, in the header's order.
FIELDS = {
    "ksm_memory_region": ["npages", "pad", "addr", "reserved_bits"],
    "ksm_kthread_info": ["sleep", "pages_to_scan", "flags", "pad", "reserved_bits"],
}
# A distinct value per field (each byte of each value distinct too), so that
# the bytes C and Python lay out can be compared one for one.
MARKS = {
    "npages": 0x0403_0201,
    "pad": 0x1413_1211,
    "addr": 0x2827_2625_2423_2221,
    "reserved_bits": 0x3837_3635_3433_3231,
    "sleep": 0x4443_4241,
    "pages_to_scan": 0x5453_5251,
    "flags": 0x6463_6261,
}


def probe_source() -> str:
    """A C program that prints, one "name value" per line, every number and layout fact of the header."""
    lines = [f'    printf("{n} %lu\\n", (unsigned long){n});' for n in IOCTLS + CONSTANTS]
    for struct, fields in FIELDS.items():
        lines.append(f'    printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
        lines.append(f"    {{ struct {struct} s; memset(&s, 0, sizeof s);")
        for f in fields:
            lines.append(f'      printf("offsetof {struct}.{f} %zu\\n", offsetof(struct {struct}, {f}));')
            lines.append(f'      printf("sizeof {struct}.{f} %zu\\n", sizeof(s.{f}));')
            lines.append(f"      s.{f} = {MARKS[f]:#x}ULL;")
        lines.append(f'      printf("bytes {struct} "); dump(&s, sizeof s); }}')
    body = "\n".join(lines)
    return f"""
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <linux/ksm.h>
static void dump(const void *p, size_t n) {{
    for (size_t i = 0; i < n; i++) printf("%02x", ((const unsigned char *)p)[i]);
    printf("\\n");
}}
int main(void) {{
{body}
    return 0;
}}
"""


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the C compiler makes of include/linux/ksm.h: {"name": "value"}."""
    tmp = tmp_path_factory.mktemp("abi")
    src, exe = tmp / "probe.c", tmp / "probe"
    src.write_text(probe_source())
    subprocess.run(
        ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(HEADER), "-o", str(exe), str(src)], check=True
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def test_every_ioctl_number_is_the_headers(header_facts: dict[str, str]) -> None:
    from_c = {int(header_facts[name]): name for name in IOCTLS}
    assert from_c == abi.IOCTL_NAMES
    for name in IOCTLS:
        assert int(header_facts[name]) == getattr(abi, name), name


def test_every_constant_is_the_headers(header_facts: dict[str, str]) -> None:
    assert int(header_facts["KSMIO"]) == abi.KSMIO
    assert int(header_facts["KSM_API_VERSION"]) == abi.KSM_API_VERSION
    assert int(header_facts["ksm_control_flags_run"]) == abi.KSM_CONTROL_FLAGS_RUN


@pytest.mark.parametrize(
    ("struct", "cls"), [("ksm_memory_region", abi.MemoryRegion), ("ksm_kthread_info", abi.KthreadInfo)]
)
def test_every_struct_has_the_headers_layout(
    header_facts: dict[str, str], struct: str, cls: type[abi.MemoryRegion] | type[abi.KthreadInfo]
) -> None:
    """sizeof, each field's offset and size, and the very bytes of a struct with every field set."""
    fields = FIELDS[struct]
    assert int(header_facts[f"sizeof {struct}"]) == abi.STRUCT_SIZE == cls.FORMAT.size
    assert sorted(fields) == sorted(f.name for f in dataclasses.fields(cls))
    packed = cls(**{f: MARKS[f] for f in fields}).pack()
    assert packed.hex() == header_facts[f"bytes {struct}"]
    for f in fields:
        size = int(header_facts[f"sizeof {struct}.{f}"])
        offset = int(header_facts[f"offsetof {struct}.{f}"])
        # Where Python's pack() puts the field: its marker, little-endian, at the C offset.
        assert packed[offset : offset + size] == MARKS[f].to_bytes(size, "little"), f
        assert cls.unpack(packed) == cls(**{f: MARKS[f] for f in fields})


def test_ioctl_numbers_are_the_x86_64_values() -> None:
    assert abi.KSM_GET_API_VERSION == 0xAB00
    assert abi.KSM_CREATE_SHARED_MEMORY_AREA == 0xAB01
    assert abi.KSM_START_STOP_KTHREAD == 0x4018AB02
    assert abi.KSM_GET_INFO_KTHREAD == 0x4018AB03
    assert abi.KSM_REGISTER_MEMORY_REGION == 0x4018AB20
    assert abi.KSM_REMOVE_MEMORY_REGION == 0xAB21


def test_structs_are_24_bytes_little_endian() -> None:
    region = abi.MemoryRegion(npages=3, addr=0x7F00_0000_1000, pad=0xDEADBEEF, reserved_bits=0x1122334455667788)
    raw = region.pack()
    assert len(raw) == 24
    assert raw[:4] == (3).to_bytes(4, "little")
    assert raw[8:16] == (0x7F00_0000_1000).to_bytes(8, "little")
    assert abi.MemoryRegion.unpack(raw) == region
    info = abi.KthreadInfo(sleep=10, pages_to_scan=100, flags=1)
    assert abi.KthreadInfo.unpack(info.pack()) == info
    assert info.pack()[8:12] == (1).to_bytes(4, "little")


def test_header_is_our_own_text() -> None:
    """Provenance, not layout (the tests above check that): the header says it was written for cuse-ksm."""
    text = (HEADER / "linux" / "ksm.h").read_text()
    assert re.search(r"cuse-ksm", text)
