"""Readers of the image file formats the datasets come in, and the conversion of what they read to images.

* IDX (MNIST, Fashion-MNIST): :func:`read_idx`, :func:`read_idx_file` (gzipped or not);
* CIFAR-10 batches: binary records (:func:`parse_cifar_bin`) and python pickles (:func:`parse_cifar_py`,
  :func:`safe_load_cifar_pickle`);
* image files (PNG, JPEG, ...): :func:`image_files`, :func:`read_images`;
* ``.npz`` arrays: :func:`open_npz`;
* downloads: :func:`fetch_file` and :func:`verify_checksum` (MD5).

Every read is capped (:data:`MAX_DECOMPRESSED_BYTES`, :func:`read_capped`): a small file that would
decompress to gigabytes is refused, not read.  CIFAR-10 python batches are pickles; they are read by a
restricted unpickler that never imports or calls anything but its own array-building stand-ins, so a
malicious file cannot execute code.

Images are float32 ``(N, C, H, W)`` tensors with values in ``[0, 1]`` (:func:`to_images`), one channel
(gray) or three (RGB) (:func:`set_channels`), resized by :func:`resize_center_crop`.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

__all__ = ["IMAGE_SUFFIXES", "MAX_DECOMPRESSED_BYTES", "fetch_file", "image_files", "open_npz", "parse_cifar_bin",
           "parse_cifar_py", "read_capped", "read_idx", "read_idx_file", "read_images", "resize_center_crop",
           "safe_load_cifar_pickle", "set_channels", "to_images", "verify_checksum"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_LUMA = (0.299, 0.587, 0.114)

# Largest decompressed file or archive member read (FFHQ-32 as one array: 215 MB; a CIFAR-10 batch: 31 MB).
MAX_DECOMPRESSED_BYTES = 1 << 29
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR_RECORD = 1 + 3 * 32 * 32


# --------------------------------------------------------------------------------------------- images

def to_images(array: np.ndarray) -> torch.Tensor:
    """Convert an (N, H, W), (N, H, W, C) or (N, C, H, W) uint8 / [0, 1]-float array to a float32 tensor.

    A 4-D array is channels-last when its last axis has 1 or 3 entries and its second does not.
    """
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"image array must have 3 or 4 dimensions, got shape {array.shape}")
    if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] not in (1, 3):
        raise ValueError(f"image array must have 1 or 3 channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image array must be uint8 or float in [0, 1], got dtype {array.dtype}")
    images = torch.from_numpy(array.astype(np.float32))
    if not bool(torch.isfinite(images).all()) or images.min() < 0 or images.max() > 1:
        raise ValueError("float image array must have finite values in [0, 1]")
    return images


def set_channels(images: torch.Tensor, grayscale: bool | None) -> torch.Tensor:
    """Keep channels (None), reduce to luminance (True) or replicate gray to RGB (False)."""
    channels = images.shape[1]
    if grayscale and channels == 3:
        weights = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    if grayscale is False and channels == 1:
        return images.repeat(1, 3, 1, 1)
    return images


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (antialiased bicubic), then centre-crop to ``size``.

    Images already ``size`` x ``size`` are returned unchanged (exact pixels).
    """
    height, width = images.shape[-2:]
    if height == width == size:
        return images
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False,
                            antialias=True).clamp_(0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top:top + size, left:left + size].contiguous()


# --------------------------------------------------------------------------------------------- idx

