"""The command line, where no CUSE is needed."""

import subprocess
import sys

import pytest

from cuse_ksm.cli import build_parser
from tests.conftest import ROOT, needs_root, python


def test_no_cuse_is_one_clear_error(tmp_path):
    missing = tmp_path / "cuse"
    result = python("-m", "cuse_ksm", "--cuse", str(missing))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no CUSE" in lines[0] and "make demo" in lines[0]


def test_bad_options_are_refused():
    for argv, message in [(["--mode", "999"], "octal"), (["--group", "no-such-group-here"], "no group")]:
        result = python("-m", "cuse_ksm", *argv)
        assert result.returncode == 2 and message in result.stderr


def test_cross_check_goes_with_kernel_mode():
    assert build_parser().parse_args(["--merge", "kernel", "--cross-check"]).cross_check is True
    result = python("-m", "cuse_ksm", "--cross-check")
    assert result.returncode == 2 and "--cross-check goes with --merge kernel" in result.stderr


def test_group_and_mode_parse():
    args = build_parser().parse_args(["--mode", "0660", "--group", "0", "--name", "ksm2"])
    assert (args.mode, args.group, args.name) == (0o660, 0, "ksm2")


def test_control_files_and_trace_options():
    p = build_parser()
    args = p.parse_args([])
    assert (args.command, args.stats_dir, args.trace, args.stats_interval) == (None, None, False, 0)
    assert p.parse_args(["--stats-dir", "/tmp/x"]).stats_dir == "/tmp/x"
    assert p.parse_args(["--no-stats-dir"]).stats_dir == ""
    assert p.parse_args(["--trace", "--log-level", "warning"]).trace is True
    result = python("-m", "cuse_ksm", "--stats-dir", "/a", "--no-stats-dir")
    assert result.returncode == 2 and "not allowed with" in result.stderr


def test_status_subcommand_parses():
    p = build_parser()
    args = p.parse_args(["status", "--dir", "/d", "--watch"])
    assert (args.command, args.dir, args.watch, args.count) == ("status", "/d", 2.0, 0)
    assert p.parse_args(["status", "--watch", "0.5"]).watch == 0.5
    assert p.parse_args(["status"]).watch is None


def run_without_host_ksm(*argv: str) -> subprocess.CompletedProcess[str]:
    """The daemon where the kernel has no KSM: an empty tmpfs on /sys/kernel/mm hides ksm/, in a mount namespace."""
    script = 'mount -t tmpfs none /sys/kernel/mm && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", sys.executable, "-m", "cuse_ksm", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_root
@pytest.mark.parametrize("ksm", ["missing", "present"])
def test_kernel_mode_refuses_a_host_without_ksm_in_one_line(tmp_path, ksm):
    """Checked before anything else (the CUSE channel here is missing too); emulation does not care."""
    missing = str(tmp_path / "cuse")
    if ksm == "missing":
        result = run_without_host_ksm("--merge", "kernel", "--cuse", missing)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0] == (
            "cuse-ksm: ERROR: /sys/kernel/mm/ksm does not exist: this kernel has no KSM (CONFIG_KSM); "
            "--merge kernel needs it (the default, --merge emulate, does not)"
        )
        result = run_without_host_ksm("--merge", "emulate", "--cuse", missing)
    else:
        result = python("-m", "cuse_ksm", "--merge", "kernel", "--cuse", missing)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "no CUSE" in lines[0]  # past the KSM check: on to the channel


def test_the_daemon_lifts_its_open_files_limit_for_the_fds_each_region_pins():
    script = (
        "import resource; from cuse_ksm.cli import raise_fd_limit; "
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
        "assert raise_fd_limit() == hard; print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))"
    )
    result = python("-c", script)
    assert result.stdout.strip() == "True", result.stderr
