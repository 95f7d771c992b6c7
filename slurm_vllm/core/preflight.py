"""Cross-node preflight: an all-reduce across the allocation's nodes, its bandwidth and NCCL's transport.

Each rank runs SCRIPT with the container's Python before Ray and vLLM start: torch.distributed
forms one process group over the nodes (NCCL when the container sees a GPU, else gloo), all-reduces
a few sizes, checks the sums, and rank 0 writes the timings. The transport NCCL chose is read from
its `NCCL_DEBUG=INFO` lines; InfiniBand requested (nccl.ib_hca) but sockets used is a failure:
that is the silent 4-5x slowdown users otherwise find in production.

`preflight --ray` instead brings up the job's Ray cluster alone (ranks.py, plan mode "ray");
ray_report reads what it found from the job folder.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from slurm_vllm import scripts
from slurm_vllm.core.errors import ClusterError
from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.records import Malformed, PreflightResult, RayNodes, Stage

SIZES = (1 << 16, 1 << 20, 1 << 24)        # bytes per all-reduce: 64 KiB, 1 MiB, 16 MiB

SCRIPT = scripts.text("allreduce")       # runs in each rank's container: scripts/allreduce.py


def transport(log_text: str) -> str | None:
    """The network NCCL chose, from NCCL_DEBUG=INFO lines: 'IB', 'Socket', … or None if not said.

    `NCCL INFO Using network IB` is decisive; else the channels' `via NET/IB/0/GDRDMA`. Lines like
    `NET/IB : No device found.` or `NET/Socket : Using [0]eth0` (bootstrap) decide nothing alone.
    """
    chosen: list[str] = re.findall(r"NCCL INFO Using network (\w+)", log_text)
    if chosen:
        return chosen[-1]
    via: list[str] = re.findall(r"via NET/(\w+)", log_text)
    return via[-1] if via else None


def verdict(raw: dict[str, Any], nccl_log: str, ib_requested: bool) -> PreflightResult:
    """The typed result of the script's RAW output, with the transport; ClusterError when the run
    proves a problem (wrong sums, or InfiniBand asked for and not used)."""
    try:
        result = PreflightResult.from_dict({k: raw[k] for k in ("backend", "world_size", "rows")})
    except (KeyError, Malformed) as exc:
        raise ClusterError(f"preflight: the all-reduce script wrote an unreadable result: {exc}") from None
    wrong = [r.bytes for r in result.rows if not r.correct]
    if wrong:
        raise ClusterError(f"preflight: all-reduce gave wrong sums for sizes {wrong} bytes")
    if result.backend == "nccl":
        used = transport(nccl_log)
        shown = f"NET/{used}" if used else "unknown (set nccl.debug: INFO to see it)"
        result = replace(result, transport=shown)
        if ib_requested and used != "IB":
            raise ClusterError(
                f"preflight: nccl.ib_hca asks for InfiniBand but NCCL used {result.transport}: the "
                f"container lacks /dev/infiniband or the HCA name is wrong (see NCCL INFO lines in logs/)")
        return result
    return replace(result, transport="gloo over TCP (no GPU visible: NCCL not tested)")


def table(result: PreflightResult) -> str:
    lines = [f"all-reduce across {result.world_size} nodes, backend {result.backend}, "
             f"transport {result.transport}",
             f"{'size':>10} {'time ms':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}  ok"]
    for r in result.rows:
        size = f"{r.bytes // 1024} KiB" if r.bytes < 1 << 20 else f"{r.bytes >> 20} MiB"
        lines.append(f"{size:>10} {r.ms:>10.3f} {r.algbw_GBps:>11.3f} {r.busbw_GBps:>11.3f}"
                     f"  {'yes' if r.correct else 'NO'}")
    return "\n".join(lines)


def ray_report(jd: JobDir, job_id: str | None) -> dict[str, Any]:
    """What `preflight --ray` found: Ray's nodes, and when the head and the last node were up, in
    seconds after the job started (stage.log)."""
    nodes = RayNodes.read(jd.ray_nodes).nodes
    times = jd.stage_times()
    start = times.get(Stage.STARTING)

    def after(stage: Stage) -> float | None:
        return round(times[stage] - start, 2) if start is not None and stage in times else None

    return {"job_id": job_id, "nodes": [{"ip": n.ip, "gpus": n.gpus} for n in nodes],
            "ray_head_s": after(Stage.RAY_HEAD), "all_joined_s": after(Stage.RAY_JOINED)}


def ray_table(report: dict[str, Any]) -> str:
    nodes = report["nodes"]
    lines = [f"Ray cluster of {len(nodes)} nodes: head up {report['ray_head_s']} s, all joined "
             f"{report['all_joined_s']} s after the job started", f"{'node ip':>16}  gpus"]
    lines += [f"{n['ip']:>16}  {n['gpus']:g}" for n in nodes]
    return "\n".join(lines)
