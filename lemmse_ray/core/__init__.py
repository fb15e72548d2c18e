"""The mathematics, bottom layer: problems and their covariances, patch geometry, patch classes, partial
sums and their merge, the statistics, metrics and input validation.  Imports nothing else of the package.
"""
