"""The real sbatch reads every #SBATCH value slurm_vllm renders as that one value: hostile values in
the spec (quotes, backslashes, '#', spaces) add no option. Slurm's own answer: `scontrol show job` of
the submitted (held) job. (The test bed keeps no account list: Slurm sets the user's default
account in place of an unknown one, so the account's own value is not read back; what it carries
must still add nothing.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .support.specs import derive

pytestmark = pytest.mark.slurm
# Each would add an option after slurm_vllm's own if quoted for a shell instead of for sbatch.
HOSTILE = {
    "account": "acct\\' --time=1 --output=/tmp/svt-pwned-%j",
    "comment": 'note\\" --export=ALL,LD_PRELOAD=/tmp/svt-pwned.so #',
    "mail_user": "u@x' --time=2 'x\\",
}


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         check=True).stdout
    fields: dict[str, str] = {}
    key = ""
    for word in out.split():        # values may hold spaces: a word without '=' continues the last
        name, eq, value = word.partition("=")
        if eq and name.isalnum():
            key = name
            fields[key] = value
        elif key:
            fields[key] += " " + word
    return fields


def test_hostile_values_reach_slurm_as_themselves(testbed: dict[str, str], job_dir: Path) -> None:
    spec = derive(job_dir, "test-none-tp2.yaml", "hostile", **{
        "slurm.account": HOSTILE["account"],
        "slurm.extra_directives": {"comment": HOSTILE["comment"], "mail_user": HOSTILE["mail_user"],
                                   "mail_type": "END"},
        "jobs_root": str(job_dir / "jobs 'x' \\"),
    })
    script = job_dir / "hostile.sbatch"
    out = subprocess.run([sys.executable, "-m", "slurm_vllm", "render", str(spec), "-o", str(script)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sub = subprocess.run(["sbatch", "--hold", "--parsable", str(script)], capture_output=True, text=True,
                         cwd=job_dir)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    try:
        fields = job_fields(job_id)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert fields["Comment"] == HOSTILE["comment"], fields
    assert fields["MailUser"] == HOSTILE["mail_user"], fields
    assert fields["StdOut"] == f"{job_dir}/jobs 'x' \\/hostile-{job_id}.out", fields
    assert fields["TimeLimit"] == "00:20:00", fields          # the spec's, not an injected --time
    assert "LD_PRELOAD" not in subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                                              text=True).stdout.replace(HOSTILE["comment"], "")
