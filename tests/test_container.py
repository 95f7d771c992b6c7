"""Container argv per runtime: host network/IPC, env file (never -e), binds, GPUs, InfiniBand."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from slurm_vllm.container import Runtime, env_file_text
from slurm_vllm.spec import ContainerSpec

pytestmark = pytest.mark.unit
ENV = Path("/jobs/j/env/rank-0.env")


def runtime(kind: str, **kw: object) -> Runtime:
    spec = ContainerSpec(runtime=kind, image="img.sif" if kind == "apptainer" else "vllm:1",  # type: ignore[arg-type]
                         binds=("/m:/m:ro",), options=("--foo",))
    return Runtime(spec, "slurm-vllm-7-0", ENV, ("/m:/m:ro", "/jobs/j:/jobs/j"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["docker", "podman"])
def test_docker_like_run_and_exec(kind: str) -> None:
    argv = runtime(kind).start(["ray", "start"])
    assert argv[:5] == [kind, "run", "--rm", "--name", "slurm-vllm-7-0"]
    assert {"--network", "host", "--ipc", "--init"} <= set(argv)
    assert argv[argv.index("--env-file") + 1] == str(ENV) and "-e" not in argv
    assert argv[-4:] == ["--foo", "vllm:1", "ray", "start"]
    assert runtime(kind).exec(["vllm", "serve"]) == [kind, "exec", "--env-file", str(ENV), "slurm-vllm-7-0",
                                                     "vllm", "serve"]
    assert "slurm-vllm-7-0-preflight" in runtime(kind).remove(("", "-preflight"))  # type: ignore[operator]


def test_gpus_and_infiniband_flags() -> None:
    docker = runtime("docker", visible_gpus=("0", "1"), infiniband=True).start(["x"])
    assert docker[docker.index("--gpus") + 1] == '"device=0,1"'
    assert docker[docker.index("/dev/infiniband") - 1] == "--device"
    assert "memlock=-1" in docker and "IPC_LOCK" in docker
    podman = runtime("podman", visible_gpus=("0",)).start(["x"])
    assert "--device=nvidia.com/gpu=0" in podman and "/dev/infiniband" not in podman
    apptainer = runtime("apptainer", visible_gpus=("0",), infiniband=True).start(["x"])
    assert apptainer[:2] == ["apptainer", "exec"] and "--nv" in apptainer
    assert "/dev/infiniband" not in apptainer                     # Apptainer passes /dev through
    assert runtime("none").start(["ray", "start"]) == ["ray", "start"]


def test_env_file_quoting_per_runtime(tmp_path: Path) -> None:
    env = {"A": "two words", "B": "it's $HOME"}
    assert env_file_text(env, "docker") == "A=two words\nB=it's $HOME\n"
    text = env_file_text(env, "apptainer")
    assert text == f"A={shlex.quote(env['A'])}\nB={shlex.quote(env['B'])}\n"
    script = tmp_path / "f"
    script.write_text(text)                         # Apptainer sources it as shell: values survive
    out = subprocess.run(["sh", "-c", f". {script}; printf '%s|%s' \"$A\" \"$B\""], capture_output=True,
                         text=True).stdout
    assert out == "two words|it's $HOME"
    with pytest.raises(ValueError, match="newline"):
        env_file_text({"A": "x\ny"}, "docker")
