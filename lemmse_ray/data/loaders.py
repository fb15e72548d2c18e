"""Image datasets as ``(N, C, H, W)`` float32 tensors with values in ``[0, 1]``.

Three datasets are embedded (their data ship inside scikit-image / scikit-learn and load offline):

* ``"photos"`` -- non-overlapping RGB tiles cut from scikit-image's bundled colour photographs,
  split by photograph (a CIFAR-10 analogue), in a fixed shuffled order so that any first ``n`` tiles
  span the photographs (:func:`photo_tile_sources` says where each tile comes from);
* ``"faces"`` -- the 100 face crops of ``skimage.data.lfw_subset()`` (25x25 grayscale);
* ``"digits"`` -- scikit-learn's 8x8 handwritten digits.

Four more read standard files from a user folder ``root``: ``"fashion-mnist"`` (IDX files),
``"cifar10"`` (binary or python batches, or their ``.tar.gz`` archive), ``"ffhq32"`` (``.npy``/``.npz``
array or image folder) and ``"folder"`` (any folder of images), each through the readers of
:mod:`lemmse_ray.data.formats`; :func:`download` fetches the official files of the first two.  See
``docs/datasets.md``.

Subsets and queries: :func:`subset_indices` chooses a training subset (the first ``n`` images, or ``n``
drawn without replacement with a seed; random subsets of one seed are nested: the one of size ``n`` is
the prefix of every larger one), :func:`query_indices` the query images of a split (seeded, its own
stream per split).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from ..core.validation import check_choice
from .formats import (
    IMAGE_SUFFIXES,
    MAX_DECOMPRESSED_BYTES,
    fetch_file,
    image_files,
    open_npz,
    parse_cifar_bin,
    parse_cifar_py,
    read_capped,
    read_idx_file,
    read_images,
    resize_center_crop,
    set_channels,
    to_images,
    verify_checksum,
)

__all__ = ["DATASETS", "EMBEDDED", "PHOTO_SPLITS", "SPLITS", "SUBSET_MODES", "download", "load_dataset",
           "photo_tile_sources", "query_indices", "subset_indices", "take_subset"]

DATASETS: tuple[str, ...] = ("photos", "faces", "digits", "fashion-mnist", "cifar10", "ffhq32", "folder")
SPLITS: tuple[str, ...] = ("train", "test")
SUBSET_MODES: tuple[str, ...] = ("first", "random")

EMBEDDED = ("photos", "faces", "digits")
_DEFAULT_SIZE = {"photos": 32, "ffhq32": 32, "folder": 32}

# Photographs of ``skimage.data`` that load offline and whose docstrings state a free licence.
# The split is by photograph, so no test tile shares a photograph with a training tile.
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry"),
    "test": ("coffee", "chelsea"),
}
_PHOTOS_ORDER_SEED = 0  # the fixed shuffle of the photos tiles (see _photo_order)
_N_FACES = 100          # lfw_subset(): the first 100 images are faces, the last 100 are not
_N_FACES_TRAIN = 80
_DIGITS_TRAIN_FRACTION = 0.8
_FFHQ_TRAIN_FRACTION = 6 / 7    # FFHQ convention: images 0..59999 train, 60000..69999 test
_FOLDER_TEST_MODULUS = 5        # a file is a test file when its path hash is 0 modulo this (about 20 %)
_FASHION_PREFIX = {"train": "train", "test": "t10k"}

_CIFAR_DIRS = {"bin": "cifar-10-batches-bin", "py": "cifar-10-batches-py"}
_CIFAR_ARCHIVES = {"bin": "cifar-10-binary.tar.gz", "py": "cifar-10-python.tar.gz"}

_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# URL and MD5 as published by the dataset authors (Fashion-MNIST README; CIFAR-10 web page).
_DOWNLOADS: dict[str, tuple[tuple[str, str], ...]] = {
    "fashion-mnist": (
        (_FASHION_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        (_FASHION_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ),
    "cifar10": (("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),),
}


_Items = TypeVar("_Items", torch.Tensor, np.ndarray, list)


@dataclass(frozen=True)
class _Request:
    """Validated arguments handed to a dataset loader."""

    split: str
    root: Path | None
    size: int | None
    grayscale: bool | None


def load_dataset(name: str, split: str = "train", *, root: str | os.PathLike | None = None,
                 size: int | None = None, grayscale: bool | None = None, n: int | None = None,
                 subset: str = "first", seed: int = 0,
                 select: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Load a dataset split as a float32 ``(N, C, H, W)`` tensor with values in ``[0, 1]``.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        root: folder (or file, for ``cifar10`` archives and ``ffhq32`` arrays) holding the data; required
            by the file datasets, refused by the embedded ones.
        size: output height and width. For ``"photos"`` the tile size (default 32); for ``"ffhq32"`` and
            ``"folder"`` images are resized (shorter side) and centre-cropped to it (default 32); for the
            others ``None`` keeps the native size and a value resizes the same way.
        grayscale: ``None`` keeps the native channels, ``True`` gives one luminance channel
            (0.299 R + 0.587 G + 0.114 B), ``False`` gives three channels (gray is replicated).
            Image folders default to RGB.
        n: keep only ``n`` images (see :func:`take_subset`); ``None`` keeps all.
        subset: ``"first"`` or ``"random"``, how the ``n`` images are chosen.
        seed: seed of the ``"random"`` subset.
        select: given the number of images of the split, the indices of those to keep (instead of ``n``).

    The images are chosen before their channels are converted and they are resized, so that only the kept
    ones are (a few images of a large size never cost the whole split at that size).

    Raises:
        ValueError: naming the offending parameter.
    """
    check_choice(name, DATASETS, "name")
    check_choice(split, SPLITS, "split")
    check_choice(subset, SUBSET_MODES, "subset")
    if n is not None:
        _check_count("n", n)
    _check_count("seed", seed, minimum=0)
    if size is not None and size <= 0:
        raise ValueError(f"size must be a positive integer or None, got {size}")
    if name in EMBEDDED and root is not None:
        raise ValueError(f"root must be None for the embedded dataset {name!r}")
    if name not in EMBEDDED and root is None:
        raise ValueError(f"root is required for dataset {name!r}: the folder holding its files")
    request = _Request(split, None if root is None else Path(root).expanduser(),
                       size if size is not None else _DEFAULT_SIZE.get(name), grayscale)
    if n is not None and select is not None:
        raise ValueError("give n or select, not both")
    images = _LOADERS[name](request)
    if n is not None:
        images = take_subset(images, n, subset, seed)
    elif select is not None:
        images = images[select(len(images))]
    return _finalize(images, request.size, grayscale)


