"""Secrets are never written: :func:`public` is applied to every dictionary that is persisted or logged.

``storage_options`` (fsspec credentials, endpoints) are dropped wherever they appear; the value of any key that
looks like a credential (``key``, ``secret``, ``token``, ``password``, ``credential``, ``session``, ``auth``…,
any case, anywhere in the name) is replaced by ``"<redacted>"``; a ``user:password@`` part of a URL string is
replaced likewise.  False positives only hide a harmless value.
"""
from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
DROPPED = frozenset({"storage_options"})
CREDENTIAL = re.compile(r"key|secret|token|passw|pwd|credential|session|auth|cookie|signature|private", re.I)
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def public(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists, tuples, strings, scalars) without secrets."""
    if isinstance(value, dict):
        return {key: REDACTED if CREDENTIAL.search(str(key)) else public(item)
                for key, item in value.items() if key not in DROPPED}
    if isinstance(value, (list, tuple)):
        return [public(item) for item in value]
    if isinstance(value, str):
        return USERINFO.sub(REDACTED + "@", value)
    return value
