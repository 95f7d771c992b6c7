"""Helpers and environment builders for slurm_vllm's tests (not shipped)."""
