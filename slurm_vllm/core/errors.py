"""The one exception root of slurm_vllm and its subclasses, each mapped to an exit code by the CLI."""

from __future__ import annotations


class SlurmVllmError(Exception):
    """Base of every error slurm_vllm raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class SpecError(SlurmVllmError):
    """The job spec (YAML) is invalid: the message names the key path and what is allowed."""

    exit_code = 2


class PlanError(SlurmVllmError):
    """The spec is well formed but cannot be turned into a runnable plan (e.g. TP x PP)."""

    exit_code = 2


class UsageError(SlurmVllmError):
    """A command-line argument is wrong (a file that cannot be written, a missing folder)."""

    exit_code = 2


class SubmitError(SlurmVllmError):
    """Slurm refused or failed the submission."""


class ClusterError(SlurmVllmError):
    """Ray or the allocation did not come up (a rank died, a barrier timed out)."""


class ServeError(SlurmVllmError):
    """vLLM did not become ready or failed while serving."""


class JobFolderError(SlurmVllmError):
    """A file of the job folder is missing, unreadable, malformed or not slurm_vllm's."""


class WaitTimeout(SlurmVllmError):
    """A wait ran out of time; the job itself goes on."""