def subset_indices(total: int, n: int, mode: str = "first", seed: int = 0) -> torch.Tensor:
    """Indices (int64, length ``n``) of the images a subset of ``n`` out of ``total`` keeps.

    ``mode="first"``: ``0, 1, ..., n - 1``.  ``mode="random"``: the first ``n`` entries of a uniformly
    random permutation of ``range(total)`` drawn with ``seed``, i.e. ``n`` images without replacement, in
    random order.  For one ``seed`` and ``total`` the subsets are **nested**: the subset of size ``n`` is
    the prefix of the subset of every size ``n' > n`` (dataset-size studies compare nested subsets).

    Raises:
        ValueError: naming ``total``, ``n``, ``subset mode`` or ``seed``.
    """
    _check_count("total", total, minimum=0)
    check_choice(mode, SUBSET_MODES, "subset mode")
    _check_count("n", n)
    _check_count("seed", seed, minimum=0)
    if n > total:
        raise ValueError(f"n={n} exceeds the {total} images available")
    if mode == "first":
        return torch.arange(n)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def query_indices(total: int, n: int, *, split: str, seed: int = 0) -> torch.Tensor:
    """Indices (int64, length ``n``) of the query images drawn from a split of ``total`` images.

    ``n`` distinct indices, uniformly at random without replacement, in random order, from a generator
    seeded by ``(seed, split)``: train and test queries use independent streams, and neither repeats
    the draw of :func:`subset_indices` with the same seed.  Nested in ``n`` (the queries of size ``n``
    are the prefix of those of size ``n' > n``).  Training queries must be images of the bank: draw them
    from the training subset (``train[query_indices(len(train), n, split="train", seed=s)]``).

    Raises:
        ValueError: naming ``total``, ``n``, ``split`` or ``seed``.
    """
    _check_count("total", total, minimum=0)
    _check_count("n", n)
    check_choice(split, SPLITS, "split")
    _check_count("seed", seed, minimum=0)
    if n > total:
        raise ValueError(f"n={n} exceeds the {total} images of split {split!r}")
    state = np.random.SeedSequence([seed, 1 + SPLITS.index(split)]).generate_state(1, np.uint64)[0]
    return torch.randperm(total, generator=torch.Generator().manual_seed(int(state)))[:n]


