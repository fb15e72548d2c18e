"""What is written to disk or object storage: path ownership, redaction of secrets, the Zarr bank store, the
estimate output groups (one writer, one reader), atomic result files and the capped readers of input files.
"""
