"""Python run in the job's containers (slurm_vllm may not be installed there): checked files, sent as text."""

from __future__ import annotations

from pathlib import Path


def text(name: str) -> str:
    """The source of the script NAME (ray_watch, allreduce), to run as `python3 -c TEXT args…`."""
    return (Path(__file__).parent / f"{name}.py").read_text()
