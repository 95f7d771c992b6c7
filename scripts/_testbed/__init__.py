"""The slurm_vllm test bed: a real multi-node Slurm cluster on one host (see scripts/testbed)."""
