"""slurm_vllm: serve a large language model with vLLM across several nodes of a Slurm cluster.

The Python API (slurm_vllm.api) is also here: `slurm_vllm.submit(spec) -> Job`, `slurm_vllm.job(id)`,
`slurm_vllm.jobs()`, `slurm_vllm.Stage`. They load on first use, so that `python -m slurm_vllm`
and the node program stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from slurm_vllm.core.records import Endpoint, Stage
    from slurm_vllm.login.api import Job, Status, job, jobs, submit

__all__ = ["Endpoint", "Job", "Stage", "Status", "__version__", "job", "jobs", "submit"]


def __getattr__(name: str) -> Any:
    if name in ("Job", "Status", "job", "jobs", "submit"):
        from slurm_vllm.login import api

        return getattr(api, name)
    if name in ("Endpoint", "Stage"):
        from slurm_vllm.core import records

        return getattr(records, name)
    raise AttributeError(f"module 'slurm_vllm' has no attribute {name!r}")
