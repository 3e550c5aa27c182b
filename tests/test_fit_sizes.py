"""Table I sizes are relative volumes: a dataset smaller than their sum gets them scaled to fit."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from semfl.config import load_config
from semfl.data import DataError, fit_sizes
from semfl.runtimes.run import prepare_data

TABLE_I = [1854, 3703, 4429, 4783, 5467, 5634, 5891, 8958, 9281]  # sum 50,000


def test_sizes_that_fit_are_kept_and_larger_ones_scaled_down():
    assert fit_sizes(TABLE_I, 60000) == TABLE_I  # Fashion-MNIST / MNIST: unchanged (existing runs keep their data)
    scaled = fit_sizes(TABLE_I, 8000)  # 8,000 MNIST images: each size * 8000 / 50000, rounded down
    assert scaled == [s * 8000 // 50000 for s in TABLE_I] == [296, 592, 708, 765, 874, 901, 942, 1433, 1484]
    assert sum(scaled) <= 8000
    assert fit_sizes([5, 1000], 10) == [1, 9]  # at least one sample each
    with pytest.raises(DataError, match=r"^data.sizes: 9 users but only 8 training samples; lower users"):
        fit_sizes(TABLE_I, 8)


def test_quickstart_partitions_a_small_dataset(fmnist_root):
    """configs/quickstart.toml (Table I volumes, 5 %) on the 800-image fixture: before, the partition
    stopped with 'sizes sum to 50000 but there are only 800 samples'."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml", [f"data.root={fmnist_root}", "data.download=false", "scale=tiny"])
    _, parts, _ = prepare_data(cfg)
    expected = [math.ceil(0.05 * (s * 800 // 50000)) for s in TABLE_I]
    assert [len(p) for p in parts] == expected
