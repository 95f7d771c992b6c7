"""`python -m slurm_vllm.node init|run JOB_DIR`: the per-rank program (entry.py), from the job script."""

import sys

from slurm_vllm.node.entry import _cli

sys.exit(_cli(sys.argv[1:]))
