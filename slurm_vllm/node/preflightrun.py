"""The preflight on the nodes: the cross-node all-reduce before Ray and vLLM, in every rank's container."""

from __future__ import annotations

import json
import socket
import time
from typing import TYPE_CHECKING

from slurm_vllm.core import preflight as preflight_mod
from slurm_vllm.core import proc
from slurm_vllm.core.errors import ClusterError
from slurm_vllm.core.plan import Ports
from slurm_vllm.core.records import Rendezvous, Stage
from slurm_vllm.node.netid import Identity
from slurm_vllm.node.rankenv import Stopped

if TYPE_CHECKING:
    from slurm_vllm.node.rank import Rank

POLL = 0.5


def run_preflight(rank: Rank, ident: Identity, ports: Ports) -> None:
    """Every rank: the cross-node all-reduce (core/preflight.py, scripts/allreduce.py) in RANK's
    container; rank 0 writes the result (or the job fails with what went wrong)."""
    if rank.rank == 0:
        rank.jd.write(rank.jd.preflight_addr, Rendezvous(ident.ip, ports.client))
        rank.jd.write_stage(Stage.PREFLIGHT, f"all-reduce across {rank.plan.replica_nodes} nodes")
    addr = Rendezvous.read(rank.jd.preflight_addr)
    out = rank.jd.own / "preflight-raw.json"
    argv = ["python3", "-c", preflight_mod.SCRIPT, str(rank.rank), str(rank.plan.replica_nodes), addr.ip,
            str(addr.port), str(out), ",".join(map(str, preflight_mod.SIZES))]
    log_path = rank.jd.rank_log("preflight", rank.rank)
    child = proc.spawn("preflight", rank.runtime.start(argv, suffix="-preflight"), log_path,
                       env=rank.child_env())
    rank.watchdog.watch(child.popen.pid)
    deadline = time.monotonic() + 300
    try:
        while child.alive():
            if rank.stop.is_set():
                raise Stopped(rank.stop_reason or "stopped")
            if time.monotonic() > deadline:
                raise ClusterError("preflight: no result within 300 s: a hang at process-group init "
                                   "(check network.interface and that the nodes reach each other)")
            rank.stop.wait(POLL)
    finally:
        child.terminate(timeout=5)
    if child.returncode():
        raise ClusterError(f"preflight failed on {socket.gethostname()} (exit {child.returncode()}): "
                           f"{child.tail(6)}")
    if rank.rank == 0:
        result = preflight_mod.verdict(json.loads(out.read_text()), log_path.read_text(errors="replace"),
                                       ib_requested=rank.spec.nccl.ib_hca is not None)
        rank.jd.write(rank.jd.preflight, result)
        rank.jd.write_stage(Stage.PREFLIGHT, f"ok: {result.transport}, "
                                             f"{result.rows[-1].busbw_GBps:.2f} GB/s bus bandwidth")
