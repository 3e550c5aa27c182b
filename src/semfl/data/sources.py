"""Loading the image datasets from their official file formats.

Formats: IDX (MNIST, Fashion-MNIST; raw or gzip) and the CIFAR "python version" pickles.
Everything is decoded with numpy.frombuffer so the full datasets load in about a second.
"""
from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from semfl.data.spec import ImageSpec


from semfl.data.layouts import (  # noqa: F401  (part of this module's interface)
    CIFAR10_FILES, CIFAR100_FILES, DEBIAN_FASHION_MNIST, IDX_FILES, LAYOUTS, DataError, canonical_name,
)


@dataclass
class ImageDataset:
    name: str
    train_x: torch.Tensor  # float32 NCHW in [0, 1]
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def spec(self) -> ImageSpec:
        # imported here so the data package does not depend on the models package importing cleanly
        from semfl.data.spec import ImageSpec

        _, c, h, w = self.train_x.shape
        return ImageSpec(channels=c, height=h, width=w, num_classes=self.num_classes)


def _idx_path(directory: Path, stem: str) -> Path | None:
    # raw first: it is what an unpacked download looks like and it reads faster
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_in(name: str, directory: Path) -> list[str]:
    """Required files absent from ``directory`` (the folder that should hold them directly)."""
    _, files, _ = LAYOUTS[name]
    if files is IDX_FILES:
        return [f"{f}[.gz]" for f in files if _idx_path(directory, f) is None]
    return [f for f in files if not (directory / f).is_file()]


def file_dir(name: str, dataset_dir: Path) -> Path | None:
    """The folder holding all of ``name``'s files: ``dataset_dir/<official sub-folder>`` or ``dataset_dir``."""
    sub, _, _ = LAYOUTS[name]
    candidates = [dataset_dir / sub, dataset_dir] if sub else [dataset_dir]
    for candidate in candidates:
        if not _missing_in(name, candidate):
            return candidate
    return None


def _has_dataset(name: str, dataset_dir: Path) -> bool:
    return file_dir(name, dataset_dir) is not None


def _in_base(base: Path, name: str) -> Path:
    # <base>/<name>/ is the documented layout; files sitting directly in <base> (the flat Debian
    # layout, or a torchvision-style root holding cifar-10-batches-py/) are accepted too
    for candidate in (base / name, base):
        if _has_dataset(name, candidate):
            return candidate
    return base / name


def resolve_root(name: str, root: str | None) -> Path:
    """The dataset folder: explicit ``root``, then ``$SEMFL_DATA``, then (Fashion-MNIST) the
    Debian package's folder if it holds the files, else ``./data``.

    Under a root the dataset lives in ``<root>/<name>/``; files directly in ``<root>`` also count.
    When nothing is found the returned folder is where a download will put the files.
    """
    name = canonical_name(name)
    if root:  # "" from a config file means unset
        return _in_base(Path(root).expanduser().absolute(), name)
    env = os.environ.get("SEMFL_DATA")
    if env:
        return _in_base(Path(env).expanduser().absolute(), name)
    if name == "fashion-mnist" and _has_dataset(name, Path(DEBIAN_FASHION_MNIST)):
        return Path(DEBIAN_FASHION_MNIST)
    return _in_base(Path.cwd() / "data", name)


def missing_message(name: str, dataset_dir: Path, download_failed: str | None = None) -> str:
    sub, _, _ = LAYOUTS[name]
    target = dataset_dir / sub if sub else dataset_dir
    missing = _missing_in(name, target)
    lines = [f"{name}: missing {', '.join(missing)} in {target}"]
    if download_failed:
        lines.append(f"download failed: {download_failed}")
    lines.append("to get them:")
    if name == "fashion-mnist":
        lines.append(f"  - `apt-get install dataset-fashion-mnist` (installs to {DEBIAN_FASHION_MNIST})")
    lines.append("  - put the files in a folder and pass `--set data.root=DIR` (or set $SEMFL_DATA=DIR);"
                 f" they are looked for in DIR/{name}/ and DIR/")
    if not download_failed:
        lines.append("  - or allow the download (`--set data.download=true`, needs a network)")
    return "\n".join(lines)


