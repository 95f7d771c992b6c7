"""The code is ruff- and mypy-clean (the style the project keeps, checked with every test run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def test_ruff_clean() -> None:
    paths = ["slurm_vllm", "tests", "benchmarks", "scripts/_testbed", "scripts/testbed"]
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", *paths], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "slurm_vllm"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
