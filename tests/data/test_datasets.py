"""Dataset loaders: embedded datasets, real file formats written by hand, safe pickles, subsets, errors."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lemmse_ray.data import formats
from lemmse_ray.data.formats import fetch_file, read_idx, safe_load_cifar_pickle, verify_checksum
from lemmse_ray.data.loaders import DATASETS, PHOTO_SPLITS, download, load_dataset, photo_tile_sources, query_indices
from lemmse_ray.data.loaders import subset_indices, take_subset

RNG = np.random.default_rng(0)


def as_images(array: np.ndarray) -> torch.Tensor:
    """Expected tensor for a uint8 (N, C, H, W) array."""
    return torch.from_numpy(array.astype(np.float32) / 255.0)


def assert_images(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert tuple(x.shape) == shape
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


# ------------------------------------------------------------------------------------------ Fashion-MNIST IDX

def idx_bytes(images: np.ndarray) -> bytes:
    """An IDX3 uint8 file: magic 0x00000803, three big-endian int32 dims, then pixels."""
    return struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3i", *images.shape) + images.tobytes()


def test_fashion_mnist_plain_and_gzip(tmp_path):
    train = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(train))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(test)))
    x = load_dataset("fashion-mnist", "train", root=tmp_path)
    assert_images(x, (5, 1, 28, 28))
    assert torch.equal(x, as_images(train[:, None]))
    y = load_dataset("fashion-mnist", "test", root=str(tmp_path))
    assert torch.equal(y, as_images(test[:, None]))
    assert load_dataset("fashion-mnist", "test", root=tmp_path, grayscale=False).shape == (3, 3, 28, 28)


def test_fashion_mnist_torchvision_layout(tmp_path):
    train = RNG.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(train)))
    assert torch.equal(load_dataset("fashion-mnist", root=tmp_path), as_images(train[:, None]))


def test_read_idx_header_checks():
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(idx_bytes(images)), images)
    floats = np.array([[1.5, -2.0]], dtype=">f4")
    data = struct.pack(">BBBB", 0, 0, 0x0D, 2) + struct.pack(">2i", 1, 2) + floats.tobytes()
    assert np.array_equal(read_idx(data), floats)
    with pytest.raises(ValueError, match="magic"):
        read_idx(b"\x01\x00\x08\x03" + idx_bytes(images)[4:])
    with pytest.raises(ValueError, match="header shape"):
        read_idx(idx_bytes(images)[:-1])


def test_fashion_mnist_missing_files_named(tmp_path):
    with pytest.raises(ValueError, match=r"root.*t10k-images-idx3-ubyte"):
        load_dataset("fashion-mnist", "test", root=tmp_path)


# ------------------------------------------------------------------------------------------ CIFAR-10

def cifar_batches(sizes: list[int]) -> list[np.ndarray]:
    return [RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for n in sizes]


def cifar_bin(images: np.ndarray) -> bytes:
    """Binary records: one label byte then 3072 pixel bytes."""
    labels = RNG.integers(0, 10, (len(images), 1), dtype=np.uint8)
    return np.concatenate([labels, images.reshape(len(images), -1)], axis=1).tobytes()


def cifar_py(images: np.ndarray) -> bytes:
    """A python-version batch: a protocol-2 pickle of a dict, like the official files."""
    batch = {b"batch_label": b"batch", b"labels": list(range(len(images))),
             b"data": images.reshape(len(images), -1), b"filenames": [b"f%d.png" % i for i in range(len(images))]}
    return pickle.dumps(batch, protocol=2)


def write_cifar(folder, fmt: str, train: list[np.ndarray], test: np.ndarray) -> None:
    folder.mkdir(parents=True)
    encode, ext = (cifar_bin, ".bin") if fmt == "bin" else (cifar_py, "")
    for i, batch in enumerate(train, start=1):
        (folder / f"data_batch_{i}{ext}").write_bytes(encode(batch))
    (folder / f"test_batch{ext}").write_bytes(encode(test))


@pytest.mark.parametrize("fmt, folder", [("bin", "cifar-10-batches-bin"), ("py", "cifar-10-batches-py")])
def test_cifar10_extracted_folders(tmp_path, fmt, folder):
    *train, test = cifar_batches([2, 1, 3, 1, 2, 4])
    write_cifar(tmp_path / folder, fmt, train, test)
    x = load_dataset("cifar10", "train", root=tmp_path)
    assert_images(x, (9, 3, 32, 32))
    assert torch.equal(x, as_images(np.concatenate(train)))
    assert torch.equal(load_dataset("cifar10", "test", root=tmp_path / folder), as_images(test))
    gray = load_dataset("cifar10", "test", root=tmp_path, grayscale=True)
    expected = (as_images(test) * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert gray.shape == (4, 1, 32, 32) and torch.allclose(gray, expected)


@pytest.mark.parametrize("fmt, folder, archive", [("bin", "cifar-10-batches-bin", "cifar-10-binary.tar.gz"),
                                                  ("py", "cifar-10-batches-py", "cifar-10-python.tar.gz")])
def test_cifar10_archive_read_without_extracting(tmp_path, fmt, folder, archive):
    *train, test = cifar_batches([1, 2, 1, 1, 1, 2])
    staging = tmp_path / "staging"
    write_cifar(staging / folder, fmt, train, test)
    store = tmp_path / "store"
    store.mkdir()
    with tarfile.open(store / archive, "w:gz") as tar:
        tar.add(staging / folder, arcname=folder)
        payload = b"escaped"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert torch.equal(load_dataset("cifar10", "train", root=store), as_images(np.concatenate(train)))
    assert torch.equal(load_dataset("cifar10", "test", root=store / archive), as_images(test))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing extracted anywhere


def test_cifar10_missing_files_named(tmp_path):
    with pytest.raises(ValueError, match=r"root.*data_batch_1\.bin.*cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", root=tmp_path)
    with tarfile.open(tmp_path / "cifar-10-binary.tar.gz", "w:gz"):
        pass
    with pytest.raises(ValueError, match=r"root.*test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_cifar10_binary_bad_length(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-bin", "bin", cifar_batches([1] * 5), cifar_batches([1])[0])
    with open(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ValueError, match="multiple of 3073"):
        load_dataset("cifar10", "test", root=tmp_path)


def py2_style_pickle(data: np.ndarray) -> bytes:
    """Opcodes of a Python 2 ``cPickle`` protocol-2 CIFAR batch: ``str`` as SHORT_BINSTRING/BINSTRING."""
    def short(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text

    raw = data.tobytes()
    dtype = (b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
             + b"(K\x01" + b"M" + struct.pack("<H", data.shape[0]) + b"M" + struct.pack("<H", data.shape[1])
             + b"\x86" + dtype + b"\x89" + b"T" + struct.pack("<I", len(raw)) + raw + b"tb")
    labels = b"](K\x03K\x07e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + labels + b"u."


def test_safe_pickle_reads_python2_batches():
    data = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
    blob = py2_style_pickle(data)
    trusted = pickle.loads(blob, encoding="bytes")  # our own bytes: checks the hand-written opcodes
    assert np.array_equal(trusted[b"data"], data)
    batch = safe_load_cifar_pickle(blob)
    assert np.array_equal(batch["data"], data) and batch["labels"] == [3, 7]


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_safe_pickle_reads_numpy_arrays(protocol):
    data = RNG.integers(0, 256, (2, 3072), dtype=np.uint8)
    floats = np.asfortranarray(RNG.random((3, 4)))
    batch = safe_load_cifar_pickle(pickle.dumps({b"data": data, "floats": floats, b"labels": [1, 2]},
                                                protocol=protocol))
    assert np.array_equal(batch["data"], data) and batch["data"].dtype == np.uint8
    assert np.array_equal(batch["floats"], floats) and batch["labels"] == [1, 2]


class Payload:
    """Pickles as a call to a dangerous global."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_safe_pickle_refuses_code_execution(tmp_path, capfd):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": Payload(os.system, f"echo pwned > {marker}; echo pwned")}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        safe_load_cifar_pickle(blob)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out


