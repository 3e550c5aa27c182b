"""Datasets (official file formats, verified downloads) and federated user partitions."""
from semfl.data.partition import class_histogram, fit_sizes, partition
from semfl.data.sources import (
    DEBIAN_FASHION_MNIST,
    DataError,
    ImageDataset,
    load_dataset,
    resolve_root,
)

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DataError",
    "ImageDataset",
    "class_histogram",
    "fit_sizes",
    "load_dataset",
    "partition",
    "resolve_root",
]
