"""Patch banks in memory: bank rows of training images, query and key features and the scan of rows against
queries, and :class:`~lemmse_ray.bank.memory.PatchBank` with the in-memory :func:`lemmse_ray.estimate`.
"""