# ---------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.dtype(np.uint8)}  # the only type MNIST-style files use


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path} is not a valid gzip file (truncated or corrupt: {exc})") from exc


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Decode one IDX file into a uint8 array with ``ndim`` dimensions; DataError names ``path``."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic {data[:4].hex() or 'empty'})")
    dtype = _IDX_DTYPES.get(data[2])
    if dtype is None:
        raise DataError(f"{path}: unsupported IDX element type 0x{data[2]:02x} (expected 0x08 uint8)")
    if data[3] != ndim:
        raise DataError(f"{path}: IDX file has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: header says shape {shape} ({expected} data bytes) "
                        f"but the file has {len(data) - header} (truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _to_images(array: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]; one vectorised copy."""
    out = array.astype(np.float32)
    np.divide(out, np.float32(255.0), out=out)
    return torch.from_numpy(out)


def _to_labels(labels: np.ndarray, num_classes: int, path: Path, n_images: int, image_path: Path) -> torch.Tensor:
    if labels.shape[0] != n_images:
        raise DataError(f"{path} has {labels.shape[0]} labels but {image_path} has {n_images} images")
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(f"{path}: label {int(labels.max())} out of range for {num_classes} classes")
    return torch.from_numpy(labels.astype(np.int64))


def _load_idx(name: str, directory: Path) -> ImageDataset:
    num_classes = LAYOUTS[name][2]
    splits = []
    for prefix in ("train", "t10k"):
        img_path = _idx_path(directory, f"{prefix}-images-idx3-ubyte")
        lab_path = _idx_path(directory, f"{prefix}-labels-idx1-ubyte")
        assert img_path is not None and lab_path is not None  # file_dir() checked
        images = read_idx(img_path, 3)
        labels = read_idx(lab_path, 1)
        x = _to_images(images[:, None, :, :])
        splits.append((x, _to_labels(labels, num_classes, lab_path, images.shape[0], img_path)))
    (train_x, train_y), (test_x, test_y) = splits
    return ImageDataset(name, train_x, train_y, test_x, test_y, num_classes)


# ---------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Only lets a pickle rebuild numpy arrays: the CIFAR files need nothing else, and a tampered
    file then cannot run arbitrary code."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    }
    _NUMPY_FUNCS = {
        "_reconstruct": np.ndarray(0).__reduce__()[0],
        "scalar": np.float64(0).__reduce__()[0],
        "_frombuffer": np.arange(2).__reduce_ex__(5)[0],
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        # numpy 1 pickles say numpy.core.*, numpy 2 pickles numpy._core.*
        if module.startswith(("numpy.core.", "numpy._core.")) and name in self._NUMPY_FUNCS:
            return self._NUMPY_FUNCS[name]
        if module == "numpy.dtypes" and name.endswith("DType"):
            return getattr(__import__("numpy.dtypes", fromlist=[name]), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # unpickling garbage can raise almost anything
        raise DataError(f"{path} is not a valid CIFAR pickle (truncated or corrupt: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise DataError(f"{path}: missing key b'data' or {label_key!r} (keys: {sorted(batch)})")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path} has {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    # rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane -> NCHW as is
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name: str, directory: Path) -> ImageDataset:
    _, files, num_classes = LAYOUTS[name]
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    train = [_cifar_batch(directory / f, label_key, num_classes) for f in files[:-1]]
    test_x, test_y = _cifar_batch(directory / files[-1], label_key, num_classes)
    return ImageDataset(
        name,
        _to_images(np.concatenate([x for x, _ in train])),
        torch.from_numpy(np.concatenate([y for _, y in train])),
        _to_images(test_x),
        torch.from_numpy(test_y),
        num_classes,
    )


# ---------------------------------------------------------------- entry point


def load_dataset(name: str, root: str | None = None, download: bool = True) -> ImageDataset:
    """Load ``name`` (fashion-mnist, mnist, cifar10, cifar100) as float32 NCHW tensors in [0, 1].

    Files are looked up with :func:`resolve_root`; missing ones are downloaded from the official
    mirrors (checksum-verified) when ``download`` is true.
    """
    name = canonical_name(name)
    dataset_dir = resolve_root(name, root)
    directory = file_dir(name, dataset_dir)
    if directory is None:
        if not download:
            raise DataError(missing_message(name, dataset_dir))
        from semfl.data import download as dl  # lazy: download.py imports DataError from here

        try:
            dl.download_dataset(name, dataset_dir)
        except DataError as exc:
            raise DataError(missing_message(name, dataset_dir, download_failed=str(exc))) from exc
        directory = file_dir(name, dataset_dir)
        if directory is None:
            raise DataError(missing_message(name, dataset_dir, download_failed="files still missing afterwards"))
    if LAYOUTS[name][1] is IDX_FILES:
        return _load_idx(name, directory)
    return _load_cifar(name, directory)
