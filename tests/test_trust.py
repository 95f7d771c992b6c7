"""A shared jobs_root is not trusted: folders are 0700, and every verb refuses what another user made
or can write (planted folders, by-id links, a by-id that is a link, a foreign api_key_file).

Real files, real ownership (the tests run as root and hand files to `nobody`), the real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_vllm import node
from slurm_vllm.jobdir import JobDir
from slurm_vllm.plan import Plan
from slurm_vllm.records import Endpoint, Stage
from slurm_vllm.render import PLAN_SEPARATOR

pytestmark = pytest.mark.unit
NOBODY = 65534
PLAN = Plan(name="j", nodes=2, gpus_per_node=4, tp=4, pp=2, served_name="m", model_path="/m", vllm_args=(),
            gcs_port=None, api_port=None, ready_timeout=60, api_key=True)


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SLURM_VLLM_INDEX": str(home / "index")}
    argv = [sys.executable, "-m", "slurm_vllm", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env)


def ready_job(folder: Path, key_file: str | None = None) -> JobDir:
    """A job folder as a READY job leaves it (endpoint.json naming KEY_FILE, by default its own)."""
    jd = JobDir(folder)
    jd.create("name: j\n", PLAN.to_json(), api_key=True)
    jd.write_job_id("424242")
    jd.write(jd.endpoint, Endpoint(url="http://10.0.0.1:20008/v1", model="m", host="10.0.0.1", port=20008,
                                   api_key_file=key_file or str(jd.api_key), job_id="424242"))
    jd.write_stage(Stage.READY, "http://10.0.0.1:20008/v1")
    return jd


def one_line_refusal(out: subprocess.CompletedProcess[str], words: str) -> None:
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert words in out.stderr, out.stderr


def chown_tree(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.lchown(p, uid, uid)


def test_job_folders_are_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        jd = ready_job(tmp_path / "jobs" / "j-1")
    finally:
        os.umask(old)
    for folder in (jd.path, jd.env_dir, jd.logs):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert jd.api_key.stat().st_mode & 0o777 == 0o600


def test_a_planted_by_id_link_to_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    """The issue's reproduction: by-id/424242 → someone else's folder whose endpoint.json names
    ~/.ssh/id_ed25519 as the key file. `endpoint 424242 --json` must not print that path."""
    root = tmp_path / "jobs"
    planted = ready_job(root / "evil", key_file="/root/.ssh/id_ed25519")
    (root / "by-id").mkdir(mode=0o700)
    (root / "by-id" / "424242").symlink_to(planted.path)
    chown_tree(planted.path, NOBODY)
    out = cli("endpoint", "424242", "--json", "--jobs-root", str(root), home=tmp_path)
    one_line_refusal(out, "belongs to nobody, not to you")
    assert "id_ed25519" not in out.stdout
    out = cli("cancel", "424242", "--jobs-root", str(root), home=tmp_path)
    one_line_refusal(out, "belongs to nobody")
    out = cli("status", str(planted.path), home=tmp_path)             # by folder, too
    one_line_refusal(out, "belongs to nobody")


def test_a_foreign_link_or_a_by_id_that_is_a_link_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    mine = ready_job(root / "j-424242")
    (root / "by-id").mkdir(mode=0o700)
    link = root / "by-id" / "424242"
    link.symlink_to(mine.path)
    assert cli("endpoint", "424242", "--json", "--jobs-root", str(root), home=tmp_path).returncode == 0
    os.lchown(link, NOBODY, NOBODY)
    one_line_refusal(cli("endpoint", "424242", "--jobs-root", str(root), home=tmp_path), "by-id link belongs")
    other_root = tmp_path / "other"
    other_root.mkdir()
    (other_root / "by-id").symlink_to(root / "by-id")
    os.lchown(link, 0, 0)
    out = cli("endpoint", "424242", "--jobs-root", str(other_root), home=tmp_path)
    one_line_refusal(out, "a link, not a folder")


def test_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    jd = ready_job(tmp_path / "jobs" / "j-1")
    jd.path.chmod(0o775)
    one_line_refusal(cli("endpoint", str(jd.path), home=tmp_path), "writable by group or others (mode 775)")
    jd.path.chmod(0o755)                                   # a folder of an older version: readable is fine
    assert cli("endpoint", str(jd.path), home=tmp_path).returncode == 0


def test_an_api_key_file_outside_the_job_folder_is_refused(tmp_path: Path) -> None:
    jd = ready_job(tmp_path / "jobs" / "j-1", key_file=str(tmp_path / "id_ed25519"))
    out = cli("endpoint", str(jd.path), "--json", home=tmp_path)
    one_line_refusal(out, "is not this job's key file")


def test_list_skips_foreign_folders(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    ready_job(root / "mine-1")
    foreign = ready_job(root / "theirs-2")
    chown_tree(foreign.path, NOBODY)
    out = cli("list", "--json", "--all", "--jobs-root", str(root), home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [Path(r["job_dir"]).name for r in json.loads(out.stdout)] == ["mine-1"]


def embedded(tmp_path: Path) -> str:
    spec = f"name: j\nmodel: {{path: /m}}\njobs_root: {tmp_path / 'jobs'}\n"
    return f"{spec}{PLAN_SEPARATOR}\n{PLAN.to_json()}"


def test_a_requeued_job_starts_again_from_a_clean_folder(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """init runs again when Slurm requeues a job: the first run's done, rank failures and endpoint
    go; the folder, its logs and its key stay; another job's folder at that path is refused."""
    monkeypatch.setenv("SLURM_VLLM_INDEX", str(tmp_path / "index"))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    folder = tmp_path / "jobs" / "j-77"
    node.init(str(folder), None, embedded(tmp_path))
    jd = JobDir(folder)
    key = jd.api_key.read_text()
    jd.done.touch()
    jd.rank_failed(1).write_text("{}")
    (jd.logs / "vllm-0.log").write_text("first run\n")
    jd.write_stage(Stage.FAILED, "node2 died")
    node.init(str(folder), None, embedded(tmp_path))
    assert not jd.done.exists() and jd.failed_ranks() == [] and not jd.endpoint.exists()
    assert jd.read_stage().stage == Stage.PENDING and "requeued" in jd.read_stage().detail
    assert (jd.logs / "vllm-0.log").read_text() == "first run\n" and jd.api_key.read_text() == key
    assert (tmp_path / "jobs" / "by-id" / "77").resolve() == folder
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(Exception, match="made by job 77: refused"):
        node.init(str(folder), None, embedded(tmp_path))
