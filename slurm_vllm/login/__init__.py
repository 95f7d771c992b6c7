"""The login node's side: the Python API, the CLI, listings, submission through submitit.

It never imports node code (Ray, vLLM, containers): tests/test_layout.py keeps it so.
"""
