"""The compute nodes' side: the per-rank program, Ray/vLLM launch, containers, probes, supervision.

`python -m slurm_vllm.node init|run JOB_DIR` is its entry (entry.py). It never imports login code.
"""
