"""Secrets are never written: :func:`public` is applied to every dictionary that is persisted or logged.

``storage_options`` (fsspec credentials, endpoints) are dropped wherever they appear; the value of any key that
looks like a credential (``key``, ``secret``, ``token``, ``password``, ``credential``, ``session``, ``auth``…,
any case, anywhere in the name) is replaced by ``"<redacted>"``; a ``user:password@`` part of a URL string is
replaced likewise.  False positives only hide a harmless value.

The one exception are this project's own work keys, ``bank_key``, ``estimate_key`` and ``network_key`` (the
columns of a study's tables that name its work items, read back to find them): their values are short
identifiers that the engine computes (16 hex digits of a SHA-256, or ``planted``), so a value of that form
under those names is kept, and any other is redacted as usual.

Every record this project writes goes through here: Zarr attributes (banks, estimates), and the JSON,
Parquet and text files written by :func:`lemmse_ray.storage.files.save_json`, ``save_parquet`` and
``save_text`` (``study.json``, ``work.json``, ``history.json``, ``timings.json``, the tables, ``report.md``).
"""
from __future__ import annotations

import functools
import re
from typing import Any

REDACTED = "<redacted>"
DROPPED = frozenset({"storage_options"})
CREDENTIAL = re.compile(r"key|secret|token|passw|pwd|credential|session|auth|cookie|signature|private", re.I)
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
WORK_KEYS = frozenset({"bank_key", "estimate_key", "network_key"})
WORK_KEY_VALUE = re.compile(r"[0-9a-z]{1,16}")


@functools.lru_cache(maxsize=4096)
def _credential(name: str) -> bool:
    return CREDENTIAL.search(name) is not None


def _item(key: Any, value: Any) -> Any:
    if key in WORK_KEYS and (value is None or isinstance(value, str) and WORK_KEY_VALUE.fullmatch(value)):
        return value
    return REDACTED if _credential(str(key)) else public(value)


def public(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists, tuples, strings, scalars) without secrets."""
    if isinstance(value, dict):
        return {key: _item(key, item) for key, item in value.items() if key not in DROPPED}
    if isinstance(value, (list, tuple)):
        return [public(item) for item in value]
    if isinstance(value, str):
        return USERINFO.sub(REDACTED + "@", value)
    return value