@pytest.mark.parametrize("payload", [
    Payload(eval, "1 + 1"),
    Payload(__import__, "subprocess"),
    np.array([object()] * 2, dtype=object),
])
def test_safe_pickle_refuses_other_globals_and_object_arrays(payload):
    with pytest.raises(pickle.UnpicklingError):
        safe_load_cifar_pickle(pickle.dumps({b"data": payload}, protocol=2))


def test_safe_pickle_refuses_tampering_with_stand_ins():
    # BUILD on an allowed global (state set on the stand-in class itself) must be refused.
    blob = b"\x80\x02cnumpy\nndarray\nN}X\x01\x00\x00\x00aK\x01s\x86b."  # BUILD (None, {"a": 1})
    with pytest.raises(pickle.UnpicklingError):
        safe_load_cifar_pickle(blob)
    assert not hasattr(formats._NdarrayTag, "a")


# ------------------------------------------------------------------------------------------ FFHQ / arrays

def test_ffhq32_npy_layouts(tmp_path):
    nhwc = RNG.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "ffhq.npy", nhwc)
    x = load_dataset("ffhq32", "train", root=tmp_path / "ffhq.npy")
    assert_images(x, (6, 3, 32, 32))
    assert torch.equal(x, as_images(nhwc.transpose(0, 3, 1, 2))[:6])
    assert torch.equal(load_dataset("ffhq32", "test", root=tmp_path / "ffhq.npy"),
                       as_images(nhwc.transpose(0, 3, 1, 2))[6:])
    np.save(tmp_path / "nchw.npy", nhwc.transpose(0, 3, 1, 2))
    assert torch.equal(load_dataset("ffhq32", root=tmp_path / "nchw.npy"), x)


