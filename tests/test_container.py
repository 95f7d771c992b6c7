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
    image = {"apptainer": "img.sif", "pyxis": "nvcr.io#nvidia/vllm:1"}.get(kind, "vllm:1")
    spec = ContainerSpec(runtime=kind, image=image,  # type: ignore[arg-type]
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


def test_pyxis_runs_each_program_as_a_step_on_its_own_node() -> None:
    """The first program creates the rank's named container on an srun step of the job on this node
    (the job's squashfs file, the binds as --container-mounts); the next ones join it; the env file
    comes through the wrapper, so nothing of it is on srun's command line."""
    r = runtime("pyxis", image="/jobs/j/image.sqsh", job_id="7", host="node3", cpus=16,
                visible_gpus=("2", "3"))
    first = r.start(["ray", "start"], suffix="-preflight")        # one container a rank: no suffix
    assert first[:11] == ["srun", "--overlap", "--jobid=7", "--nodes=1", "--ntasks=1", "--nodelist=node3",
                          "--cpus-per-task=16", "--gres=gpu:2", "--export=ALL", "--unbuffered",
                          "--job-name=slurm-vllm-7-0"]
    assert "--container-image=/jobs/j/image.sqsh" in first          # the file, not the registry name
    assert "--container-name=slurm-vllm-7-0:no_exec" in first
    assert "--container-mounts=/m:/m:ro,/jobs/j:/jobs/j" in first
    assert {"--no-container-mount-home", "--no-container-entrypoint", "--foo"} <= set(first)
    assert first[-7:] == [*wrapped(ENV, ["ray", "start"])]
    join = r.exec(["vllm", "serve"], env_file=Path("/jobs/j/env/vllm-0.env"))
    assert "--container-name=slurm-vllm-7-0:exec" in join
    assert not any(a.startswith(("--container-image", "--container-mounts")) for a in join)
    assert "--foo" not in join and join[-2:] == ["vllm", "serve"] and "/jobs/j/env/vllm-0.env" in join


def test_pyxis_cleanup_removes_the_containers_that_exist_under_either_scope(tmp_path: Path) -> None:
    """The removal command under sh, with an enroot that lists two containers: it removes the rank's
    (by Pyxis's global- and job-scope names) that exist, and no other; `enroot remove` of a missing
    one would fail, so it is not asked."""
    calls = tmp_path / "calls"
    fake = tmp_path / "enroot"
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
[ "$1" = list ] && printf 'pyxis_7_slurm-vllm-7-0\npyxis_slurm-vllm-8-0\n'
exit 0
""")
    fake.chmod(0o755)
    argv = runtime("pyxis", job_id="7").remove(("", "-preflight"))
    assert argv is not None
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    assert subprocess.run(argv, env=env).returncode == 0
    assert calls.read_text().splitlines() == ["list", "remove -f pyxis_7_slurm-vllm-7-0"]
