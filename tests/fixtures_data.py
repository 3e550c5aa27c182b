"""Small fake datasets written in the REAL on-disk formats, for tests.

``write_idx_dataset(d, ...)`` and ``write_cifar_dataset(d, ...)`` make ``d`` usable as
``load_dataset(name, root=d)``: IDX files land flat in ``d`` (the Debian layout), CIFAR files in
``d/cifar-10-batches-py/`` or ``d/cifar-100-python/`` (the tarballs' layout). Passing
``root/<name>`` as ``d`` gives the documented ``<root>/<name>/`` layout instead.
Both return the uint8 arrays written, so tests can compare exact pixel values.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 00 00 08 ndim, big-endian uint32 dims, raw data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if x.size >= 2:  # make sure both ends of the range occur
        x.flat[0], x.flat[1] = 0, 255
    return x


def write_idx_dataset(dir: str | Path, n_train: int, n_test: int, gz: bool, rows: int = 28, cols: int = 28,
                      seed: int = 0) -> dict[str, np.ndarray]:
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": _images(rng, (n_train, rows, cols)),
        "train_y": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_x": _images(rng, (n_test, rows, cols)),
        "test_y": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    files = {
        "train-images-idx3-ubyte": arrays["train_x"],
        "train-labels-idx1-ubyte": arrays["train_y"],
        "t10k-images-idx3-ubyte": arrays["test_x"],
        "t10k-labels-idx1-ubyte": arrays["test_y"],
    }
    for stem, array in files.items():
        data = idx_bytes(array)
        if gz:
            (d / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (d / stem).write_bytes(data)
    return arrays


def _cifar_pickle(path: Path, data: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    batch = {
        b"batch_label": path.name.encode(),
        label_key: [int(v) for v in labels],  # the official files store a Python list
        b"data": data.reshape(len(data), 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(data))],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)  # the official files are Python 2 pickles


def write_cifar_dataset(dir: str | Path, name: str, n_per_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        d = Path(dir) / "cifar-10-batches-py"
        train_files, test_file, label_key, classes = [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10
    else:
        d = Path(dir) / "cifar-100-python"
        train_files, test_file, label_key, classes = ["train"], "test", b"fine_labels", 100
    d.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for fname in train_files:
        x = _images(rng, (n_per_batch, 3, 32, 32))
        y = rng.integers(0, classes, size=n_per_batch)
        _cifar_pickle(d / fname, x, y, label_key)
        train_x.append(x)
        train_y.append(y)
    test_x = _images(rng, (n_per_batch, 3, 32, 32))
    test_y = rng.integers(0, classes, size=n_per_batch)
    _cifar_pickle(d / test_file, test_x, test_y, label_key)
    meta_name = "batches.meta" if name == "cifar10" else "meta"
    with open(d / meta_name, "wb") as fh:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(classes)]}, fh, protocol=2)
    return {
        "train_x": np.concatenate(train_x),
        "train_y": np.concatenate(train_y),
        "test_x": test_x,
        "test_y": test_y,
    }
