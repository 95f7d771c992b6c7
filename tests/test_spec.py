"""Spec parsing: defaults, and one-line errors that name the key path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slurm_vllm.core import spec
from slurm_vllm.core.errors import SpecError

pytestmark = pytest.mark.unit
MINIMAL = {"name": "t", "model": {"path": "/models/m"}}


def parse(**overrides: object) -> spec.JobSpec:
    return spec.parse({**MINIMAL, **overrides})


def test_defaults() -> None:
    s = parse()
    assert s.slurm.nodes == 1 and s.slurm.gpus_per_node == 1 and s.slurm.time == "01:00:00"
    assert s.parallelism.tensor == "auto" and s.container.runtime == "none"
    assert s.vllm.api_key == "auto" and s.model.name == "m"


@pytest.mark.parametrize(("data", "message"), [
    ({"slurm": {"nodez": 2}}, "slurm.nodez: unknown key; valid keys: nodes (default 1), gpus_per_node"),
    ({"colour": 1}, "colour: unknown key; valid keys: name (required), model (required)"),
    ({"slurm": {"nodes": "two"}}, "slurm.nodes: expected int, got 'two'"),
    ({"slurm": {"nodes": 0}}, "slurm.nodes: must be 1-4096"),
    ({"parallelism": {"tensor": "max"}}, "parallelism.tensor: expected int or auto, got 'max'"),
    ({"container": {"runtime": "singularity"}},
     "container.runtime: expected one of apptainer, docker, podman, pyxis, none, got 'singularity'"),
    ({"container": {"runtime": "docker"}}, "container.image: required when container.runtime is docker"),
    ({"container": {"binds": ["/a"]}}, "container.binds[0]: '/a': use host:container or host:container:ro"),
    ({"env": {"HF_TOKEN": "hf_x"}}, "env.HF_TOKEN: looks like a secret; put it in secret_env"),
    ({"secret_env": {"HF_TOKEN": "hf_x"}}, "secret_env.HF_TOKEN: must be the absolute path of a file"),
    ({"slurm": {"time": "1 hour"}}, "slurm.time: '1 hour': use Slurm's"),
    ({"vllm": {"port": 80}}, "vllm.port: must be 1024-65535 or auto"),
    ({"model": {}}, "model.path: required key is missing"),
    ({"mode": "batch", "batch": {"input": "/in.jsonl", "shards": 0}},
     "batch.shards: must be 1-1000"),
    ({"batch": {"shards": 2}}, "batch: only with mode: batch"),
    ({"mode": "batch", "batch": {"input": "/in.jsonl", "concurrency": 0}},
     "batch.concurrency: must be 1-4096 or auto, got 0"),
    ({"mode": "batch", "batch": {"input": "/in.jsonl", "concurrency": "max"}},
     "batch.concurrency: expected int or auto, got 'max'"),
    ({"mode": "batch", "batch": {"input": "/in.jsonl", "prefix_window": -1}},
     "batch.prefix_window: must be 0-1000000 (0: input order), got -1"),
    ({"backend": "nccl"}, "backend: expected one of auto, ray, mp, got 'nccl'"),
    ({"vllm": {"args": {"headless": True}}}, "vllm.args.headless: set by slurm_vllm; use backend: mp"),
    ({"vllm": {"args": {"node-rank": 1}}}, "vllm.args.node-rank: set by slurm_vllm"),
    ({"slurm": {"extra_directives": {"array": "0-3"}}},
     "slurm.extra_directives.array: managed by slurm_vllm; use (batch.shards)"),
])
def test_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec.parse({**MINIMAL, **data})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_env_expansion_and_bind_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M", "/data/model")
    monkeypatch.setenv("BINDS", "/a:/a:ro,/b:/b")
    s = spec.parse({"name": "t", "model": {"path": "${M}"}, "container": {"binds": ["${BINDS}", "/c:/c"]},
                    "slurm": {"setup": ["echo ${NOT_EXPANDED}"]}})
    assert s.model.path == "/data/model"
    assert s.container.binds == ("/a:/a:ro", "/b:/b", "/c:/c")
    assert s.slurm.setup == ("echo ${NOT_EXPANDED}",)
    with pytest.raises(SpecError, match=r"model.path: \$\{NOPE\} is not set"):
        spec.parse({"name": "t", "model": {"path": "${NOPE}"}})


def test_load_reports_file_and_yaml_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+: not valid YAML"):
        spec.load(bad)
    with pytest.raises(SpecError, match="cannot read"):
        spec.load(tmp_path / "missing.yaml")


def test_dump_round_trips() -> None:
    s = parse(slurm={"nodes": 2, "setup": ["module load x"]}, vllm={"args": {"max_model_len": 256}})
    assert spec.parse(yaml.safe_load(spec.dump(s))) == s


@pytest.mark.parametrize(("section", "data"), [
    ("env.OMP", {"env": {"OMP": "1\ntouch /tmp/x"}}),
    ("nccl.ib_hca", {"nccl": {"ib_hca": "mlx5_0\nX=1"}}),
])
def test_a_newline_in_an_env_value_is_refused_at_load(section: str, data: dict[str, object]) -> None:
    with pytest.raises(SpecError, match=f"{section}: control character '\\\\n' not allowed"):
        spec.parse({"name": "t", "model": {"path": "/m"}, **data})
