"""Which paths this project may write: only its own groups, a missing path or an empty folder.

Every group the project creates carries the attribute ``lemmse_ray`` = its kind (``"bank"`` or ``"estimate"``),
written in the same write that creates the group, before anything else; the group's full attributes are
written last.  So a group with the marker but without its attributes is an interrupted creation of ours,
and anything else (a user's files, another program's Zarr group, a group of the other kind) is never deleted
or overwritten, ``overwrite=True`` included: the refusal is a ``ValueError`` naming the path and what was
found there.  Groups written before the marker existed are recognised by their attributes.

A group is reopened, created or replaced under its creation lock (:mod:`lemmse_ray.storage.locks`), so two
processes never create one group at once on a local path.  A group of ours that is *half-made* — its
attributes never written (a creation killed half-way), or some array it was created with missing (two
creations raced: on an object store, or by an earlier version without the lock) — holds nothing finished:
:func:`whole_group` logs it and treats it as missing, so that it is rebuilt, never read into a ``KeyError``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import fsspec
import zarr

from .locks import wait_for_writers

log = logging.getLogger("lemmse_ray")

MARKER = "lemmse_ray"
# The attributes a finished creation writes (last); groups written before the marker are recognised by them.
LEGACY = {"bank": ("format_version", "plan_hash"), "estimate": ("config", "n_batches")}
ARRAYS = "arrays"  # attribute: the arrays a group was created with (recorded where they depend on the request)
NAMES = {"bank": "a lemmse_ray bank", "estimate": "a lemmse_ray estimate output"}


def _options(url: str, storage_options: dict | None) -> dict:
    return storage_options if storage_options and "://" in url else {}


def open_group(url: str, mode: str, storage_options: dict | None = None, **kwargs) -> zarr.Group:
    """Open a Zarr group by local path or fsspec URL."""
    options = _options(url, storage_options)
    return zarr.open_group(url, mode=mode, **({"storage_options": options} if options else {}), **kwargs)


def _entries(url: str, storage_options: dict | None) -> list[str] | None:
    """Names directly under ``url``; None if nothing is there; ValueError if it is a file."""
    fs, path = fsspec.core.url_to_fs(url, **_options(url, storage_options))
    path = path.rstrip("/")
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return None
    if fs.isfile(path):
        raise ValueError(f"{url} is a file, not a folder or a group of this project; it is left untouched")
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def kind_of(group: zarr.Group) -> str | None:
    """``"bank"``, ``"estimate"`` or None (not a group of this project)."""
    attrs = group.attrs
    if attrs.get(MARKER) in NAMES:
        return attrs[MARKER]
    return next((kind for kind, keys in LEGACY.items() if all(k in attrs for k in keys)), None)


def _found(entries: list[str]) -> str:
    shown = ", ".join(repr(e) for e in entries[:5])
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown}{', …' if len(entries) > 5 else ''})"


def owned_group(url: str, kind: str, members: Iterable[str], storage_options: dict | None = None
                ) -> zarr.Group | None:
    """The group of ``kind`` at ``url``, or None where nothing is (a missing path or an empty folder).

    ``members``: the names such a group may hold.  ``ValueError`` naming ``url`` and what is there when it
    holds anything else: files or folders that are not ours, another program's group, a group of another kind,
    or our group with foreign entries among its members (replacing it would delete them).
    """
    entries = _entries(url, storage_options)
    if not entries:
        return None
    try:
        group = open_group(url, "r", storage_options)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError):
        raise ValueError(f"{url} is not {NAMES[kind]}: it holds {_found(entries)}; it is left untouched, "
                         "choose another path (a new or empty folder)") from None
    found = kind_of(group)
    if found is None:
        raise ValueError(f"{url} holds a Zarr group that lemmse_ray did not write ({_found(entries)}); it is left "
                         "untouched, choose another path (a new or empty folder)")
    if found != kind:
        raise ValueError(f"{url} holds {NAMES[found]}, not {NAMES[kind]}; it is left untouched, choose another "
                         "path")
    foreign = [e for e in entries if e != "zarr.json" and e not in set(members)]
    if foreign:
        raise ValueError(f"{url} holds {NAMES[kind]} and files that are not part of it ({_found(foreign)}); "
                         "it is left untouched: move them away or choose another path")
    return group


def half_made(group: zarr.Group, kind: str, required: Iterable[str]) -> str | None:
    """Why our ``group`` of ``kind`` is half-made, or None if it is whole.

    Half-made: the attributes that a creation writes last are missing, or an array it creates is: those the
    group records in its :data:`ARRAYS` attribute, else ``required``."""
    attrs = group.attrs
    if not all(key in attrs for key in LEGACY[kind]):
        return "its creation never finished: no attributes"
    missing = [name for name in attrs.get(ARRAYS, required) if name not in group]
    if missing:
        return f"array{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} missing"
    return None


def whole_group(url: str, kind: str, members: Iterable[str], required: Iterable[str],
                storage_options: dict | None = None) -> zarr.Group | None:
    """:func:`owned_group`, with a half-made group (:func:`half_made`) logged and taken as missing, so that
    the caller rebuilds it.  Call it under the group's creation lock
    (:func:`lemmse_ray.storage.locks.creation_lock`)."""
    group = owned_group(url, kind, members, storage_options)
    why = None if group is None else half_made(group, kind, required)
    if why is None:
        return group
    log.warning("%s is %s, half-made (%s); it holds nothing finished and is rebuilt", url, NAMES[kind], why)
    return None


def create_group(url: str, kind: str, storage_options: dict | None = None) -> zarr.Group:
    """A new, empty group marked as ``kind``, replacing what :func:`owned_group` allowed once no process is
    writing into it.  Call it under the group's creation lock (:mod:`lemmse_ray.storage.locks`)."""
    if _entries(url, storage_options):
        wait_for_writers(url)
    return open_group(url, "w", storage_options, attributes={MARKER: kind})


