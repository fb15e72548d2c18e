"""Input files read with limits: YAML documents, JSON records and Parquet tables, checked before use.

A file a user (or anyone who can write a study folder) hands to this project is checked before anything
is built from it, and every refusal is a ``ValueError`` of one line that names the file:

* **size** -- at most ``max_bytes`` bytes are ever read (a larger file is refused from its size alone);
* **YAML aliases** -- a document is composed into nodes first, where an alias is one shared node, and its
  *expanded* size is counted before any Python object is built: each scalar weighs 1 plus its length,
  each collection 1 plus its members, an alias as much as what it names.  A "billion laughs" document of a
  few hundred bytes expands to 10⁹ scalars; it is refused after a pass over its few distinct nodes, where
  building it and then printing or serialising it would take minutes and gigabytes.  A recursive alias
  (a collection that contains itself) has no finite expansion and is refused too;
* **nesting** -- a document nested more deeply than the parser's recursion allows is refused, not a
  ``RecursionError`` traceback;
* **Parquet tables** -- the footer's metadata (rows, columns, uncompressed bytes, column names) is read and
  checked before any row is decoded, so a small file that would grow to gigabytes in memory is refused.

The limits are far above what this project writes or reads (a spec or configuration of a few kilobytes,
a study of at most :data:`lemmse_ray.studies.spec.MAX_CELLS` cells).
"""
from __future__ import annotations

import io
import json
from typing import Any, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

MAX_YAML_BYTES = 1 << 20  # 1 MiB: specs and configurations are a few kilobytes
MAX_YAML_EXPANDED = 4 << 20  # scalars' characters plus nodes, aliases expanded
MAX_JSON_BYTES = 16 << 20


def read_capped(path: str, what: str, max_bytes: int, storage_options: dict | None = None) -> bytes | None:
    """The bytes of a local path or fsspec URL (None if there is no such file); ``ValueError`` naming
    ``what`` and ``path`` for a file larger than ``max_bytes``.  At most ``max_bytes + 1`` bytes are read
    (an object's size is checked before it is fetched), so a huge file, a device or a pipe costs no more."""
    try:
        if "://" not in path:
            try:
                with open(path, "rb") as stream:
                    data = stream.read(max_bytes + 1)
            except FileNotFoundError:
                return None
            size = len(data)
        else:
            fs, inner = fsspec.core.url_to_fs(path, **(storage_options or {}))
            if not fs.isfile(inner):
                return None
            size = fs.size(inner)
            if size <= max_bytes:
                with fs.open(inner, "rb") as stream:
                    data = stream.read(max_bytes + 1)
                size = len(data)
    except OSError as err:
        raise ValueError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    if size > max_bytes:
        raise ValueError(f"{what}: {path} is larger than the limit of {_bytes(max_bytes)}")
    return data


def _bytes(n: int) -> str:
    return f"{n / (1 << 20):.3g} MiB" if n >= 1 << 20 else f"{n} bytes"


def expanded_size(root: yaml.Node, limit: int) -> int:
    """The expanded size of a composed YAML node (see the module docstring), counting stops past ``limit``.

    Iterative (no recursion on deep documents); each distinct node is sized once and an alias reuses its
    size, so the pass costs the number of distinct nodes, whatever the expansion.  ``ValueError`` on a
    recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes and not children_done:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1 + len(node.value)
            continue
        members = ([item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode)
                   else list(node.value))
        if children_done:
            active.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(m)] for m in members))
            continue
        if key in active:
            raise ValueError("a recursive alias (a collection that contains itself)")
        active.add(key)
        stack.append((node, True))
        for member in members:
            if id(member) in active:
                raise ValueError("a recursive alias (a collection that contains itself)")
            if id(member) not in sizes:
                stack.append((member, False))
    return sizes[id(root)]


def load_yaml(text: str, what: str, max_expanded: int = MAX_YAML_EXPANDED) -> Any:
    """``yaml.safe_load(text)`` with the expansion of aliases and the nesting depth capped; ``ValueError``
    prefixed by ``what`` (e.g. ``"SPEC: my.yaml"`` or ``"--set sigmas"``) when the text is not valid YAML or
    exceeds a cap, before any Python object is built from it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = expanded_size(node, max_expanded)
        except ValueError as err:
            raise ValueError(f"{what} holds {err}; it is refused") from None
        if size > max_expanded:
            raise ValueError(f"{what} expands through YAML aliases (&anchor / *alias) to more than "
                             f"{max_expanded:,} nodes and characters; it is refused (an alias bomb?)")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ValueError(f"{what} is not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be read") from None
    finally:
        loader.dispose()


def read_yaml(path: str, what: str, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The YAML document of a local file (None if empty), read with :func:`read_capped` and
    :func:`load_yaml`; errors start with ``what`` (``"SPEC"``, ``"--config"``) and name ``path``."""
    data = read_capped(path, what, max_bytes)
    if data is None:
        raise ValueError(f"{what}: cannot read {path}: No such file or directory")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {path} is not UTF-8 text (byte {err.start})") from None
    return load_yaml(text, f"{what}: {path}")


def read_json(path: str, what: str, max_bytes: int = MAX_JSON_BYTES, storage_options: dict | None = None) -> Any:
    """The JSON value of a file (None if there is no such file), at most ``max_bytes``; ``ValueError``
    naming ``what`` and ``path`` for a file too large, not JSON, or nested too deeply."""
    data = read_capped(path, what, max_bytes, storage_options)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
        raise ValueError(f"{what}: {path} is not valid JSON ({reason})") from None


def read_table(path: str, what: str, required: Sequence[str] = (), columns: Sequence[str] | None = None, *,
               max_bytes: int, max_rows: int, max_columns: int = 1000, max_decoded_bytes: int = 1 << 30,
               storage_options: dict | None = None) -> pa.Table | None:
    """A Parquet table (None if there is no such file), checked from its footer before any row is decoded.

    ``ValueError`` naming ``what`` and ``path`` when the file is larger than ``max_bytes``, is not Parquet,
    declares more than ``max_rows`` rows, ``max_columns`` columns or ``max_decoded_bytes`` uncompressed
    bytes, or lacks a column of ``required``.  ``columns``: read only these (those present)."""
    data = read_capped(path, what, max_bytes, storage_options)
    if data is None:
        return None
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{what}: {path} is not a Parquet file ({str(err).splitlines()[0]})") from None
    meta = parquet.metadata
    if meta.num_rows > max_rows:
        raise ValueError(f"{what}: {path} has {meta.num_rows:,} rows, more than the limit of {max_rows:,}")
    if meta.num_columns > max_columns:
        raise ValueError(f"{what}: {path} has {meta.num_columns:,} columns, more than the limit of "
                         f"{max_columns:,}")
    decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if decoded > max_decoded_bytes:
        raise ValueError(f"{what}: {path} holds {_bytes(decoded)} uncompressed, more than the limit of "
                         f"{_bytes(max_decoded_bytes)}")
    names = parquet.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{what}: {path} has no column {missing[0]!r} (a table written by 'lemmse study' has it)")
    wanted = None if columns is None else [c for c in dict.fromkeys(columns) if c in names]
    try:
        return parquet.read(columns=wanted)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{what}: {path} cannot be read ({str(err).splitlines()[0]})") from None
