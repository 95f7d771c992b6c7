"""`python -m slurm_vllm`: the command line (see cli.py)."""

import sys

from slurm_vllm.login.cli import main

sys.exit(main())
