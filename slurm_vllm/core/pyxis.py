"""Pyxis/enroot: the srun step lines that run a rank's programs in a container, and their cleanup.

Pyxis attaches a container to an `srun` step, not to a process, so a rank (which runs on the host,
as for every runtime) starts each of its container programs as a step of its own job on its own
node: `srun --overlap --jobid=J --nodelist=<this node> --container-image=… CMD`. The rank's first
program creates the rank's named container (`<name>:no_exec`: a new one, or the filesystem a
requeued run left); the programs beside it join it (`<name>:exec`, as `docker exec` does). Pyxis
names it `pyxis_<name>` (container_scope=global, its default) or `pyxis_<job id>_<name>`
(container_scope=job); the rank removes both with enroot at its end, since a named container
outlives its steps. An image that is not a squashfs file is imported once per job by rank 0 into
the job folder (image.sqsh) and every rank starts from that file: N nodes do not pull it at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slurm_vllm.core.spec import ContainerSpec

IMPORTED = "image.sqsh"        # in the job folder: a registry image, imported once by rank 0

# Options of srun (and Pyxis) that slurm_vllm sets on every step: refused in container.options.
MANAGED = frozenset({
    "--container-image", "--container-name", "--container-mounts", "--container-env",
    "--container-mount-home", "--no-container-mount-home", "--container-entrypoint",
    "--no-container-entrypoint", "--container-save", "--container-unshare", "--jobid", "--overlap",
    "--nodes", "-N", "--ntasks", "-n", "--nodelist", "-w", "--export", "--job-name", "-J",
    "--cpus-per-task", "-c", "--gres", "--gpus", "-G", "--gpus-per-node", "--gpus-per-task",
    "--output", "-o", "--error", "-e", "--input", "-i", "--unbuffered", "-u",
})


def managed(option: str) -> bool:
    """Is OPTION (one item of container.options) one that slurm_vllm sets on every step?"""
    return option.split("=", 1)[0] in MANAGED or re.fullmatch(r"-[NnwoeiuJcG]\S*", option) is not None


def is_file(image: str) -> bool:
    """Is IMAGE a squashfs file (as Pyxis tells: a path) rather than a registry reference?"""
    return image.startswith(("/", "./", "../", "~"))


def enroot_uri(image: str) -> str:
    """IMAGE as `enroot import` takes it: a docker:// URI unless it names its scheme already."""
    return image if "://" in image else f"docker://{image}"


def import_argv(image: str, output: str) -> list[str]:
    """The command that imports registry IMAGE into the squashfs file OUTPUT (rank 0, once a job)."""
    return ["enroot", "import", "--output", output, enroot_uri(image)]


def step_argv(c: ContainerSpec, image: str, name: str, mounts: Sequence[str], argv: Sequence[str],
              *, job_id: str, host: str, cpus: str, gpus: int, join: bool) -> list[str]:
    """The srun line that runs ARGV in container NAME on HOST, a step of job JOB_ID with the job's
    CPUS and GPUS there (--overlap: shared with the rank's own step): a new container from IMAGE
    with MOUNTS (host:container[:ro]), or, JOIN, inside the running one."""
    cmd = ["srun", "--overlap", f"--jobid={job_id}", "--nodes=1", "--ntasks=1", f"--nodelist={host}",
           f"--cpus-per-task={cpus}", *([f"--gres=gpu:{gpus}"] if gpus else []), "--export=ALL",
           "--unbuffered", f"--job-name={name}"]
    if join:
        cmd.append(f"--container-name={name}:exec")
    else:
        cmd += [f"--container-image={image}", f"--container-name={name}:no_exec",
                "--no-container-mount-home", "--no-container-entrypoint"]
        if mounts:
            cmd.append(f"--container-mounts={','.join(mounts)}")
        cmd += c.options
    return [*cmd, *argv]


def enroot_names(name: str, job_id: str) -> list[str]:
    """What enroot calls container NAME: under Pyxis's container_scope global, then job."""
    return [f"pyxis_{name}", f"pyxis_{job_id}_{name}"]


# Removes each named enroot container that exists (`enroot remove` of a missing one fails).
REMOVE = ('have=$(enroot list) || exit 1; '
          'for n; do case " $(echo $have) " in *" $n "*) enroot remove -f "$n";; esac; done')


def remove_argv(name: str, job_id: str) -> list[str]:
    """The command that removes container NAME's filesystem from this node, whatever the scope."""
    return ["sh", "-c", REMOVE, "slurm-vllm-remove", *enroot_names(name, job_id)]


def shown_steps(c: ContainerSpec, binds: Sequence[str], job_dir: str, wrapper: Sequence[str],
                gpus: int) -> list[str]:
    """How a Pyxis job runs its programs, for `render` (comment lines; <…> are filled in at run time).
    WRAPPER is the env-file wrapper every program starts through; JOB_DIR the job folder."""
    name = "slurm-vllm-<job id>-<rank>"
    image = c.image or ""
    lines = []
    if not is_file(image):
        image = f"{job_dir}/{IMPORTED}"
        lines += ["rank 0 first imports the image once for all nodes:",
                  " ".join(import_argv(c.image or "", image + ".part"))]
    program = [*wrapper, f"{job_dir}/env/rank-<rank>.env", "<program>"]
    mounts = [*binds, f"{job_dir}:{job_dir}"]
    lines += ["each node's task starts its first program (Ray, or vLLM) as a step on its own node:",
              " ".join(step_argv(c, image, name, mounts, program, job_id="<job id>", host="<node>",
                                        cpus="<the job's CPUs on the node>", gpus=gpus, join=False)),
              "and the programs beside it (rank 0: vLLM on Ray) join that container:",
              " ".join(step_argv(c, image, name, mounts, program, job_id="<job id>", host="<node>",
                                        cpus="<the job's CPUs on the node>", gpus=gpus, join=True))]
    return lines
