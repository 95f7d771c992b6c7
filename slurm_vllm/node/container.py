"""Container runtimes (apptainer, docker, podman, pyxis, none) × argv × binds × env file → argv.

The job's environment (secrets included) reaches a container through its 0600 env file, never
through the command line or the container's configuration: every container program starts a small
wrapper, `sh -c WRAPPER`, that exports the file (bound with the job folder) and execs the program,
so `docker inspect` / `podman inspect` show no value. The file is POSIX shell assignments
(KEY='value'), read by POSIX sh: every value arrives as written. Not --env-file: Docker's is literal
but Podman's has its own quoting, and Apptainer's expands $VAR and runs `cmd` even inside single
quotes (checked with Apptainer 1.4.5). Pyxis runs the same wrapper in an srun step (core/pyxis.py):
the file's values are set after the image's environment, so they win over it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from slurm_vllm.core import pyxis
from slurm_vllm.core.spec import ContainerSpec


@dataclass(frozen=True)
class Runtime:
    """How to start a program where Ray and vLLM live, for one rank of one job."""

    spec: ContainerSpec
    name: str                 # container name: unique per job and rank, so cleanup can find it
    env_file: Path            # 0600 file with the job's environment and secrets
    binds: tuple[str, ...]    # host:container[:ro], the job folder included
    visible_gpus: tuple[str, ...] = ()
    infiniband: bool = False  # Apptainer passes /dev through; Docker/Podman need the devices
    image: str = ""           # pyxis: the squashfs file (the spec's, or the one imported for the job)
    job_id: str = ""          # pyxis: the job whose steps the containers run in
    host: str = ""            # pyxis: this node (each step runs here)
    cpus: int = 1             # pyxis: the job's CPUs on this node (each step shares them)

    @property
    def kind(self) -> str:
        return self.spec.runtime

    def start(self, argv: list[str], suffix: str = "", env_file: Path | None = None) -> list[str]:
        """The argv that starts ARGV as the rank's main program (a new container for docker/podman,
        named NAME+SUFFIX), with ENV_FILE instead of the rank's env file if given."""
        c = self.spec
        if c.runtime == "none":
            return argv
        if c.runtime == "apptainer":
            return self._apptainer(argv, env_file)
        if c.runtime == "pyxis":      # one container per rank: a preflight's filesystem is reused
            return self._pyxis(argv, env_file, join=False)
        assert c.image is not None
        # Host network and IPC: Ray and vLLM use the node's address and its whole /dev/shm.
        cmd = [c.runtime, "run", "--rm", "--name", self.name + suffix, "--network", "host", "--ipc", "host",
               "--init"]
        for bind in self.binds:
            cmd += ["-v", bind]
        cmd += self._gpu_flags()
        if self.infiniband:       # RDMA inside the container, else NCCL silently falls back to TCP
            cmd += ["--device", "/dev/infiniband", "--ulimit", "memlock=-1", "--cap-add", "IPC_LOCK"]
        return [*cmd, *c.options, c.image, *wrapped(env_file or self.env_file, argv)]

    def exec(self, argv: list[str], env_file: Path | None = None) -> list[str]:
        """The argv that runs ARGV beside the main program (same container, same network, same /tmp),
        with ENV_FILE instead of the rank's env file if given."""
        if self.spec.runtime == "none":
            return argv
        if self.spec.runtime == "apptainer":
            return self._apptainer(argv, env_file)
        if self.spec.runtime == "pyxis":
            return self._pyxis(argv, env_file, join=True)
        return [self.spec.runtime, "exec", self.name, *wrapped(env_file or self.env_file, argv)]

    def remove(self, suffixes: tuple[str, ...] = ("",)) -> list[str] | None:
        """The argv that removes the rank's containers (and everything in them), if there are any."""
        names = [self.name + s for s in suffixes]
        # By now the rank's programs had their SIGTERM and grace (teardown): what is left is killed
        # at once, as `docker rm --force` does. Podman's default, and a --time above 0, first waits
        # for a container's main program; a headless vLLM (backend mp) outlived 5 s of it.
        if self.spec.runtime == "podman":
            return ["podman", "rm", "--force", "--ignore", "--time", "0", *names]
        if self.spec.runtime == "docker":
            return ["docker", "rm", "--force", *names]
        if self.spec.runtime == "pyxis":      # a named container outlives its steps
            return pyxis.remove_argv(self.name, self.job_id)
        return None

    def _gpu_flags(self) -> list[str]:
        if not (self.spec.gpus and self.visible_gpus):
            return []
        if self.spec.runtime == "docker":
            return ["--gpus", f'"device={",".join(self.visible_gpus)}"']
        return [f"--device=nvidia.com/gpu={g}" for g in self.visible_gpus]

    def _pyxis(self, argv: list[str], env_file: Path | None, join: bool) -> list[str]:
        return pyxis.step_argv(self.spec, self.image, self.name, self.binds,
                               wrapped(env_file or self.env_file, argv), job_id=self.job_id,
                               host=self.host, cpus=str(self.cpus), gpus=len(self.visible_gpus), join=join)

    def _apptainer(self, argv: list[str], env_file: Path | None = None) -> list[str]:
        assert self.spec.image is not None
        cmd = ["apptainer", "exec"]
        if self.spec.gpus and self.visible_gpus:
            cmd.append("--nv")
        for bind in self.binds:
            cmd += ["--bind", bind]
        return [*cmd, *self.spec.options, self.spec.image, *wrapped(env_file or self.env_file, argv)]


# Exports the env file ($1) and runs the rest: the entry of every Docker/Podman container and exec.
WRAPPER = 'set -a && . "$1" && set +a && shift && exec "$@"'


def wrapped(env_file: Path, argv: list[str]) -> list[str]:
    """ARGV started through WRAPPER with ENV_FILE's variables (the values stay out of argv)."""
    return ["sh", "-c", WRAPPER, "slurm-vllm-env", str(env_file), *argv]


def env_file_text(env: dict[str, str]) -> str:
    """KEY='value' lines (shlex-quoted: quotes, $, \\, #, = and spaces are literal), as POSIX sh's
    `.` in WRAPPER reads them."""
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items())