def take_subset(images: torch.Tensor, n: int, mode: str = "first", seed: int = 0) -> torch.Tensor:
    """``images[subset_indices(len(images), n, mode, seed)]``: the first ``n``, or ``n`` drawn without
    replacement with ``seed`` (random order; nested in ``n`` for one seed)."""
    return images[subset_indices(len(images), n, mode, seed)]


def photo_tile_sources(split: str, size: int = 32) -> list[tuple[str, int, int]]:
    """Where each tile of ``load_dataset("photos", split, size=size)`` comes from, in the dataset's order:
    ``(photograph, top, left)``, the tile being ``skimage.data.<photograph>()[top:top+size, left:left+size]``.

    The tiles of a split (every non-overlapping tile of its photographs, see :data:`PHOTO_SPLITS`) are
    ordered by a fixed seeded hash of their source, so that a small first subset spans the photographs;
    the order does not depend on library versions.
    """
    check_choice(split, SPLITS, "split")
    _check_count("size", size)
    return list(_photo_tiles(split, size)[1])


def download(name: str, root: str | os.PathLike) -> list[Path]:
    """Download the official files of ``name`` (``"fashion-mnist"`` or ``"cifar10"``) into ``root``.

    Files already present with the published checksum are kept; the result is readable by
    :func:`load_dataset` with the same ``root``.
    """
    check_choice(name, tuple(_DOWNLOADS), "name")
    paths = []
    for url, md5 in _DOWNLOADS[name]:
        dest = Path(root) / url.rsplit("/", 1)[1]
        if not (dest.is_file() and verify_checksum(dest, md5)):
            fetch_file(url, dest, md5)
        paths.append(dest)
    return paths


# --------------------------------------------------------------------------------------------- tensors

def _check_count(param: str, value: object, minimum: int = 1) -> int:
    """Raise ValueError naming ``param`` unless ``value`` is an integer ``>= minimum`` (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{param} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _finalize(images: torch.Tensor, size: int | None, grayscale: bool | None) -> torch.Tensor:
    """Apply the channel choice and the optional resize to a loaded batch."""
    images = set_channels(images, grayscale)
    return images if size is None else resize_center_crop(images, size)


def _split_by_fraction(items: _Items, split: str, fraction: float) -> _Items:
    """First ``floor(fraction * N)`` items for train, the rest for test."""
    cut = int(len(items) * fraction)
    return items[:cut] if split == "train" else items[cut:]


# --------------------------------------------------------------------------------------------- embedded

@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A bundled skimage photograph as a read-only (H, W, 3) uint8 array (cached)."""
    import skimage.data  # heavy: imported by the embedded datasets only

    image = np.asarray(getattr(skimage.data, name)())
    image.setflags(write=False)
    return image


