"""vLLM's CPU platform, made usable by the Ray executor: one worker per Ray "GPU" resource."""

from vllm.platforms.cpu import CpuPlatform


class CpuRayPlatform(CpuPlatform):
    """CpuPlatform whose Ray placement asks for the "GPU" resource the test-bed nodes advertise."""

    ray_device_key = "GPU"
