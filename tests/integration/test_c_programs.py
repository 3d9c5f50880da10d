"""Unmodified C programs compiled against include/linux/ksm.h, on the real device."""

import pytest

from tests.integration.conftest import run_c


@pytest.mark.parametrize("program", ["ksm_abi_sequence", "ksm_threads", "ksm_fork", "ksm_traced"])
def test_c_program_passes(program):
    result = run_c(program)
    print(result.stdout)
    assert "not ok" not in result.stdout, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("PASS"), result.stdout + result.stderr
    assert result.returncode == 0
