"""The package's version, recorded in the metadata of every output (the one definition: ``pyproject.toml`` and
``lemmse_ray.__version__`` read it)."""

__version__ = "0.1.0"
