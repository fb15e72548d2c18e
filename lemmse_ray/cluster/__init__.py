"""Ray: the session and devices, bank-building tasks, shard actors, the batch driver over shared actors, and
the cost plan of an estimation.
"""