def _normalized(url: str) -> str:
    if "://" in url:
        protocol, path = url.split("://", 1)
        return f"{protocol}://{path.rstrip('/')}"
    return os.path.realpath(os.path.abspath(url))


def check_apart(out_url: str, bank_url: str) -> None:
    """``ValueError`` when the output ``out_url`` is the bank, inside it, or holds it."""
    out, bank = _normalized(out_url), _normalized(bank_url)
    if out == bank:
        where = "is the bank"
    elif out.startswith(bank + "/"):
        where = "is inside the bank"
    elif bank.startswith(out + "/"):
        where = "contains the bank"
    else:
        return
    raise ValueError(f"out: {out_url} {where} {bank_url}; write the estimate outside the bank")


OUTPUT_MARKER = "lemmse_ray.json"
# What the run commands write directly under an output folder (folders last; the bank's lock file lies beside
# it): a folder holding only these names was written by this project (before the marker file existed).
OUTPUT_ENTRIES = (OUTPUT_MARKER, "report.md", "psnr.parquet", "evaluation.parquet", "summary.parquet",
                  "timings.json", "bank.zarr.lock", "bank.zarr", "estimates", "networks", "figures")


def check_output_folder(url: str, storage_options: dict | None = None) -> None:
    """``ValueError`` unless the output folder ``url`` is missing, empty, or this project's.

    Ours: it holds the marker file :data:`OUTPUT_MARKER` (written by :func:`claim_output_folder`), or only
    names that the run commands write.  Nothing in a folder of someone else's is overwritten.
    """
    entries = _entries(url, storage_options)
    if not entries or OUTPUT_MARKER in entries:
        return
    foreign = [e for e in entries if e not in OUTPUT_ENTRIES]
    if foreign:
        raise ValueError(f"out: {url} is a folder that lemmse_ray did not write (it holds {_found(foreign)}); it "
                         "is left untouched, choose a new or empty folder")


def claim_output_folder(url: str, storage_options: dict | None = None) -> None:
    """:func:`check_output_folder`, then write the marker file that makes the folder this project's."""
    check_output_folder(url, storage_options)
    fs, path = fsspec.core.url_to_fs(url, **_options(url, storage_options))
    marker = f"{path.rstrip('/')}/{OUTPUT_MARKER}"
    if not fs.exists(marker):
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(marker, b'{"written_by": "lemmse_ray"}\n')
