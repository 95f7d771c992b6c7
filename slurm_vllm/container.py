"""Container runtimes (apptainer, docker, podman, none) × argv × binds × env file → argv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .spec import ContainerSpec


@dataclass(frozen=True)
class Runtime:
    """How to start a program where Ray and vLLM live, for one rank of one job."""

    spec: ContainerSpec
    name: str                 # container name: unique per job and rank, so cleanup can find it
    env_file: Path            # 0600 file with the job's environment and secrets
    binds: tuple[str, ...]    # host:container[:ro], the job folder included
    visible_gpus: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.spec.runtime

    def start(self, argv: list[str]) -> list[str]:
        """The argv that starts ARGV as the rank's main program (a new container for docker/podman)."""
        c = self.spec
        if c.runtime == "none":
            return argv
        if c.runtime == "apptainer":
            return self._apptainer(argv)
        assert c.image is not None
        cmd = [c.runtime, "run", "--rm", "--name", self.name, "--network", "host", "--ipc", "host",
               "--init", f"--shm-size={c.shm_size}", "--env-file", str(self.env_file)]
        for bind in self.binds:
            cmd += ["-v", bind]
        cmd += self._gpu_flags()
        return [*cmd, *c.options, c.image, *argv]

    def exec(self, argv: list[str]) -> list[str]:
        """The argv that runs ARGV beside the main program (same container, same network, same /tmp)."""
        if self.spec.runtime == "none":
            return argv
        if self.spec.runtime == "apptainer":
            return self._apptainer(argv)
        return [self.spec.runtime, "exec", "--env-file", str(self.env_file), self.name, *argv]

    def remove(self) -> list[str] | None:
        """The argv that removes the rank's container (and everything in it), if there is one."""
        if self.spec.runtime in ("docker", "podman"):
            return [self.spec.runtime, "rm", "--force", "--time", "5", self.name] \
                if self.spec.runtime == "podman" else [self.spec.runtime, "rm", "--force", self.name]
        return None

    def _gpu_flags(self) -> list[str]:
        if not (self.spec.gpus and self.visible_gpus):
            return []
        if self.spec.runtime == "docker":
            return ["--gpus", f'"device={",".join(self.visible_gpus)}"']
        return [f"--device=nvidia.com/gpu={g}" for g in self.visible_gpus]

    def _apptainer(self, argv: list[str]) -> list[str]:
        assert self.spec.image is not None
        cmd = ["apptainer", "exec", "--env-file", str(self.env_file)]
        if self.spec.gpus and self.visible_gpus:
            cmd.append("--nv")
        for bind in self.binds:
            cmd += ["--bind", bind]
        return [*cmd, *self.spec.options, self.spec.image, *argv]


def env_file_text(env: dict[str, str]) -> str:
    """KEY=VALUE lines as docker/podman/apptainer --env-file read them (one value per line, no quoting)."""
    lines = []
    for key, value in env.items():
        if "\n" in value:
            raise ValueError(f"environment variable {key}: a value may not contain a newline")
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"
