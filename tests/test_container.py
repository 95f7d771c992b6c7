"""Container argv per runtime: host network/IPC, env through a file and a wrapper (never -e), binds, GPUs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slurm_vllm.core.spec import ContainerSpec
from slurm_vllm.node.container import WRAPPER, Runtime, env_file_text, wrapped

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
    # No environment on the command line or in the container's config: the wrapper reads the file.
    assert "--env-file" not in argv and "-e" not in argv and "--env" not in argv
    assert argv[-9:] == ["--foo", "vllm:1", "sh", "-c", WRAPPER, "slurm-vllm-env", str(ENV), "ray", "start"]
    assert runtime(kind).exec(["vllm", "serve"]) == [kind, "exec", "slurm-vllm-7-0", "sh", "-c", WRAPPER,
                                                     "slurm-vllm-env", str(ENV), "vllm", "serve"]
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
    assert "--env-file" not in apptainer and apptainer[-7:] == ["img.sif", *wrapped(ENV, ["x"])]
    assert "/dev/infiniband" not in apptainer                     # Apptainer passes /dev through
    assert runtime("none").start(["ray", "start"]) == ["ray", "start"]


ODD = {"A": "two words", "B": "it's $HOME", "C": 'say "hi" \\ # = ${X} `id` $(id)', "D": " lead", "E": ""}


def test_env_file_is_shell_assignments_the_wrapper_reads_back(tmp_path: Path) -> None:
    """The env file through the real wrapper under sh: every value arrives byte for byte, nothing
    expands (quotes, $, \\, #, =, spaces, backquotes), and the program gets its own argv."""
    text = env_file_text(ODD)
    env_file = tmp_path / "rank-0.env"
    env_file.write_text(text)
    probe = "import json, os, sys; print(json.dumps([{k: os.environ.get(k) for k in 'ABCDE'}, sys.argv[1:]]))"
    out = subprocess.run(wrapped(env_file, ["python3", "-c", probe, "--x", "$HOME"]), capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"}, check=True).stdout
    assert json.loads(out) == [ODD, ["--x", "$HOME"]]
