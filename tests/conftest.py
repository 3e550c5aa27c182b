"""Shared fixtures: a small Fashion-MNIST-format dataset with learnable structure, and a tiny run config."""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_data import idx_bytes  # noqa: E402


def structured_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class sets the position and orientation of a bright bar: a classifier can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.normal(30, 10, (n, 28, 28))
    for i, c in enumerate(labels):
        pos = 3 + 2 * (c % 5)
        if c < 5:
            images[i, pos:pos + 4, 4:24] += 200
        else:
            images[i, 4:24, pos:pos + 4] += 200
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_structured_fmnist(root: Path, n_train: int = 800, n_test: int = 200) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = structured_images(n, seed)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))
    return root


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    return write_structured_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def tiny_overrides(fmnist_root, tmp_path) -> list[str]:
    """--set overrides for a seconds-long run on the fixture data."""
    return [f"data.root={fmnist_root}", f"classifier.cache_dir={tmp_path / 'cache'}", "scale=tiny", "users=3",
            "rounds=3", "data.download=false", "data.test_samples=100", "eval.grid_images=4",
            "eval.snr_sweep=[0.0, 10.0]", "train.lr=0.05", "classifier.epochs=3"]


# methods that need a model family other than the default (csc) in the tests that run every method
METHOD_MODELS = {"fedsfr": "vq-jscc"}


def method_overrides(method: str) -> list[str]:
    """``--set`` overrides that select a method, with the model family it needs."""
    return [f"method={method}"] + ([f"model.arch={METHOD_MODELS[method]}"] if method in METHOD_MODELS else [])
