"""The command line: --help stays light (no ray/vllm import), errors are one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[1] / "configs"          # what users start from
TEST_CONFIGS = Path(__file__).resolve().parent / "configs"         # the test bed's


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slurm_vllm", *args], capture_output=True, text=True,
                          env=env)


def test_help_and_validate_do_not_import_ray_or_vllm(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nmodel: {path: /m}\nslurm: {nodes: 2, gpus_per_node: 4}\n")
    probe = (
        "import sys\nfrom slurm_vllm.login.cli import main\n"
        "for verb in ['validate', 'render', 'submit', 'preflight', 'list', 'status', 'endpoint', 'logs',"
        "             'cancel', 'merge']:\n"
        "    try:\n        main([verb, '--help'])\n    except SystemExit:\n        pass\n"
        f"main(['validate', {str(spec)!r}])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'torch', 'submitit'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_spec_error_is_one_line_exit_2_and_debug_shows_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: t\nmodel: {path: /m}\nslurm: {nodez: 2}\n")
    out = cli("validate", str(spec))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "slurm.nodez: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    assert "Traceback" in cli("--debug", "validate", str(spec)).stderr


def test_bad_parallelism_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: t\nmodel: {path: /m}\nslurm: {nodes: 2, gpus_per_node: 4}\n"
                    "parallelism: {tensor: 3}\n")
    out = cli("validate", str(spec))
    assert out.returncode == 2 and "valid choices: TP1xPP8, TP2xPP4, TP4xPP2, TP8xPP1" in out.stderr


def test_preflight_ray_refuses_a_spec_without_ray(tmp_path: Path) -> None:
    spec = tmp_path / "mp.yaml"
    spec.write_text(f"name: t\nmodel: {{path: /m}}\nslurm: {{nodes: 2, gpus_per_node: 1}}\nbackend: mp\n"
                    f"jobs_root: {tmp_path / 'jobs'}\n")
    out = cli("preflight", "--ray", str(spec))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "backend: mp starts no Ray cluster; preflight --ray needs backend: ray" in out.stderr
    assert not (tmp_path / "jobs").exists()                   # refused before anything was made


def test_ray_table_lists_the_nodes_and_the_times() -> None:
    from slurm_vllm.core.preflight import ray_table

    nodes = [{"ip": "10.77.0.11", "gpus": 1.0}, {"ip": "10.77.0.12", "gpus": 2.0}]
    text = ray_table({"job_id": "7", "nodes": nodes, "ray_head_s": 1.5, "all_joined_s": 3.25})
    assert text.splitlines()[0] == ("Ray cluster of 2 nodes: head up 1.5 s, all joined 3.25 s after the job "
                                    "started")
    assert text.splitlines()[-1].split() == ["10.77.0.12", "2"]


def test_submit_without_submitit_says_what_to_install(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: t\nmodel: {{path: /m}}\nslurm: {{nodes: 2, gpus_per_node: 1}}\n"
                    f"jobs_root: {tmp_path / 'jobs'}\n")
    probe = ("import sys\nsys.modules['submitit'] = None\nfrom slurm_vllm.login.cli import main\n"
             f"sys.exit(main(['submit', {str(spec)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "submitit is not installed for" in out.stderr
    assert not (tmp_path / "jobs").exists()


def test_unknown_job_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    out = cli("status", "999999", "--jobs-root", str(tmp_path))
    assert out.returncode == 1 and "job 999999: no job folder" in out.stderr


@pytest.mark.parametrize("path", sorted([*CONFIGS.glob("*.yaml"), *TEST_CONFIGS.glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_every_config_validates(path: Path, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           **{k: f"/testbed/{k.lower()}" for k in (
               "SLURM_VLLM_TEST_VENV", "SLURM_VLLM_TEST_MODEL", "SLURM_VLLM_TEST_JOBS_ROOT",
               "SLURM_VLLM_TEST_APPTAINER_IMAGE", "SLURM_VLLM_TEST_SECRET_FILE",
               "SLURM_VLLM_TEST_PYXIS_IMAGE")},
           "SLURM_VLLM_TEST_IMAGE": "localhost/test:latest", "SLURM_VLLM_TEST_BINDS": "/a:/a:ro,/b:/b"}
    env.update(HOME=str(tmp_path), SLURM_VLLM_TEST_JOBS_ROOT=str(tmp_path / "jobs"))
    data = yaml.safe_load(path.read_text())
    if data.get("mode") == "batch":           # its input, as the spec names it (under HOME or jobs_root)
        where = data["batch"]["input"].replace("${SLURM_VLLM_TEST_JOBS_ROOT}", str(tmp_path / "jobs"))
        inp = Path(where.replace("~", str(tmp_path), 1))
        inp.parent.mkdir(parents=True, exist_ok=True)
        inp.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                   "body": {"prompt": "x"}}) + "\n")
    out = cli("validate", str(path), env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok: ")
    # the backend it runs, and whether auto chose it (vLLM's own within one node, Ray across nodes)
    per_server = data["slurm"]["nodes"] // data.get("parallelism", {}).get("data", 1)
    chosen = data.get("backend") or ("mp" if per_server == 1 else "ray")
    assert f", backend {chosen}{'' if 'backend' in data else ' (auto)'}; " in out.stdout, out.stdout


def test_a_multi_node_spec_says_what_other_users_can_see(tmp_path: Path) -> None:
    """validate (and submit) say in one line that a multi-node job's inter-node traffic is readable by
    other users on the nodes' network, with the README's section; a 1-node job says nothing of it."""
    for nodes, said in ((2, True), (1, False)):
        spec = tmp_path / f"n{nodes}.yaml"
        spec.write_text(f"name: t\nmodel: {{path: /m}}\nslurm: {{nodes: {nodes}, gpus_per_node: 4}}\n")
        out = cli("validate", str(spec))
        assert out.returncode == 0, out.stderr
        notices = [line for line in out.stderr.splitlines() if line.startswith("slurm_vllm: notice: ")]
        assert len(notices) == (1 if said else 0), out.stderr
        if said:
            assert "spans 2 nodes" in notices[0] and "can read prompts" in notices[0]
            assert "'Multi-node traffic'" in notices[0]


def test_the_login_side_verbs_work_without_ray_or_vllm_installed(tmp_path: Path) -> None:
    """`pip install .` no longer brings Ray (it is the `node` extra): validate, render, list and
    status of a job folder run with ray and vllm not importable at all."""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: t\nmodel: {{path: /m}}\nslurm: {{nodes: 2, gpus_per_node: 4}}\n"
                    f"jobs_root: {tmp_path / 'jobs'}\n")
    blocked = "import sys\nfor name in ('ray', 'vllm', 'torch'):\n    sys.modules[name] = None\n"
    for argv in (["validate", str(spec)], ["render", str(spec)], ["list", "--all"]):
        code = blocked + f"from slurm_vllm.login.cli import main\nsys.exit(main({argv!r}))\n"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                  "SLURM_VLLM_INDEX": str(tmp_path / "index")})
        assert out.returncode == 0, (argv, out.stderr)
    declared = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    deps = declared.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "ray" not in deps and 'node = ["ray' in declared
