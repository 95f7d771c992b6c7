"""The rendered sbatch script: golden file (with a readable diff), shell syntax, refused flags."""

from __future__ import annotations

import difflib
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from slurm_vllm.core import plan, render, spec
from slurm_vllm.core.errors import SpecError
from slurm_vllm.node import jobenv

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden" / "job.sbatch"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"          # what users start from
TEST_CONFIGS = Path(__file__).resolve().parent / "configs"         # the test bed's
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
    return render.sbatch_text(s, plan.make(s, {}), "/opt/slurm_vllm/bin/python")


def test_golden_sbatch_script() -> None:
    text = rendered()
    expected = GOLDEN.read_text()
    if os.environ.get("SLURM_VLLM_UPDATE_GOLDEN") and text != expected:
        GOLDEN.write_text(text)
        pytest.fail("golden/job.sbatch rewritten from the rendered script: review `git diff` and run again")
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
        spec.parse(data)                                  # at load: validate refuses it too


@pytest.fixture(autouse=True)
def no_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USER", raising=False)      # jobs_root's $USER stays as written


def embedded_of(text: str) -> str:
    return text.split("<<'SLURM_VLLM_SPEC'\n", 1)[1].split("SLURM_VLLM_SPEC\n", 1)[0]


@pytest.mark.parametrize("path", sorted([*CONFIGS.glob("*.yaml"), *TEST_CONFIGS.glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_every_config_renders_one_job(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script of every config: valid shell, its directives, the spec and plan embedded once."""
    for var in ("SLURM_VLLM_TEST_VENV", "SLURM_VLLM_TEST_MODEL", "SLURM_VLLM_TEST_JOBS_ROOT",
                "SLURM_VLLM_TEST_APPTAINER_IMAGE", "SLURM_VLLM_TEST_IMAGE", "SLURM_VLLM_TEST_SECRET_FILE",
                "SLURM_VLLM_TEST_PYXIS_IMAGE"):
        monkeypatch.setenv(var, f"/testbed/{var.lower()}")
    monkeypatch.setenv("SLURM_VLLM_TEST_BINDS", "/a:/a:ro")
    s = spec.load(path)
    p = plan.make(s, {})
    text = render.sbatch_text(s, p, "/usr/bin/python3")
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    flags = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert flags == render.directives(s)
    assert f"--nodes={s.slurm.nodes}" in flags and "--signal=USR2@90" in flags
    spec_yaml, plan_json = render.split_embedded(embedded_of(text))
    assert spec.parse(yaml.safe_load(spec_yaml), expand=False) == s and plan.Plan.from_json(plan_json) == p
    node = [line for line in text.splitlines() if line.startswith("srun ")]
    assert node == [render.job_script(s, p, "/usr/bin/python3").node_command]


def test_a_user_template_extends_the_shipped_one_by_blocks(tmp_path: Path) -> None:
    template = tmp_path / "site.sbatch.j2"
    template.write_text('{% extends "job.sbatch.j2" %}\n'
                        "{% block directives %}{{ super() }}#SBATCH --comment=site\n{% endblock %}\n"
                        "{% block setup %}module load cuda/12.4\n{{ super() }}{% endblock %}\n")
    s = spec.parse({**SPEC, "slurm": {**SPEC["slurm"], "template": str(template)}})  # type: ignore[dict-item]
    text = render.sbatch_text(s, plan.make(s, {}), "/usr/bin/python3")
    lines = text.splitlines()
    assert lines.index("#SBATCH --comment=site") == lines.index("#SBATCH --hint=nomultithread") + 1
    assert lines.index("module load cuda/12.4") + 1 == lines.index("module load apptainer")
    assert text.count("slurm_vllm.node run") == 1
    # render --template wins over the spec's
    plain = tmp_path / "plain.j2"
    plain.write_text('{% extends "job.sbatch.j2" %}')
    assert "--comment=site" not in render.sbatch_text(s, plan.make(s, {}), "/usr/bin/python3", plain)


@pytest.mark.parametrize(("body", "message"), [
    (None, "slurm.template: {path}: cannot read: No such file or directory"),
    ('{% extends "job.sbatch.j2" %}{% block setup %}{{ nope }}{% endblock %}', "'nope' is undefined"),
    ("{% block setup %", "line 1: expected token 'end of statement block'"),
])
def test_template_errors_are_one_line_spec_errors(body: str | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / "t.j2"
    if body is not None:
        path.write_text(body)
    s = spec.parse({**SPEC, "slurm": {**SPEC["slurm"], "template": str(path)}})  # type: ignore[dict-item]
    with pytest.raises(SpecError) as err:
        render.sbatch_text(s, plan.make(s, {}), "/usr/bin/python3")
    assert message.format(path=path) in str(err.value) and "\n" not in str(err.value)


def test_a_relative_template_is_found_beside_the_spec(tmp_path: Path) -> None:
    (tmp_path / "site.j2").write_text('{% extends "job.sbatch.j2" %}')
    (tmp_path / "job.yaml").write_text("name: t\nmodel: {path: /m}\nslurm: {template: site.j2}\n")
    assert spec.load(tmp_path / "job.yaml").slurm.template == str(tmp_path / "site.j2")


def test_a_batch_that_may_go_on_requeues_itself_after_its_tasks() -> None:
    """max_jobs > 1: `--requeue`, appended logs, and after srun the line that requeues the job when
    the head left the mark; a batch of one run, or a serving job, has neither."""
    data = {**SPEC, "mode": "batch", "batch": {"input": "/data/in.jsonl", "max_jobs": 3}}
    s = spec.parse(data)
    text = render.sbatch_text(s, plan.make(s, {}), "/usr/bin/python3")
    assert "#SBATCH --requeue\n" in text and "#SBATCH --open-mode=append\n" in text
    srun = next(i for i, line in enumerate(text.splitlines()) if line.startswith("srun "))
    assert text.splitlines()[srun + 1] == render.REQUEUE
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    one = spec.parse({**data, "batch": {"input": "/data/in.jsonl"}})
    for quiet in (one, spec.parse(SPEC)):
        other = render.sbatch_text(quiet, plan.make(quiet, {}), "/usr/bin/python3")
        assert "--requeue" not in other and "scontrol requeue" not in other


def test_a_sharded_batch_is_a_job_array_whose_tasks_have_folders_of_their_own() -> None:
    """batch.shards: 3 → `--array=0-2`; each task's folder and batch log are named by its id as
    squeue shows it (`<array id>_<task>`), as the shell of the script computes them."""
    data = {**SPEC, "mode": "batch", "batch": {"input": "/data/in.jsonl", "shards": 3}}
    s = spec.parse(data)
    p = plan.make(s, {})
    assert p.shards == 3
    text = render.sbatch_text(s, p, "/usr/bin/python3")
    assert "#SBATCH --array=0-2\n" in text
    assert f"#SBATCH --output={render.sbatch_quote(str(s.jobs_root_path) + '/llama-70b-%A_%a.out')}\n" in text
    job_dir_line = next(line for line in text.splitlines() if line.startswith("job_dir="))
    task = {"SLURM_JOB_ID": "125", "SLURM_ARRAY_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": "2"}
    shown = subprocess.run(["bash", "-c", f'{job_dir_line}\necho "$job_dir"'], capture_output=True,
                           text=True, env=task, check=True).stdout.strip()
    assert shown == f"{s.jobs_root_path}/llama-70b-123_2"
    assert jobenv.shown_job_id(task, array=True) == "123_2" and jobenv.shown_job_id(task, False) == "125"
    unsharded = spec.parse({**data, "batch": {"input": "/data/in.jsonl"}})
    other = render.sbatch_text(unsharded, plan.make(unsharded, {}), "/usr/bin/python3")
    assert "--array" not in other and '-"$SLURM_JOB_ID"\n' in other


def sbatch_words(line: str) -> list[str]:
    """The words sbatch reads from the rest of an #SBATCH line: a port of Slurm's own tokenizer
    (src/sbatch/opt.c, _get_argument: a backslash escapes the next character anywhere, ' and " open
    a quoted part, an unquoted # ends the line). The real sbatch reads them in test_sbatch_e2e.py."""
    words: list[str] = []
    i = 0
    while True:
        while i < len(line) and line[i].isspace():
            i += 1
        if i >= len(line):
            return words
        word, quote, escape = "", "", False
        while i < len(line) and (quote or not line[i].isspace()):
            c = line[i]
            i += 1
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                continue
            elif quote:
                if c == quote:
                    quote = ""
                    continue
            elif c in "\"'":
                quote = c
                continue
            elif c == "#":
                return [*words, word] if word else words
            word += c
        assert not quote, f"sbatch would stop: unmatched {quote} in {line!r}"
        words.append(word)


HOSTILE = ["gpu' --output=/tmp/x", 'a\\" --signal=KILL@1', "x\\", "x # --exclusive", "acc ount",
           "--export=ALL,LD_PRELOAD=/x", "a'b\"c\\d", "ünïcode", "%j%u"]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_value_is_one_word_of_its_sbatch_line(value: str) -> None:
    """partition, account, qos, constraint, extra_directives and jobs_root are quoted for sbatch's
    tokenizer (not a shell's): each comes back as exactly one word, the value itself."""
    data = {**SPEC, "slurm": {**SPEC["slurm"], "partition": value, "account": value, "qos": value,
                              "constraint": value, "extra_directives": {"comment": value}}}
    s = spec.parse(data)
    lines = [line for line in render.sbatch_text(s, plan.make(s, {}), "/p").splitlines()
             if line.startswith("#SBATCH ")]
    for flag in ("partition", "account", "qos", "constraint", "comment"):
        [line] = [x for x in lines if x.startswith(f"#SBATCH --{flag}=")]
        assert sbatch_words(line.removeprefix("#SBATCH")) == [f"--{flag}={value}"], line


def test_a_control_character_cannot_reach_an_sbatch_line() -> None:
    with pytest.raises(SpecError, match="control character"):
        render.sbatch_quote("gpu\n#SBATCH --exclusive")


@pytest.mark.parametrize("body", [
    '{% extends "job.sbatch.j2" %}{% block setup %}{{ cycler.__init__.__globals__.os.system("touch MARK") }}'
    '{% endblock %}',
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set x = [] %}{{ x.append('MARK') }}",
])
def test_a_template_cannot_reach_python(body: str, tmp_path: Path) -> None:
    """slurm.template is rendered on the login node (validate, render, submit): in jinja2's sandbox,
    an attribute that leads to Python is a one-line spec error, and nothing ran."""
    template = tmp_path / "evil.j2"
    template.write_text(body.replace("MARK", str(tmp_path / "ran")))
    s = spec.parse({**SPEC, "slurm": {**SPEC["slurm"], "template": str(template)}})
    refused = r"^slurm.template: .*evil.j2: refused by the template sandbox: "
    with pytest.raises(SpecError, match=refused) as err:
        render.sbatch_text(s, plan.make(s, {}), "/p")
    assert "\n" not in str(err.value) and not (tmp_path / "ran").exists()


def test_a_runtime_error_in_a_template_is_a_spec_error(tmp_path: Path) -> None:
    template = tmp_path / "div.j2"
    template.write_text("{{ 1 // 0 }}")
    s = spec.parse({**SPEC, "slurm": {**SPEC["slurm"], "template": str(template)}})
    with pytest.raises(SpecError, match=r"slurm.template: .*div.j2: ZeroDivisionError"):
        render.sbatch_text(s, plan.make(s, {}), "/p")