def test_ffhq32_npz_splits_and_resize(tmp_path):
    train = RNG.random((4, 3, 32, 32)).astype(np.float32)
    test = np.full((2, 64, 64, 3), 0.25, dtype=np.float64)
    np.savez(tmp_path / "ffhq.npz", train=train, test=test)
    assert torch.equal(load_dataset("ffhq32", "train", root=tmp_path / "ffhq.npz"), torch.from_numpy(train))
    y = load_dataset("ffhq32", "test", root=tmp_path / "ffhq.npz")
    assert_images(y, (2, 3, 32, 32))
    assert torch.allclose(y, torch.full_like(y, 0.25), atol=1e-6)
    np.savez(tmp_path / "bad.npz", a=train, b=train)
    with pytest.raises(ValueError, match="root"):
        load_dataset("ffhq32", root=tmp_path / "bad.npz")


def test_ffhq32_rejects_out_of_range_floats_and_pickles(tmp_path):
    np.save(tmp_path / "hot.npy", np.full((2, 32, 32, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_dataset("ffhq32", root=tmp_path / "hot.npy")
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_dataset("ffhq32", root=tmp_path / "obj.npy")


def test_ffhq32_image_folder(tmp_path):
    for i in range(7):
        Image.new("RGB", (64, 48), (10 * i, 20, 30)).save(tmp_path / f"{i:05d}.png")
    x = load_dataset("ffhq32", "train", root=tmp_path)
    assert_images(x, (6, 3, 32, 32))
    assert torch.allclose(x[:, 0], torch.arange(6).float().view(6, 1, 1).expand(6, 32, 32) * 10 / 255, atol=1e-5)
    assert torch.allclose(load_dataset("ffhq32", "test", root=tmp_path)[:, 0], torch.full((1, 32, 32), 60 / 255),
                          atol=1e-5)


# ------------------------------------------------------------------------------------------ image folders

def test_folder_train_test_subfolders_exact_pixels(tmp_path):
    pixels = {split: RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for split, n in (("train", 3), ("test", 2))}
    for split, images in pixels.items():
        (tmp_path / split).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / split / f"img{i:02d}.png")
    for split, images in pixels.items():
        x = load_dataset("folder", split, root=tmp_path)
        assert_images(x, (len(images), 3, 32, 32))
        assert torch.equal(x, as_images(images.transpose(0, 3, 1, 2)))
    gray = load_dataset("folder", "test", root=tmp_path, grayscale=True)
    rgb = as_images(pixels["test"].transpose(0, 3, 1, 2))
    assert torch.allclose(gray[:, 0], 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2], atol=1e-6)


def test_folder_hash_split_partitions_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(20):
        value = np.full((40, 40), i * 10, dtype=np.uint8)
        Image.fromarray(value).save(tmp_path / ("sub" if i % 2 else ".") / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    train = load_dataset("folder", "train", root=tmp_path, size=8, grayscale=True)
    test = load_dataset("folder", "test", root=tmp_path, size=8, grayscale=True)
    values = sorted(round(float(v) * 255) for v in torch.cat([train, test])[:, 0, 0, 0])
    assert values == [i * 10 for i in range(20)]  # disjoint and complete
    assert len(test) > 0 and len(train) > len(test)
    assert torch.equal(train, load_dataset("folder", "train", root=tmp_path, size=8, grayscale=True))
    assert torch.allclose(train, train[:, :, :1, :1].expand_as(train))  # constant images stay constant


def test_folder_modes_and_resize(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    gray = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "train" / "a_gray.png")
    deep = RNG.integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "train" / "b_deep.png")
    Image.new("RGBA", (100, 50), (255, 0, 0, 128)).save(tmp_path / "train" / "c_rgba.png")
    Image.new("RGB", (30, 90), (0, 0, 255)).save(tmp_path / "test" / "tall.jpg", quality=100)
    x = load_dataset("folder", "train", root=tmp_path, size=16, grayscale=True)
    assert_images(x, (3, 1, 16, 16))
    assert torch.equal(x[0, 0], torch.from_numpy(gray.astype(np.float32) / 255))
    assert torch.allclose(x[1, 0], torch.from_numpy(deep.astype(np.float32) / 65535))
    assert torch.allclose(x[2], torch.full((1, 16, 16), 0.299), atol=1e-6)
    rgb = load_dataset("folder", "train", root=tmp_path, size=16)
    assert rgb.shape == (3, 3, 16, 16) and torch.equal(rgb[0, 0], rgb[0, 2])
    tall = load_dataset("folder", "test", root=tmp_path, size=10)
    assert_images(tall, (1, 3, 10, 10))
    assert torch.allclose(tall[0, 2], torch.ones(10, 10), atol=0.02)


def test_folder_without_images(tmp_path):
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder", root=tmp_path / "missing")


# ------------------------------------------------------------------------------------------ embedded datasets

EMBEDDED_SHAPES = {
    ("photos", "train"): (1609, 3, 32, 32), ("photos", "test"): (342, 3, 32, 32),
    ("faces", "train"): (80, 1, 25, 25), ("faces", "test"): (20, 1, 25, 25),
    ("digits", "train"): (1437, 1, 8, 8), ("digits", "test"): (360, 1, 8, 8),
}


@pytest.mark.parametrize("name", ["photos", "faces", "digits"])
def test_embedded_offline_shapes_determinism_disjoint(name):
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert_images(train, EMBEDDED_SHAPES[name, "train"])
    assert_images(test, EMBEDDED_SHAPES[name, "test"])
    assert torch.equal(train, load_dataset(name, "train"))
    train_keys = {image.numpy().tobytes() for image in train}
    assert not any(image.numpy().tobytes() in train_keys for image in test)
    assert float(train.std()) > 0.05  # real content, not blank


def test_photos_options_and_exact_tiles():
    import skimage.data

    tiles = load_dataset("photos", "train", size=16)
    assert tiles.shape == (6436, 3, 16, 16)
    expected = torch.from_numpy(skimage.data.astronaut()[16:32, 32:48].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(tiles[photo_tile_sources("train", 16).index(("astronaut", 16, 32))], expected)
    gray = load_dataset("photos", "test", grayscale=True)
    rgb = load_dataset("photos", "test")
    assert gray.shape == (342, 1, 32, 32)
    assert torch.allclose(gray[:, 0], 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2], atol=1e-6)
    assert load_dataset("photos", "test", size=64).shape == (82, 3, 64, 64)


def test_digits_values_and_resize():
    from sklearn.datasets import load_digits

    digits = load_dataset("digits", "test")
    assert torch.equal(digits[:, 0], torch.from_numpy(load_digits().images[1437:].astype(np.float32) / 16))
    big = load_dataset("digits", "train", size=16, grayscale=False, n=5)
    assert_images(big, (5, 3, 16, 16))


# ------------------------------------------------------------------------------------------ subsets

def test_take_subset_first_and_random():
    images = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    assert torch.equal(take_subset(images, 4), images[:4])
    a = take_subset(images, 10, "random", seed=1)
    values = a.flatten().tolist()
    assert len(set(values)) == 10 and set(values) <= set(range(50)) and values != sorted(values)
    assert torch.equal(a, take_subset(images, 10, "random", seed=1))
    assert not torch.equal(a, take_subset(images, 10, "random", seed=2))
    assert sorted(take_subset(images, 50, "random").flatten().tolist()) == list(range(50))


def test_random_subsets_are_nested_and_uniform():
    for seed in (0, 1, 7):
        largest = subset_indices(100, 100, "random", seed).tolist()
        assert sorted(largest) == list(range(100))
        for n in (1, 5, 17, 64, 99):
            assert subset_indices(100, n, "random", seed).tolist() == largest[:n]
    assert subset_indices(100, 10).tolist() == list(range(10))
    # uniform without replacement: each of 20 indices is in a random 2-subset for about 10 % of the seeds
    counts = torch.zeros(20)
    for seed in range(2000):
        counts[subset_indices(20, 2, "random", seed)] += 1
    assert counts.sum() == 4000 and float((counts / 2000 - 0.1).abs().max()) < 0.03


def test_query_indices_deterministic_nested_and_per_split():
    a = query_indices(300, 8, split="test", seed=0)
    assert torch.equal(a, query_indices(300, 8, split="test", seed=0))
    assert len(set(a.tolist())) == 8 and 0 <= int(a.min()) and int(a.max()) < 300
    assert query_indices(300, 20, split="test", seed=0)[:8].tolist() == a.tolist()
    assert a.tolist() != query_indices(300, 8, split="train", seed=0).tolist()
    assert a.tolist() != query_indices(300, 8, split="test", seed=1).tolist()
    assert a.tolist() != subset_indices(300, 8, "random", 0).tolist()
    assert a.tolist() != list(range(8))


def test_queries_and_subsets_of_real_splits_are_disjoint():
    """Train queries drawn from a random training subset are images of that subset; test queries are not
    training images; everything is reproducible."""
    train = load_dataset("photos", "train", n=200, subset="random", seed=3)
    assert torch.equal(train, load_dataset("photos", "train", n=200, subset="random", seed=3))
    assert torch.equal(train[:50], load_dataset("photos", "train", n=50, subset="random", seed=3))
    test = load_dataset("photos", "test")
    train_queries = train[query_indices(len(train), 8, split="train", seed=3)]
    test_queries = test[query_indices(len(test), 8, split="test", seed=3)]
    keys = {image.numpy().tobytes() for image in train}
    full_train = {image.numpy().tobytes() for image in load_dataset("photos", "train")}
    assert all(image.numpy().tobytes() in keys for image in train_queries)
    assert not any(image.numpy().tobytes() in full_train for image in test_queries)


def test_photos_tiles_are_shuffled_across_photographs():
    """A small first subset spans the photographs (before: the first 256 training tiles were one photograph,
    the 8 first test tiles neighbouring crops of one photograph); the order is fixed and each tile is the
    crop its source names."""
    import skimage.data

    for split, photographs in PHOTO_SPLITS.items():
        sources = photo_tile_sources(split)
        assert sources == photo_tile_sources(split)
        first = {name for name, _, _ in sources[:64]}
        assert first == set(photographs)
        # a permutation of every non-overlapping tile of the split's photographs
        expected = {(name, top, left) for name in photographs
                    for top in range(0, getattr(skimage.data, name)().shape[0] - 31, 32)
                    for left in range(0, getattr(skimage.data, name)().shape[1] - 31, 32)}
        assert len(sources) == len(expected) and set(sources) == expected
        tiles = load_dataset("photos", split)
        for index in (0, 1, 2, 63, len(sources) - 1):
            name, top, left = sources[index]
            crop = getattr(skimage.data, name)()[top:top + 32, left:left + 32]
            assert torch.equal(tiles[index], torch.from_numpy(crop.astype(np.float32) / 255).permute(2, 0, 1))
        # neighbouring tiles in the order are not neighbouring crops of one photograph
        adjacent = sum(a[0] == b[0] and abs(a[1] - b[1]) + abs(a[2] - b[2]) == 32
                       for a, b in zip(sources, sources[1:]))
        assert adjacent < len(sources) // 10


def test_load_dataset_subset():
    full = load_dataset("digits", "test")
    assert torch.equal(load_dataset("digits", "test", n=7), full[:7])
    picked = load_dataset("digits", "test", n=7, subset="random", seed=3)
    assert torch.equal(picked, full[subset_indices(len(full), 7, "random", 3)])


# ------------------------------------------------------------------------------------------ bad arguments

def named(parameter: str) -> str:
    return rf"(?<![A-Za-z_]){re.escape(parameter)}(?![A-Za-z_])"


@pytest.mark.parametrize("kwargs, parameter", [
    ({"name": "mnist"}, "name"),
    ({"name": "digits", "split": "val"}, "split"),
    ({"name": "digits", "subset": "last", "n": 3}, "subset"),
    ({"name": "digits", "n": 0}, "n"),
    ({"name": "digits", "n": -2}, "n"),
    ({"name": "digits", "split": "test", "n": 361}, "n"),
    ({"name": "digits", "size": 0}, "size"),
    ({"name": "digits", "n": 2.5}, "n"),
    ({"name": "digits", "n": True}, "n"),
    ({"name": "digits", "n": 3, "subset": "random", "seed": -1}, "seed"),
    ({"name": "digits", "seed": "0"}, "seed"),
    ({"name": "photos", "size": 10_000}, "size"),
    ({"name": "faces", "root": "/data"}, "root"),
    ({"name": "cifar10"}, "root"),
    ({"name": "fashion-mnist"}, "root"),
    ({"name": "ffhq32"}, "root"),
    ({"name": "folder"}, "root"),
])
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=named(parameter)):
        load_dataset(**kwargs)


