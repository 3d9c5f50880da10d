"""The engine is pure logic: importing it pulls in neither trio nor the layers above it."""

from __future__ import annotations

import json
import subprocess
import sys

# Modules the engine must not need: it never waits (the trio task that runs
# the scanner is cuse_ksm.kksmd) and never sees the transport or the device.
FORBIDDEN = ["trio", "cuse_ksm.kksmd", "cuse_ksm.protocol", "cuse_ksm.daemon", "cuse_ksm.device"]

PROBE = """
import json, sys
import cuse_ksm.engine, cuse_ksm.engine.check
print(json.dumps(sorted(name for name in sys.modules if name in FORBIDDEN)))
"""


def test_importing_the_engine_imports_no_trio_and_no_upper_layer() -> None:
    # A fresh interpreter: this one has long imported trio for other tests.
    out = subprocess.run(
        [sys.executable, "-c", f"FORBIDDEN = {FORBIDDEN!r}\n{PROBE}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == []
