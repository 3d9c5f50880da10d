"""Under CI=true a skipped test fails the run (tests/conftest.py), so a lost privilege cannot hide tests.

Checked in a pytest subprocess on a machine made to look unprivileged: a
plugin, loaded before any test module is imported, makes ``os.geteuid()``
return nobody's uid and ``/dev/fuse`` absent.  The real host test modules
then skip their root and FUSE tests; with CI=true each of those must fail
instead, and nothing may be skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

AS_NOBODY = """
import os

os.geteuid = lambda: 65534
_exists = os.path.exists
os.path.exists = lambda p: False if os.fspath(p) == "/dev/fuse" else _exists(p)


def pytest_collection_modifyitems(config, items):
    # Only the tests that skip for want of root or FUSE: the others would just take time.
    items[:] = [i for i in items if any(m.args and m.args[0] for m in i.iter_markers("skipif"))]
"""

# Every host module that has tests needing root or /dev/fuse.
PRIVILEGED = [
    "tests/host",
    "tests/test_robust_engine.py",
    "tests/test_ptrace_handout.py",
    "tests/test_controlfs.py",
    "tests/test_status.py",
]


def pytest_run(args: list[str], plugin_dir: Path, ci: str | None, cwd: Path = ROOT) -> tuple[int, dict[str, int], str]:
    """Exit status, {outcome: count} and the output of a pytest run in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = proc.stdout.strip().splitlines()[-1]
    counts = {kind.rstrip("s"): int(n) for n, kind in re.findall(r"(\d+) (\w+)", summary)}
    return proc.returncode, counts, proc.stdout


def test_a_lost_privilege_fails_the_ci_run(tmp_path: Path) -> None:
    (tmp_path / "as_nobody.py").write_text(AS_NOBODY)
    args = ["-p", "as_nobody", *PRIVILEGED]

    rc, counts, out = pytest_run(args, tmp_path, ci=None)
    assert rc == 0, out
    skipped = counts.get("skipped", 0)
    assert skipped >= 39, out  # 31 tests need root, 8 more /dev/fuse
    assert set(counts) == {"skipped"}, (counts, out)

    rc, counts, out = pytest_run(args, tmp_path, ci="true")
    assert rc == 1, out
    assert "skipped" not in counts, out
    # A module-level skipif fires in setup: pytest calls a failed setup an error.
    assert counts.get("failed", 0) + counts.get("error", 0) == skipped, out
    summary = [line for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    assert len(summary) == skipped, out
    assert all(" - skipped under CI=true (" in line for line in summary), out
    # Both kinds of lost privilege are among them: root alone, and /dev/fuse.
    fuse = sum("needs /dev/fuse and root" in line for line in summary)
    assert 8 <= fuse < skipped, out


def test_tests_run_on_request_and_xfails_keep_their_outcome_under_ci(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "\n"
        "@pytest.mark.on_request\n"
        '@pytest.mark.skipif(True, reason="only with SOAK=1")\n'
        "def test_soak(): pass\n"
        "\n"
        '@pytest.mark.xfail(reason="known")\n'
        "def test_known(): assert False\n"
        "\n"
        "def test_plain(): pass\n"
        "\n"
        "def test_skips_itself():\n"
        '    pytest.skip("no such device")\n'
    )
    args = ["-p", "tests.conftest", "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")]
    for not_ci in (None, "false"):
        assert pytest_run(args, tmp_path, ci=not_ci)[:2] == (0, {"passed": 1, "skipped": 2, "xfailed": 1}), not_ci
    rc, counts, out = pytest_run(args, tmp_path, ci="true")
    assert (rc, counts) == (1, {"failed": 1, "passed": 1, "skipped": 1, "xfailed": 1}), out
    assert "test_sample.py::test_skips_itself - skipped under CI=true (Skipped: no such device)" in out, out