def test_take_subset_bad_arguments():
    images = torch.zeros(3, 1, 2, 2)
    for n in (0, 4):
        with pytest.raises(ValueError, match=named("n")):
            take_subset(images, n)
    with pytest.raises(ValueError, match="subset mode"):
        take_subset(images, 1, "sequential")


@pytest.mark.parametrize("call, parameter", [
    (lambda: subset_indices(10, 0), "n"),
    (lambda: subset_indices(10, 11, "random"), "n"),
    (lambda: subset_indices(10, 2.0), "n"),
    (lambda: subset_indices(-1, 1), "total"),
    (lambda: subset_indices(10, 2, "random", seed=-3), "seed"),
    (lambda: subset_indices(10, 2, "shuffled"), "subset mode"),
    (lambda: query_indices(10, 0, split="test"), "n"),
    (lambda: query_indices(10, 11, split="test"), "n"),
    (lambda: query_indices(10, 2, split="val"), "split"),
    (lambda: query_indices(10, 2, split="train", seed=True), "seed"),
    (lambda: query_indices(10.0, 2, split="train"), "total"),
    (lambda: photo_tile_sources("validation"), "split"),
    (lambda: photo_tile_sources("train", 0), "size"),
])
def test_sampling_bad_arguments(call, parameter):
    with pytest.raises(ValueError, match=named(parameter)):
        call()


def test_registry_lists_every_dataset():
    assert DATASETS == ("photos", "faces", "digits", "fashion-mnist", "cifar10", "ffhq32", "folder")


# ------------------------------------------------------------------------------------------ checksums / fetch

def test_verify_checksum(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"hello world\n" * 1000)
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    assert verify_checksum(path, digest) and verify_checksum(path, digest.upper())
    assert not verify_checksum(path, "0" * 32)


def test_fetch_file_is_atomic_and_verified(tmp_path):
    source = tmp_path / "source.gz"
    source.write_bytes(os.urandom(3000))
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "copy.gz"
    with pytest.raises(ValueError, match="md5"):
        fetch_file(source.as_uri(), dest, "f" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    assert fetch_file(source.as_uri(), dest, md5) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert list(dest.parent.iterdir()) == [dest]


def test_download_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match=named("name")):
        download("digits", tmp_path)
