"""The ABI must match what programs compiled against the 2009 header see."""

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from cuse_ksm import abi

HEADER = Path(__file__).resolve().parent.parent / "include"

CONSTANTS = ["KSMIO", "KSM_API_VERSION", "ksm_control_flags_run"]


@dataclasses.dataclass(frozen=True)
class Header:
    """One ABI's header, and the Python class of each of its structs."""

    path: str
    structs: dict[str, type[abi.CStruct]]


HEADERS = {
    abi.MARCH: Header("linux/ksm.h", {"ksm_memory_region": abi.MemoryRegion, "ksm_kthread_info": abi.KthreadInfo}),
    abi.JANUARY: Header(
        "linux/ksm-2009-01.h",
        {
            "ksm_memory_region": abi.MemoryRegion2009Jan,
            "ksm_kthread_info": abi.KthreadInfo2009Jan,
            "ksm_user_scan": abi.UserScan,
        },
    ),
}
# Every field of every struct, in the header's order (which the C compiler
# checks below, not taken from the Python classes).
FIELDS = {
    (abi.MARCH, "ksm_memory_region"): ["npages", "pad", "addr", "reserved_bits"],
    (abi.MARCH, "ksm_kthread_info"): ["sleep", "pages_to_scan", "flags", "pad", "reserved_bits"],
    (abi.JANUARY, "ksm_memory_region"): ["npages", "pad", "addr"],
    (abi.JANUARY, "ksm_kthread_info"): ["sleep", "pages_to_scan", "flags"],
    (abi.JANUARY, "ksm_user_scan"): ["pages_to_scan", "flags"],
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


def probe_source(which: str) -> str:
    """A C program that prints, one "name value" per line, every number and layout fact of one ABI's header."""
    header = HEADERS[which]
    lines = [f'    printf("{n} %lu\\n", (unsigned long){n});' for n in [*abi.header_names(which).values(), *CONSTANTS]]
    for struct in header.structs:
        fields = FIELDS[which, struct]
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
#include <{header.path}>
static void dump(const void *p, size_t n) {{
    for (size_t i = 0; i < n; i++) printf("%02x", ((const unsigned char *)p)[i]);
    printf("\\n");
}}
int main(void) {{
{body}
    return 0;
}}
"""


@pytest.fixture(scope="module", params=list(HEADERS))
def header_facts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, str]]:
    """The ABI, and what the C compiler makes of its header: {"name": "value"}."""
    which: str = request.param
    tmp = tmp_path_factory.mktemp("abi")
    src, exe = tmp / "probe.c", tmp / "probe"
    src.write_text(probe_source(which))
    subprocess.run(
        ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(HEADER), "-o", str(exe), str(src)], check=True
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return which, dict(line.rsplit(" ", 1) for line in out.splitlines())


def test_every_ioctl_number_is_the_headers(header_facts: tuple[str, dict[str, str]]) -> None:
    which, facts = header_facts
    names = abi.header_names(which)
    assert {int(facts[name]): name for name in names.values()} == names
    # ... and the header has no number the table lacks: every _IO*(KSMIO, ...) it defines is there.
    defined = re.findall(r"#define\s+(KSM_\w+)\s+_IO", (HEADER / HEADERS[which].path).read_text())
    assert sorted(defined) == sorted(names.values())


def test_every_constant_is_the_headers(header_facts: tuple[str, dict[str, str]]) -> None:
    _, facts = header_facts
    assert int(facts["KSMIO"]) == abi.KSMIO
    assert int(facts["KSM_API_VERSION"]) == abi.KSM_API_VERSION
    assert int(facts["ksm_control_flags_run"]) == abi.KSM_CONTROL_FLAGS_RUN


def test_every_struct_has_the_headers_layout(header_facts: tuple[str, dict[str, str]]) -> None:
    """sizeof, each field's offset and size, and the very bytes of a struct with every field set."""
    which, facts = header_facts
    for struct, cls in HEADERS[which].structs.items():
        fields = FIELDS[which, struct]
        assert int(facts[f"sizeof {struct}"]) == cls.FORMAT.size
        assert sorted(fields) == sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        marked = cls(**{f: MARKS[f] for f in fields})
        packed = marked.pack()
        assert packed.hex() == facts[f"bytes {struct}"]
        for f in fields:
            size = int(facts[f"sizeof {struct}.{f}"])
            offset = int(facts[f"offsetof {struct}.{f}"])
            # Where Python's pack() puts the field: its marker, little-endian, at the C offset.
            assert packed[offset : offset + size] == MARKS[f].to_bytes(size, "little"), f
        assert cls.unpack(packed) == marked


def test_no_number_means_two_things() -> None:
    """One device answers both ABIs: a number the two headers share must name the same call in both."""
    march, january = abi.header_names(abi.MARCH), abi.header_names(abi.JANUARY)
    for number in march.keys() & january.keys():
        assert march[number] == january[number]
    assert sorted(march.keys() & january.keys()) == [0xAB00, 0xAB01, 0xAB21]


def test_january_numbers_are_the_x86_64_values() -> None:
    """The table in ../shared/reference/kvm-2009-01/README.md."""
    assert abi.KSM_CREATE_SCAN == 0xAB02
    assert abi.KSM_START_STOP_KTHREAD_2009_01 == 0x400CAB03
    assert abi.KSM_GET_INFO_KTHREAD_2009_01 == 0x400CAB04
    assert abi.KSM_REGISTER_MEMORY_REGION_2009_01 == 0x4010AB20
    assert abi.KSM_SCAN == 0x4008AB40


def test_trace_names_carry_their_abi() -> None:
    assert abi.ioctl_name(abi.KSM_START_STOP_KTHREAD) == "KSM_START_STOP_KTHREAD[2009-03]"
    assert abi.ioctl_name(abi.KSM_START_STOP_KTHREAD_2009_01) == "KSM_START_STOP_KTHREAD[2009-01]"
    assert abi.ioctl_name(abi.KSM_GET_API_VERSION) == "KSM_GET_API_VERSION"
    assert abi.ioctl_name(0xAB05) == "0xab05"


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


@pytest.mark.parametrize("header", [h.path for h in HEADERS.values()])
def test_header_is_our_own_text(header: str) -> None:
    """Provenance, not layout (the tests above check that): the header says it was written for cuse-ksm."""
    text = (HEADER / header).read_text()
    assert re.search(r"cuse-ksm", text)
