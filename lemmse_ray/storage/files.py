"""Result files a researcher can open: PNG image grids and Parquet tables.

Every file goes to a local path (written atomically: a temporary file renamed into place, so a reader
never sees half a file) or to an fsspec URL (``s3://…``, where an object appears whole on upload).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


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


def save_png(array: np.ndarray, path: str | os.PathLike, storage_options: dict | None = None) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    write_bytes(str(path), buffer.getvalue(), storage_options)


def save_parquet(rows: list[dict] | pa.Table, path: str | os.PathLike, storage_options: dict | None = None) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(str(path), sink.getvalue().to_pybytes(), storage_options)


def save_text(text: str, path: str | os.PathLike, storage_options: dict | None = None) -> None:
    write_bytes(str(path), text.encode(), storage_options)