def _tiles(image: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` tiles of an (H, W, C) image, row-major from the top-left."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    grid = image[:rows * size, :cols * size].reshape(rows, size, cols, size, image.shape[2])
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * cols, size, size, image.shape[2])


def _photo_order(sources: list[tuple[str, int, int]]) -> list[int]:
    """A fixed shuffle of tile sources: sorted by the SHA-256 of ``(seed, photograph, top, left)``."""
    def key(index: int) -> bytes:
        name, top, left = sources[index]
        return hashlib.sha256(f"{_PHOTOS_ORDER_SEED}:{name}:{top}:{left}".encode()).digest()

    return sorted(range(len(sources)), key=key)


@lru_cache(maxsize=8)
def _photo_tiles(split: str, size: int) -> tuple[np.ndarray, tuple[tuple[str, int, int], ...]]:
    """Shuffled ``(tiles (N, size, size, 3) uint8, sources)`` of the photographs of ``split``."""
    tiles, sources = [], []
    for name in PHOTO_SPLITS[split]:
        photo = _photo(name)
        grid = _tiles(photo, size)
        columns = photo.shape[1] // size
        tiles.append(grid)
        sources += [(name, (t // columns) * size, (t % columns) * size) for t in range(len(grid))]
    order = _photo_order(sources)
    tiles = np.concatenate(tiles)[order]
    tiles.setflags(write=False)
    return tiles, tuple(sources[i] for i in order)


def _load_photos(request: _Request) -> torch.Tensor:
    """Tiles of the photographs assigned to ``request.split`` (see :data:`PHOTO_SPLITS`), shuffled."""
    tiles = _photo_tiles(request.split, request.size)[0]
    if len(tiles) == 0:
        raise ValueError(f"size={request.size} is larger than every {request.split} photograph")
    return to_images(tiles)


def _load_faces(request: _Request) -> torch.Tensor:
    """The 100 LFW face crops of ``skimage.data.lfw_subset()``: first 80 train, last 20 test."""
    import skimage.data  # heavy: imported by the embedded datasets only

    faces = torch.from_numpy(skimage.data.lfw_subset()[:_N_FACES].astype(np.float32)).clamp_(0, 1)
    faces = faces[:, None]
    return faces[:_N_FACES_TRAIN] if request.split == "train" else faces[_N_FACES_TRAIN:]


def _load_digits(request: _Request) -> torch.Tensor:
    """scikit-learn's 8x8 digits scaled by 1/16: first 80 % (1437) train, last 360 test."""
    from sklearn.datasets import load_digits  # heavy: imported by the embedded datasets only

    digits = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]
    return _split_by_fraction(digits, request.split, _DIGITS_TRAIN_FRACTION)


# --------------------------------------------------------------------------------------------- fashion-mnist

def _load_fashion_mnist(request: _Request) -> torch.Tensor:
    """``{train,t10k}-images-idx3-ubyte[.gz]`` from ``root`` or ``root/FashionMNIST/raw``."""
    stem = f"{_FASHION_PREFIX[request.split]}-images-idx3-ubyte"
    candidates = [folder / f"{stem}{ext}" for folder in (request.root, request.root / "FashionMNIST" / "raw")
                  for ext in ("", ".gz")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ValueError(f"root {str(request.root)!r} has no Fashion-MNIST file {stem} or {stem}.gz")
    images = read_idx_file(path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{path.name}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                         f"{images.shape}")
    return to_images(images)


# --------------------------------------------------------------------------------------------- cifar-10

def _cifar_names(fmt: str, split: str) -> list[str]:
    """Batch file names of one CIFAR-10 format (``"bin"`` or ``"py"``) and split."""
    stems = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return [f"{stem}.bin" if fmt == "bin" else stem for stem in stems]


_CIFAR_PARSERS: dict[str, Callable[[bytes], np.ndarray]] = {"bin": parse_cifar_bin, "py": parse_cifar_py}


def _read_cifar_archive(path: Path, split: str) -> tuple[str, list[bytes]]:
    """Batch bytes of ``split`` read from a CIFAR-10 ``.tar.gz`` (members are read, never extracted)."""
    with tarfile.open(path, "r:*") as archive:
        members = {m.name.removeprefix("./"): m for m in archive.getmembers() if m.isfile()}
        for fmt, folder in _CIFAR_DIRS.items():
            wanted = [f"{folder}/{name}" for name in _cifar_names(fmt, split)]
            if all(name in members for name in wanted):
                too_large = [name for name in wanted if members[name].size > MAX_DECOMPRESSED_BYTES]
                if too_large:
                    raise ValueError(f"root archive {path.name!r}: member {too_large[0]} declares "
                                     f"{members[too_large[0]].size:,} bytes, more than the "
                                     f"{MAX_DECOMPRESSED_BYTES:,} allowed")
                return fmt, [read_capped(archive.extractfile(members[name]), MAX_DECOMPRESSED_BYTES, name)
                             for name in wanted]
    expected = " or ".join(f"{_CIFAR_DIRS[f]}/{{{', '.join(_cifar_names(f, split))}}}" for f in _CIFAR_DIRS)
    raise ValueError(f"root archive {path.name!r} lacks the CIFAR-10 {split} members {expected}")


def _find_cifar_batches(root: Path, split: str) -> tuple[str, list[bytes]]:
    """Locate the batches of ``split``: extracted folders first, then the official archives."""
    if root.is_file():
        return _read_cifar_archive(root, split)
    for fmt, folder in _CIFAR_DIRS.items():
        for directory in (root / folder, root):
            paths = [directory / name for name in _cifar_names(fmt, split)]
            if all(p.is_file() for p in paths):
                return fmt, [p.read_bytes() for p in paths]
    for archive in _CIFAR_ARCHIVES.values():
        if (root / archive).is_file():
            return _read_cifar_archive(root / archive, split)
    raise ValueError(
        f"root {str(root)!r} has no CIFAR-10 {split} files: expected {_CIFAR_DIRS['bin']}/"
        f"{', '.join(_cifar_names('bin', split))}, or {_CIFAR_DIRS['py']}/{', '.join(_cifar_names('py', split))}, "
        f"or one of the archives {', '.join(_CIFAR_ARCHIVES.values())}")


def _load_cifar10(request: _Request) -> torch.Tensor:
    """CIFAR-10 images of ``request.split`` as (N, 3, 32, 32)."""
    fmt, batches = _find_cifar_batches(request.root, request.split)
    return to_images(np.concatenate([_CIFAR_PARSERS[fmt](batch) for batch in batches]))


# --------------------------------------------------------------------------------------------- image folders

def _is_test_file(relative: str) -> bool:
    """Deterministic ~20 % test rule on a file's relative path (stable when files are added)."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _FOLDER_TEST_MODULUS == 0


def _folder_split_files(root: Path, split: str) -> list[Path]:
    """Files of ``split``: ``root/train`` / ``root/test`` if both exist, else the hash rule."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return image_files(root / split)
    files = image_files(root)
    return [p for p in files if _is_test_file(p.relative_to(root).as_posix()) == (split == "test")]


def _load_folder(request: _Request) -> torch.Tensor:
    """Any folder of images (PNG, JPEG, ...) split by subfolders or by a path-hash rule."""
    if not request.root.is_dir():
        raise ValueError(f"root {str(request.root)!r} is not a folder")
    files = _folder_split_files(request.root, request.split)
    if not files:
        raise ValueError(f"root {str(request.root)!r} has no {request.split} images with suffix in "
                         f"{IMAGE_SUFFIXES}")
    return read_images(files, request.size, bool(request.grayscale))


def _load_array_file(path: Path, split: str) -> torch.Tensor:
    """Images of ``split`` from a ``.npy`` array, or a ``.npz`` with ``train`` and ``test`` or one array.

    A single array is split by index: the first 6/7 train, the rest test.
    """
    if path.suffix == ".npy":
        return to_images(_split_by_fraction(np.load(path, allow_pickle=False), split, _FFHQ_TRAIN_FRACTION))
    with open_npz(path) as arrays:
        if "train" in arrays.files and "test" in arrays.files:
            return to_images(arrays[split])
        if len(arrays.files) == 1:
            return to_images(_split_by_fraction(arrays[arrays.files[0]], split, _FFHQ_TRAIN_FRACTION))
        raise ValueError(f"root {path.name!r} must hold 'train' and 'test' arrays or a single array, "
                         f"found {arrays.files}")


def _load_ffhq32(request: _Request) -> torch.Tensor:
    """FFHQ from a ``.npy``/``.npz`` array or an image folder (sorted; first 6/7 train, or train/test)."""
    root = request.root
    if root.is_file():
        if root.suffix not in (".npy", ".npz"):
            raise ValueError(f"root file {root.name!r} must be a .npy or .npz array")
        return _load_array_file(root, request.split)
    if not root.is_dir():
        raise ValueError(f"root {str(root)!r} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        files = image_files(root / request.split)
    else:
        files = _split_by_fraction(image_files(root), request.split, _FFHQ_TRAIN_FRACTION)
    if not files:
        raise ValueError(f"root {str(root)!r} has no {request.split} images with suffix in {IMAGE_SUFFIXES}")
    return read_images(files, request.size, bool(request.grayscale))


_LOADERS: dict[str, Callable[[_Request], torch.Tensor]] = {
    "photos": _load_photos,
    "faces": _load_faces,
    "digits": _load_digits,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "ffhq32": _load_ffhq32,
    "folder": _load_folder,
}
