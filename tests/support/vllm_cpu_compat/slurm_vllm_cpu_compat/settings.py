"""vLLM's CPU settings for the test virtualenv, set as defaults at every start of its Python.

Loaded by slurm_vllm_cpu_compat.pth from site-packages, so that any process of this virtualenv —
`vllm serve`, `ray start` and the Ray workers it spawns, on a test-bed node or inside a container —
gets the same settings and a job that uses the virtualenv needs nothing else. A variable already
set in the environment wins. Keep this import-light: it runs before every program.
"""

import os
import sys

_CACHE = os.path.join(os.path.dirname(sys.prefix), "compile-cache")

DEFAULTS = {
    # No hub here: models are local folders.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # KV cache per worker in GiB (vLLM's CPU default takes far more of a 24 GiB test machine).
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Test-bed nodes are namespaces of one host and share its cores: do not pin OpenMP threads
    # (the default, "auto", pins each rank to a NUMA node and asserts when several ranks share one).
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # torch.compile / inductor caches next to the virtualenv: later runs skip recompiling.
    "VLLM_CACHE_ROOT": os.path.join(_CACHE, "vllm"),
    "TORCHINDUCTOR_CACHE_DIR": os.path.join(_CACHE, "inductor"),
    # No telemetry from a machine without internet.
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}

for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)
