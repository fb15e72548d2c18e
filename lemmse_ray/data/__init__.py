"""Datasets: the readers of image file formats (:mod:`.formats`) and, built on them, the embedded and public
datasets, their subsets and query images (:mod:`.loaders`).
"""
