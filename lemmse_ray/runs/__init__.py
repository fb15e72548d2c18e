"""A run of the ``lemmse`` command: its configuration, the pipeline steps (bank, estimate, report), network
training and evaluation.
"""
