"""slurm_vllm: serve a large language model with vLLM across several nodes of a Slurm cluster."""

__version__ = "0.1.0"
