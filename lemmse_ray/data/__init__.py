"""Datasets: loaders of the embedded and public datasets, and the readers of their file formats.
"""
