"""Result files a researcher can open: PNG image grids, Parquet tables, JSON records and text reports.

Every file goes to a local path (written atomically: a temporary file renamed into place, so a reader
never sees half a file) or to an fsspec URL (``s3://…``, where an object appears whole on upload).  Every
record goes through :func:`lemmse_ray.storage.redact.public` on its way out: the rows of a table
(:func:`save_parquet`), a JSON value (:func:`save_json`) and a text (:func:`save_text`: URLs lose their
``user:password@``), so that a writer cannot forget it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .redact import public


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it is renamed onto ``path`` (never half-written)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to a local path (atomically) or an fsspec URL."""
    if "://" in path:
        with fsspec.open(path, "wb", **(storage_options or {})) as f:
            f.write(data)
    else:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)


def read_bytes(path: str, storage_options: dict | None = None) -> bytes | None:
    """The content of a local path or fsspec URL, or None if there is no such file."""
    if "://" not in path:
        return Path(path).read_bytes() if Path(path).is_file() else None
    fs, inner = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.cat_file(inner) if fs.isfile(inner) else None


def file_exists(path: str, storage_options: dict | None = None) -> bool:
    """Whether a local path or fsspec URL is a file (nothing is read)."""
    if "://" not in path:
        return Path(path).is_file()
    fs, inner = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.isfile(inner)


def save_png(array: np.ndarray, path: str | os.PathLike, storage_options: dict | None = None) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    write_bytes(str(path), buffer.getvalue(), storage_options)


def save_parquet(rows: list[dict], path: str | os.PathLike, storage_options: dict | None = None) -> None:
    """A Parquet table of ``rows`` (dicts), redacted."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(public(rows)), sink)
    write_bytes(str(path), sink.getvalue().to_pybytes(), storage_options)


def save_json(value: object, path: str | os.PathLike, storage_options: dict | None = None) -> None:
    """An indented JSON record of ``value``, redacted (values JSON cannot hold are written as text)."""
    write_bytes(str(path), json.dumps(public(value), indent=1, default=str).encode(), storage_options)


def save_text(text: str, path: str | os.PathLike, storage_options: dict | None = None) -> None:
    """A text file (a Markdown report), redacted."""
    write_bytes(str(path), public(text).encode(), storage_options)
