"""The service files in contrib/: the unit starts the daemon as the CLI understands it, the rule is the old one."""

import re
import shlex
from pathlib import Path

from cuse_ksm.cli import build_parser

CONTRIB = Path(__file__).resolve().parents[1] / "contrib"


def unit_lines(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (CONTRIB / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_loads_cuse_then_runs_the_daemon():
    unit = unit_lines("cuse-ksm.service")
    assert unit["ExecStartPre"] == ["/sbin/modprobe cuse"]
    (start,) = unit["ExecStart"]
    argv = shlex.split(start)
    assert argv[0].endswith("/cuse-ksm")
    args = build_parser().parse_args(argv[1:])
    assert args.command is None  # the daemon, not a subcommand
    assert unit["WantedBy"] == ["multi-user.target"]


def test_udev_rule_gives_group_kvm_mode_0660():
    rules = [line for line in (CONTRIB / "99-cuse-ksm.rules").read_text().splitlines() if line and line[0] != "#"]
    assert len(rules) == 1
    keys = dict(re.findall(r'(\w+)=?="([^"]*)"', rules[0]))
    assert keys == {"KERNEL": "ksm", "SUBSYSTEM": "cuse", "GROUP": "kvm", "MODE": "0660"}
