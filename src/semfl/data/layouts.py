"""Which datasets semfl knows, their names and aliases, and the files each one's folder holds."""
from __future__ import annotations


class DataError(Exception):
    """A dataset cannot be found, downloaded or decoded; the message names the file or value at fault."""


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# canonical name -> (sub-folder holding the files, required files, number of classes)
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR100_FILES = ("train", "test")
LAYOUTS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "fashion-mnist": ("", IDX_FILES, 10),
    "mnist": ("", IDX_FILES, 10),
    "cifar10": ("cifar-10-batches-py", CIFAR10_FILES, 10),
    "cifar100": ("cifar-100-python", CIFAR100_FILES, 100),
}
_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
}


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(LAYOUTS)}")
    return key


# ---------------------------------------------------------------- locating files
