"""Shared fixtures: the test bed's environment (`scripts/testbed env`) and fresh job folders."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from .support.testbed import TESTBED, testbed_env


@pytest.fixture(scope="session")
def testbed() -> dict[str, str]:
    """The running test bed; a test that needs it fails (never skips) when it is not healthy."""
    status = subprocess.run([str(TESTBED), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        pytest.fail(f"the test bed is not healthy (run: scripts/testbed up)\n{status.stdout}", pytrace=False)
    values = testbed_env()
    os.environ.update(values)
    # Jobs inherit the submitter's PATH; the nodes' Apptainer sits in /usr/local/sbin (root's PATH).
    if "/usr/local/sbin" not in os.environ["PATH"].split(":"):
        os.environ["PATH"] = "/usr/local/sbin:" + os.environ["PATH"]
    return values


@pytest.fixture
def job_dir(testbed: dict[str, str], request: pytest.FixtureRequest) -> Path:
    """A fresh folder on the file system every test-bed node shares."""
    path = Path(testbed["SLURM_VLLM_TEST_JOBS_ROOT"]) / f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path
