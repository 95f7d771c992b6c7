"""Where the test bed script is, and the environment it exports for tests."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "scripts" / "testbed"


def testbed_env() -> dict[str, str]:
    """The values `scripts/testbed env` exports, parsed (no shell involved)."""
    out = subprocess.run([str(TESTBED), "env"], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = shlex.split(value)[0] if value else ""
    return values