def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (MNIST format): magic ``00 00 type ndim``, big-endian int32 dims, then data."""
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError("not an IDX file: bad magic number")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("truncated IDX header")
    shape = struct.unpack(f">{ndim}i", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    if len(data) - header != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"IDX payload does not match its header shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx_file(path: str | os.PathLike, max_bytes: int = MAX_DECOMPRESSED_BYTES) -> np.ndarray:
    """:func:`read_idx` of a file, gunzipped when its name ends in ``.gz``, reading no more than its header
    declares (plus one byte, to detect trailing data): a small file that would decompress to gigabytes is
    refused after reading its header, and a header declaring more than ``max_bytes`` is refused outright."""
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as stream:
        head = stream.read(4)
        if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in _IDX_DTYPES:
            raise ValueError(f"{path.name}: not an IDX file: bad magic number")
        dims = stream.read(4 * head[3])
        if len(dims) < 4 * head[3]:
            raise ValueError(f"{path.name}: truncated IDX header")
        shape = struct.unpack(f">{head[3]}i", dims)
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(_IDX_DTYPES[head[2]]).itemsize
        if size > max_bytes:
            raise ValueError(f"{path.name}: its header declares {size:,} bytes of data, more than the "
                             f"{max_bytes:,} allowed")
        payload = stream.read(size + 1)  # one byte more than declared: read_idx refuses trailing data
    try:
        return read_idx(head + dims + payload)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from None


def read_capped(stream: io.RawIOBase | io.BufferedIOBase, max_bytes: int, what: str) -> bytes:
    """Read ``stream`` to its end, refusing (``ValueError`` naming ``what``) once more than ``max_bytes``
    would be read: a decompression bomb is stopped at the cap, not after filling memory."""
    chunks, total = [], 0
    while chunk := stream.read(min(1 << 20, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ValueError(f"{what}: decompresses to more than {max_bytes:,} bytes (the limit for one file)")
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------- cifar-10

def parse_cifar_bin(data: bytes) -> np.ndarray:
    """Images of a binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    if not data or len(data) % _CIFAR_RECORD:
        raise ValueError(f"CIFAR-10 binary batch size {len(data)} is not a multiple of {_CIFAR_RECORD}")
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)[:, 1:].reshape(-1, 3, 32, 32)


def parse_cifar_py(data: bytes) -> np.ndarray:
    """Images of a python-version batch: its ``data`` entry, a (N, 3072) uint8 array."""
    images = safe_load_cifar_pickle(data).get("data")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != 3 * 32 * 32:
        raise ValueError("CIFAR-10 python batch must hold 'data' as a (N, 3072) uint8 array")
    return images.reshape(-1, 3, 32, 32)


