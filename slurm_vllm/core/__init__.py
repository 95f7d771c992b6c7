"""What both sides share: the spec, the plan, the job folder's records and files, rendering, Slurm queries.

Nothing here imports login, node or batch code (tests/test_layout.py keeps it so).
"""
