"""A shared jobs_root is not trusted: folders are 0700, and every verb refuses what another user made
or can write (planted folders, by-id links, a by-id that is a link, a foreign api_key_file).

Real files, real ownership (the tests run as root and hand files to `nobody`), the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_vllm.core.errors import JobFolderError
from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.plan import Plan
from slurm_vllm.core.records import Endpoint, Stage
from slurm_vllm.core.render import PLAN_SEPARATOR
from slurm_vllm.node import entry as node

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
    jd.heartbeat(1).write_text("{}")              # run 1's worker address: run 2's may differ
    (jd.logs / "vllm-0.log").write_text("first run\n")
    jd.write_stage(Stage.FAILED, "node2 died")
    node.init(str(folder), None, embedded(tmp_path))
    assert not jd.done.exists() and jd.failed_ranks() == [] and not jd.endpoint.exists()
    assert not jd.heartbeat(1).exists()
    assert jd.read_stage().stage == Stage.PENDING and "requeued" in jd.read_stage().detail
    assert (jd.logs / "vllm-0.log").read_text() == "first run\n" and jd.api_key.read_text() == key
    assert (tmp_path / "jobs" / "by-id" / "77").resolve() == folder
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(Exception, match="made by job 77: refused"):
        node.init(str(folder), None, embedded(tmp_path))


def spec_in(root: Path, home: Path) -> Path:
    spec = home / "job.yaml"
    spec.write_text(f"name: j\nmodel: {{path: /m}}\njobs_root: {root}\n")
    return spec


def as_nobody(*argv: str) -> None:
    subprocess.run(list(argv), user=NOBODY, group=NOBODY, check=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A shared scratch folder as clusters have them: 1777, reachable by every user (`nobody` too)."""
    root = Path(tempfile.mkdtemp(prefix="svt-scratch-", dir="/tmp"))
    root.chmod(0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_submitit_folder_another_user_made_first_is_refused(tmp_path: Path, scratch: Path) -> None:
    """A shared jobs_root (1777): `nobody` made <jobs_root>/.submitit first (0777), to swap the script
    between its write and sbatch's read. submit refuses it (exit 2, one line), before anything is
    written there or sent to Slurm."""
    root = scratch
    as_nobody("mkdir", "-m", "777", str(root / ".submitit"))
    out = cli("submit", str(spec_in(root, tmp_path)), home=tmp_path)
    assert out.returncode == 2, out
    assert out.stderr.strip().endswith(f"jobs_root: {root}/.submitit: this folder belongs to nobody, not to "
                                       f"you: refused"), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert list((root / ".submitit").iterdir()) == []


def test_a_jobs_root_others_can_rearrange_is_refused(tmp_path: Path) -> None:
    """Writable by others without the sticky bit: anyone could rename the user's folders away and put
    their own in place. render and submit refuse it; 1777 (as /tmp) is accepted."""
    root = tmp_path / "open"
    root.mkdir()
    root.chmod(0o777)
    for verb in ("render", "submit"):
        out = cli(verb, str(spec_in(root, tmp_path)), home=tmp_path)
        assert out.returncode == 2 and "without the sticky bit (mode 777)" in out.stderr, out
    root.chmod(0o1777)
    assert cli("render", str(spec_in(root, tmp_path)), home=tmp_path).returncode == 0


def test_a_planted_link_inside_a_job_folder_is_never_followed(tmp_path: Path) -> None:
    """A container running as root with the folder bound can replace api_key by a link to any file of
    the user's: it would be sent as the Bearer token to the URL the folder names. Refused, as is a
    stage file that is a link, and a key file others can read."""
    from slurm_vllm.login.api import job as job_of

    home_secret = tmp_path / "id_ed25519"
    home_secret.write_text("PRIVATE KEY\n")
    home_secret.chmod(0o600)
    jd = ready_job(tmp_path / "jobs" / "j-1")
    jd.api_key.unlink()
    jd.api_key.symlink_to(home_secret)
    ep = job_of(str(jd.path)).endpoint()
    with pytest.raises(JobFolderError, match="api_key: a link: refused"):
        ep.api_key()
    jd.api_key.unlink()
    jd.api_key.write_text("sk-x\n")
    jd.api_key.chmod(0o644)
    with pytest.raises(JobFolderError, match="a secret others can reach"):
        ep.api_key()
    jd.stage_file.unlink()
    jd.stage_file.symlink_to(home_secret)
    one_line_refusal(cli("status", str(jd.path), home=tmp_path), "stage: a link: refused")


def test_logs_read_only_the_users_files_and_print_no_terminal_controls(tmp_path: Path) -> None:
    """`logs` reads the batch step's output beside the folder (<jobs_root>/<name>.out): a link planted
    there (to /etc/shadow) is not followed; what is printed carries no escape sequences or bidi
    overrides; a long log is read from its end."""
    jd = ready_job(tmp_path / "jobs" / "j-1")
    beside = jd.path.parent / f"{jd.path.name}.out"
    beside.symlink_to("/etc/shadow")
    escapes = "\x1b]0;pwned\x07\x1b[2Jcleared \u202eevil"        # set the title, clear, reorder
    (jd.logs / "vllm-0.log").write_text("x" * (3 << 20) + f"\nstarting\n{escapes}\n")
    out = cli("logs", str(jd.path), "-n", "2", home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "root:" not in out.stdout and "a link: refused" in out.stdout, out.stdout
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\u202e" not in out.stdout, out.stdout
    assert "starting" in out.stdout and "cleared" in out.stdout and "x" * 100 not in out.stdout


@pytest.mark.parametrize("what", ["spec", "template", "config.json"])
def test_a_fifo_in_place_of_an_input_file_is_refused_not_waited_on(what: str, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model = tmp_path / "model"
    model.mkdir()
    spec = tmp_path / "job.yaml"
    body = {"name": "j", "model": {"path": str(model)}, "jobs_root": str(tmp_path / "jobs")}
    if what == "template":
        body["slurm"] = {"template": str(fifo)}
    if what == "config.json":
        (model / "config.json").symlink_to(fifo)
    spec.write_text(json.dumps(body))
    out = subprocess.run([sys.executable, "-m", "slurm_vllm", "validate",
                          str(fifo if what == "spec" else spec)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "not a regular file" in out.stderr, out
    assert len(out.stderr.splitlines()) == 1, out.stderr


# -- batch outputs on shared scratch: two real users, root (the victim) and nobody ------------------

def batch_spec(home: Path, root: Path, **batch: str) -> Path:
    inp = home / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": "p", "max_tokens": 1}}) + "\n" for i in range(3)))
    spec = home / "batch.yaml"
    spec.write_text(json.dumps({"name": "b", "model": {"path": "/m"}, "jobs_root": str(root), "mode": "batch",
                                "batch": {"input": str(inp), **batch}}))
    return spec


def forged(path: Path) -> None:
    """`nobody` writes an output holding a line for every custom_id of the victim's input."""
    lines = "".join(json.dumps({"custom_id": f"c{i}", "response": {"status_code": 200, "body": {}},
                                "error": None}) + "\n" for i in range(3))
    subprocess.run(["sh", "-c", f'umask 0; printf %s "$1" > {path}', "sh", lines], user=NOBODY, group=NOBODY,
                   check=True)


def refused(out: subprocess.CompletedProcess[str], words: str) -> None:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    assert len(out.stderr.splitlines()) == 1 and words in out.stderr, out.stderr


def test_a_planted_default_output_is_refused_at_submit_and_on_the_node(tmp_path: Path, scratch: Path) -> None:
    """The default output <jobs_root>/<name>.results.jsonl, made first by `nobody` with a line for
    each custom_id: it would make the job DONE having sent nothing. validate (as submit) refuses it,
    and so does the driver's own open on the node."""
    from slurm_vllm.batch.driver import Driver
    from slurm_vllm.batch.reader import BatchInputError

    spec = batch_spec(tmp_path, scratch)
    forged(scratch / "b.results.jsonl")
    refused(cli("validate", str(spec), home=tmp_path), "results.jsonl belongs to nobody, not to you: refused")
    d = Driver("http://127.0.0.1:9", None, tmp_path / "in.jsonl", scratch / "b.results.jsonl", "m", 1,
               threading.Event())
    with pytest.raises(BatchInputError, match="belongs to nobody"):
        d.run()


def test_planted_parts_are_never_merged(tmp_path: Path, scratch: Path) -> None:
    from slurm_vllm.batch.merge import merge
    from slurm_vllm.batch.reader import BatchInputError

    spec = batch_spec(tmp_path, scratch)
    parts = scratch / "b.results.jsonl.parts"
    subprocess.run(["mkdir", "-m", "777", str(parts)], user=NOBODY, group=NOBODY, check=True)
    forged(parts / "part-0-of-2.jsonl")
    refused(cli("validate", str(spec), home=tmp_path), "parts folder belongs to nobody, not to you: refused")
    with pytest.raises(BatchInputError, match="parts folder belongs to nobody"):
        merge(scratch / "b.results.jsonl", parts, tmp_path / "in.jsonl")
    assert not (scratch / "b.results.jsonl").read_text()          # nothing of theirs was merged


def test_an_output_that_is_a_link_cuts_nothing_it_points_to(tmp_path: Path, scratch: Path) -> None:
    """A link planted as the output to a file of the victim's whose last line has no newline: a
    repair through it would cut that line. Refused at submit and by the node's open; the file is
    untouched."""
    from slurm_vllm.batch.driver import Driver
    from slurm_vllm.batch.merge import merge
    from slurm_vllm.batch.reader import BatchInputError

    victim = tmp_path / "notes.txt"
    victim.write_text("line one\nunfinished line")
    spec = batch_spec(tmp_path, scratch)
    subprocess.run(["ln", "-s", str(victim), str(scratch / "b.results.jsonl")], user=NOBODY, group=NOBODY,
                   check=True)
    refused(cli("validate", str(spec), home=tmp_path), "b.results.jsonl is a link: refused")
    d = Driver("http://127.0.0.1:9", None, tmp_path / "in.jsonl", scratch / "b.results.jsonl", "m", 1,
               threading.Event())
    with pytest.raises(BatchInputError, match="is a link: refused"):
        d.run()
    with pytest.raises(BatchInputError, match="is a link: refused"):
        merge(scratch / "b.results.jsonl", scratch / "b.results.jsonl.parts", tmp_path / "in.jsonl")
    assert victim.read_text() == "line one\nunfinished line"


@pytest.mark.parametrize(("case", "words"), [
    ("input", "is the input itself: name another file"),
    ("folder", "is a folder; name a file"),
    ("missing", "its folder"),
    ("open-folder", "without the sticky bit"),
])
def test_a_bad_output_is_found_at_submit_not_on_the_node(case: str, words: str, tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    output = {"input": str(tmp_path / "in.jsonl"), "folder": str(tmp_path),
              "missing": str(tmp_path / "nowhere" / "out.jsonl"),
              "open-folder": str(tmp_path / "open" / "out.jsonl")}[case]
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    refused(cli("validate", str(batch_spec(tmp_path, root, output=output)), home=tmp_path), words)


def test_an_index_entry_cannot_lead_list_or_cancel_elsewhere(tmp_path: Path) -> None:
    """The index (~/.slurm_vllm/index) names jobs by id: an entry whose job_id is a path (`../../x`)
    made `list` delete an arbitrary *.json, one naming another job made `cancel` hit that job. Such
    entries are skipped, and nothing outside the index is removed."""
    from slurm_vllm.core import index

    os.environ["SLURM_VLLM_INDEX"] = str(tmp_path / "index")
    try:
        index.record("77", tmp_path / "jobs" / "j-77", PLAN)
        victim = tmp_path / "keep.json"
        victim.write_text("{}")
        entry = json.loads((tmp_path / "index" / "77.json").read_text())
        (tmp_path / "index" / "x.json").write_text(json.dumps({**entry, "job_id": "../keep"}))
        (tmp_path / "index" / "78.json").write_text(json.dumps({**entry, "job_id": "99"}))
        assert [e.job_id for e in index.entries()] == ["77"]
        assert index.lookup("78") is None and index.lookup("../keep") is None
        index.forget("../keep")
        assert victim.exists()
        out = cli("list", "--all", home=tmp_path)
        assert out.returncode == 0 and victim.exists(), out
    finally:
        del os.environ["SLURM_VLLM_INDEX"]


def test_an_output_answers_one_input_only(tmp_path: Path, scratch: Path) -> None:
    """Lines of another batch with the same custom_ids (or of this input before it was edited) would
    count as done with answers to other prompts. The output records its input (path and digest):
    another input's output, or one with lines and no record, is refused at validate and on the node."""
    from slurm_vllm.batch.driver import Driver
    from slurm_vllm.batch.output import input_digest, record_path, write_record
    from slurm_vllm.batch.reader import BatchInputError

    spec = batch_spec(tmp_path, scratch)
    inp, out = tmp_path / "in.jsonl", scratch / "b.results.jsonl"
    other = tmp_path / "other.jsonl"
    other.write_text(inp.read_text().replace('"p"', '"another prompt"'))
    out.write_text("".join(json.dumps({"custom_id": f"c{i}", "response": {}, "error": None}) + "\n"
                           for i in range(3)))
    out.chmod(0o600)
    refused(cli("validate", str(spec), home=tmp_path), "holds results with no record of their input")
    write_record(out, other, input_digest(other))
    assert record_path(out).stat().st_mode & 0o777 == 0o600
    refused(cli("validate", str(spec), home=tmp_path), f"holds results of another input ({other})")
    with pytest.raises(BatchInputError, match="another input"):
        Driver("http://127.0.0.1:9", None, inp, out, "m", 1, threading.Event()).run()
    write_record(out, inp, input_digest(inp))
    assert cli("validate", str(spec), home=tmp_path).returncode == 0
    inp.write_text(inp.read_text().replace('"p"', '"edited"'))
    refused(cli("validate", str(spec), home=tmp_path), "holds results of this input before it changed")


def test_the_job_folders_spec_is_read_as_the_users_is(tmp_path: Path) -> None:
    """spec.yaml in the job folder (read by the ranks and by merge) goes through the same hardened
    loader as the user's file: an alias or a duplicate key is one error naming the file; a link is
    not followed."""
    jd = JobDir(tmp_path / "j-1")
    jd.create("name: j\nmodel: {path: /m}\n", PLAN.to_json(), api_key=False)
    assert jd.read_spec().name == "j"
    jd.spec.write_text("name: j\nmodel: &m {path: /m}\nother: *m\n")
    with pytest.raises(JobFolderError, match=r"spec.yaml: .*aliases"):
        jd.read_spec()
    jd.spec.write_text("name: j\nname: k\nmodel: {path: /m}\n")
    with pytest.raises(JobFolderError, match=r"spec.yaml: .*duplicate key 'name'"):
        jd.read_spec()
    jd.spec.unlink()
    (tmp_path / "elsewhere.yaml").write_text("name: j\nmodel: {path: /m}\n")
    jd.spec.symlink_to(tmp_path / "elsewhere.yaml")
    with pytest.raises(JobFolderError, match="a link: refused"):
        jd.read_spec()


def test_a_job_folder_made_first_by_another_user_fails_init_with_one_line(tmp_path: Path,
                                                                          scratch: Path) -> None:
    """Job names are public (squeue) and ids sequential: another user can make <name>-<id> first. The
    job's init step refuses it with one line on stderr (what `status` then shows), no traceback."""
    folder = scratch / "j-91"
    subprocess.run(["mkdir", "-m", "777", str(folder)], user=NOBODY, group=NOBODY, check=True)
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "91", "SLURM_VLLM_INDEX": str(tmp_path / "index")}
    out = subprocess.run([sys.executable, "-m", "slurm_vllm.node", "init", str(folder)],
                         input=embedded(tmp_path), capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    said = f"slurm_vllm: error: {folder}: this job folder belongs to nobody, not to you: refused"
    assert out.stderr.strip() == said
    assert list(folder.iterdir()) == []


def test_a_planted_temporary_name_cannot_redirect_a_write_in_a_shared_folder(tmp_path: Path,
                                                                             scratch: Path) -> None:
    """The output's record is written atomically beside the output, in shared scratch: the temporary
    name is unpredictable and created new, so links `nobody` planted under the names an older scheme
    (the pid) would use redirect nothing; the victim's file is untouched."""
    from slurm_vllm.core.jobdir import atomic_write

    victim = tmp_path / "notes.txt"
    victim.write_text("keep me\n")
    record = scratch / ".out.jsonl.input"
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        subprocess.run(["ln", "-s", str(victim), str(scratch / f".{record.name}.{pid}.tmp")],
                       user=NOBODY, group=NOBODY, check=True)
    atomic_write(record, "record\n", mode=0o600)
    assert victim.read_text() == "keep me\n"
    assert record.read_text() == "record\n" and not record.is_symlink()