def safe_load_cifar_pickle(data: bytes) -> dict:
    """Read a CIFAR python-version batch (a pickled dict) without executing pickled code.

    Only the globals a pickled numpy array needs are accepted, and each is replaced by a local
    stand-in that builds the array with ``np.frombuffer``; any other global raises
    :class:`pickle.UnpicklingError`. Keys are returned as ``str``; arrays as ``np.ndarray``.
    """
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # malformed opcodes or stand-ins misused: report uniformly
        raise pickle.UnpicklingError(f"malformed CIFAR-10 pickle: {error}") from error
    if not isinstance(loaded, dict):
        raise pickle.UnpicklingError("a CIFAR batch must be a pickled dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): _materialize(v) for k, v in loaded.items()}


class _Stub:
    """Base of the pickle stand-ins: a BUILD opcode on a stand-in (or its class) is refused."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError("unexpected object state in pickle")


class _NdarrayTag(_Stub):
    """Stand-in for ``numpy.ndarray``: only marks the subtype argument of ``_reconstruct``."""

    __slots__ = ()


class _Latin1Encode(_Stub):
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for bytes."""

    __slots__ = ()

    def __new__(cls, text: str, encoding: str) -> bytes:  # type: ignore[misc]
        if not isinstance(text, str) or encoding != "latin1":
            raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
        return text.encode("latin1")


class _PendingDtype(_Stub):
    """Stand-in for ``numpy.dtype``: records the type code, then the byte order set by BUILD."""

    __slots__ = ("code", "order")
    _ALLOWED = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f4", "f8"})

    def __init__(self, code: str | bytes, align: object = False, copy: object = True) -> None:
        code = code.decode("ascii") if isinstance(code, bytes) else code
        if code not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing pickled dtype {code!r}")
        self.code, self.order = code, "|"

    def __setstate__(self, state: object) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        order = order.decode("ascii") if isinstance(order, bytes) else order
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError("bad pickled dtype state")
        self.order = order

    def resolve(self) -> np.dtype:
        """The numpy dtype described."""
        return np.dtype(self.order + self.code)


class _PendingArray(_Stub):
    """Stand-in for ``numpy.core.multiarray._reconstruct``: an empty array that BUILD fills."""

    __slots__ = ("array",)

    def __init__(self, subtype: type, shape: object, typecode: object) -> None:
        if subtype is not _NdarrayTag:
            raise pickle.UnpicklingError("_reconstruct of a type other than numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("bad pickled ndarray state")
        shape, dtype, fortran, raw = state[-4:]
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(dtype, _PendingDtype) and isinstance(raw, bytes)):
            raise pickle.UnpicklingError("bad pickled ndarray state")
        resolved = dtype.resolve()
        if len(raw) != int(np.prod(shape)) * resolved.itemsize:
            raise pickle.UnpicklingError("pickled ndarray data does not match its shape")
        self.array = np.frombuffer(raw, dtype=resolved).reshape(shape, order="F" if fortran else "C")


_SAFE_GLOBALS: dict[tuple[str, str], type] = {
    ("numpy.core.multiarray", "_reconstruct"): _PendingArray,
    ("numpy._core.multiarray", "_reconstruct"): _PendingArray,
    ("numpy", "ndarray"): _NdarrayTag,
    ("numpy", "dtype"): _PendingDtype,
    ("_codecs", "encode"): _Latin1Encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of :data:`_SAFE_GLOBALS`, to local stand-ins."""

    def find_class(self, module: str, name: str) -> type:
        """Return the stand-in of an allowed global; refuse every other one."""
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: object) -> object:
        """Refuse persistent ids."""
        raise pickle.UnpicklingError("refusing persistent id")


def _materialize(value: object) -> object:
    """Replace a filled :class:`_PendingArray` by its array; refuse one left without state."""
    if isinstance(value, _PendingArray):
        if value.array is None:
            raise pickle.UnpicklingError("pickled ndarray without state")
        return value.array
    return value


# --------------------------------------------------------------------------------------------- image files

def image_files(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursive), sorted by relative path."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _read_image(path: Path, grayscale: bool) -> torch.Tensor:
    """One image file as a (1, C, H, W) float tensor: C = 1 if ``grayscale`` else 3.

    8-bit and 16-bit grayscale files are read as gray; every other mode is converted to RGB.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode == "L":
            array = np.asarray(image, dtype=np.float32) / 255.0
        elif image.mode.startswith("I;16") or image.mode == "I":
            array = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        else:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
    return set_channels(tensor, grayscale)


def read_images(files: list[Path], size: int, grayscale: bool) -> torch.Tensor:
    """Read, resize (shorter side) and centre-crop ``files`` to ``size``, stacked in order."""
    return torch.cat([resize_center_crop(_read_image(p, grayscale), size) for p in files])


# --------------------------------------------------------------------------------------------- arrays

def open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """The arrays of a ``.npz`` archive (no pickles), opened once the sizes its members declare are known to
    stay within :data:`MAX_DECOMPRESSED_BYTES` (``np.load`` decompresses a member when it is read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = {info.filename: info.file_size for info in archive.infolist()}
    except zipfile.BadZipFile:
        raise ValueError(f"root {path.name!r} is not a .npz archive") from None
    if sum(sizes.values()) > MAX_DECOMPRESSED_BYTES:
        raise ValueError(f"root {path.name!r}: its arrays declare {sum(sizes.values()):,} bytes, more than the "
                         f"{MAX_DECOMPRESSED_BYTES:,} allowed")
    return np.load(path, allow_pickle=False)


# --------------------------------------------------------------------------------------------- downloads

def verify_checksum(path: str | os.PathLike, md5: str) -> bool:
    """Whether the MD5 digest of the file at ``path`` equals ``md5`` (hex, case-insensitive)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == md5.lower()


def fetch_file(url: str, dest: str | os.PathLike, md5: str) -> Path:
    """Download ``url`` to ``dest`` atomically (temporary file, checksum, rename).

    Raises:
        ValueError: if the downloaded file's MD5 is not ``md5``; ``dest`` is then left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        if not verify_checksum(tmp, md5):
            raise ValueError(f"md5 mismatch for {url}: expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
