"""The nodes' host names: submitit's job environment (the submission engine's) expands Slurm's
hostlist as Slurm itself does (`scontrol show hostnames`, the test bed's Slurm, with a minimal
configuration: no controller is asked). Fails if submitit's reading changes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from submitit.slurm.slurm import SlurmJobEnvironment

pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("expr", ["node1", "node[1-3]", "gpu[01-02,07],login", "r[1-2]n[1-2]",
                                  "gpu[0998-1001]", "a1,b[2-3],c[10-11,15]"])
def test_submitits_hostnames_are_slurms(expr: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\n")
    slurm = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True,
                           check=True, env={**os.environ, "SLURM_CONF": str(conf)})
    monkeypatch.setenv("SLURM_JOB_NODELIST", expr)
    assert SlurmJobEnvironment().hostnames == slurm.stdout.split()
