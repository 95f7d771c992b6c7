"""The rendered sbatch script: golden file (with a readable diff), shell syntax, refused flags."""

from __future__ import annotations

import difflib
import os
import subprocess
from pathlib import Path

import pytest

from slurm_vllm import plan, render, spec
from slurm_vllm.errors import SpecError

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden" / "job.sbatch"
SPEC = {
    "name": "llama-70b", "model": {"path": "/models/Llama-3.1-70B-Instruct", "served_name": "llama"},
    "slurm": {"nodes": 2, "gpus_per_node": 8, "cpus_per_task": 32, "mem": "0", "partition": "gpu",
              "account": "proj42", "time": "04:00:00", "exclusive": True,
              "extra_directives": {"mail_type": "END", "requeue": False, "hint": "nomultithread"},
              "setup": ["module load apptainer", "export HF_HOME=/scratch/$USER/hf"],
              "python": "/opt/slurm_vllm/bin/python"},
    "container": {"runtime": "apptainer", "image": "/images/vllm.sif", "binds": ["/models:/models:ro"]},
    "vllm": {"args": {"max_model_len": 8192, "gpu_memory_utilization": 0.9}},
    "jobs_root": "/shared/$USER jobs",
}


def rendered() -> str:
    s = spec.parse(SPEC)
    return render.sbatch_script(s, plan.make(s, {}), spec.dump(s), "/opt/slurm_vllm/bin/python",
                                source="configs/llama.yaml")


def test_golden_sbatch_script() -> None:
    text = rendered()
    if os.environ.get("SLURM_VLLM_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    expected = GOLDEN.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                        "golden/job.sbatch", "rendered"))
    assert not diff, (f"the rendered script changed:\n{diff}\nIf this is intended, regenerate: "
                      f"SLURM_VLLM_UPDATE_GOLDEN=1 pytest tests/test_render.py")


def test_script_is_valid_shell_and_quotes_values() -> None:
    text = rendered()
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert "job_dir='/shared/$USER jobs'/llama-70b-\"$SLURM_JOB_ID\"" in text
    assert "#SBATCH --mail-type=END" in text and "#SBATCH --requeue" not in text
    assert "#SBATCH --exclusive\n" in text


def test_managed_extra_directive_is_refused() -> None:
    slurm = {**SPEC["slurm"], "extra_directives": {"ntasks_per_node": 4}}  # type: ignore[dict-item]
    data = {**SPEC, "slurm": slurm}
    with pytest.raises(SpecError, match=r"slurm\.extra_directives\.ntasks_per_node: managed by slurm_vllm"):
        render.directives(spec.parse(data))
