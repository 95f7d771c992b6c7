"""Ranks above 0: wait for the head, take this node's part (its launcher's), stay until the head is done."""

from __future__ import annotations

from pathlib import Path

from slurm_vllm.core.records import HeadInfo, Rendezvous
from slurm_vllm.node.netid import identity
from slurm_vllm.node.rank import POLL, Rank
from slurm_vllm.node.rankenv import Stopped


class Worker(Rank):
    """A worker node: the head's address first (preflight's rendezvous or head.json), then its part."""

    def run(self) -> None:
        first = self.jd.preflight_addr if self.wants_preflight else self.jd.head
        self.wait_for(f"the head ({first.name})", lambda: self.published(first), self.plan.ready_timeout)
        head_ip = (Rendezvous.read(first).ip if first == self.jd.preflight_addr else HeadInfo.read(first).ip)
        ident = identity(self.job.head_host, self.spec.network.interface, head_ip=head_ip)
        ports = self.setup(ident)
        if ports is None:
            return
        self.launcher.worker_up(self, ident, ports)
        head = HeadInfo.read(self.jd.head)
        if self.peers is not None and head.heartbeat_port:
            self.peers.add("head", f"{self.job.head_host} (the head)", head.ip, head.heartbeat_port)
        while not self.jd.done.exists():
            self.check()
            self.check_peers()
            self.stop.wait(POLL)

    def published(self, path: Path) -> bool:
        """PATH is there; Stopped when the head ended meanwhile."""
        if self.jd.done.exists() or self.jd.read_stage().stage.final:
            raise Stopped("the head ended")
        return path.exists()
