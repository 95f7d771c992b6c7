"""Batch mode: reading and checking the OpenAI batch input, the results output, the driver that sends it.

Used on the login node (checks at submit, merge) and on the head node (the driver); imports core only.
"""
