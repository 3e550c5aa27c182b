"""semfl.data: loading the official formats, verified downloads, user partitions. No network."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import idx_bytes, write_cifar_dataset, write_idx_dataset
from semfl.data import (
    DEBIAN_FASHION_MNIST,
    DataError,
    class_histogram,
    load_dataset,
    partition,
    resolve_root,
)
from semfl.data import download


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("SEMFL_DATA", raising=False)


def _expected_images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32)) / 255.0


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_dataset(tmp_path / "mnist", n_train=50, n_test=20, gz=gz, seed=3)
    ds = load_dataset("mnist", root=str(tmp_path), download=False)
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.train_x.shape == (50, 1, 28, 28) and ds.test_x.shape == (20, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_x.min() == 0.0 and ds.train_x.max() == 1.0
    assert torch.equal(ds.train_x[:, 0], _expected_images(arrays["train_x"]))
    assert torch.equal(ds.test_x[:, 0], _expected_images(arrays["test_x"]))
    assert ds.train_y.tolist() == arrays["train_y"].tolist()
    assert ds.test_y.tolist() == arrays["test_y"].tolist()
    spec = ds.spec
    assert (spec.channels, spec.height, spec.width, spec.num_classes) == (1, 28, 28, 10)


def test_idx_flat_layout_and_other_sizes(tmp_path):
    arrays = write_idx_dataset(tmp_path, n_train=7, n_test=3, gz=True, rows=5, cols=6)
    ds = load_dataset("fashion-mnist", root=str(tmp_path), download=False)
    assert ds.train_x.shape == (7, 1, 5, 6)
    assert torch.equal(ds.train_x[:, 0], _expected_images(arrays["train_x"]))


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_round_trip(tmp_path, name, classes):
    arrays = write_cifar_dataset(tmp_path / name, name, n_per_batch=6, seed=1)
    ds = load_dataset(name, root=str(tmp_path), download=False)
    n_train = 30 if name == "cifar10" else 6
    assert ds.train_x.shape == (n_train, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and ds.test_y.dtype == torch.int64
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
    assert torch.equal(ds.train_x, _expected_images(arrays["train_x"]))
    assert torch.equal(ds.test_x, _expected_images(arrays["test_x"]))
    assert ds.train_y.tolist() == arrays["train_y"].tolist()
    assert ds.test_y.tolist() == arrays["test_y"].tolist()
    assert ds.num_classes == classes and ds.spec.channels == 3


def test_cifar_channel_layout(tmp_path):
    # official rows are R-plane, G-plane, B-plane: pixel (c, h, w) sits at c*1024 + h*32 + w
    arrays = write_cifar_dataset(tmp_path, "cifar10", n_per_batch=2)
    ds = load_dataset("cifar10", root=str(tmp_path), download=False)
    flat = arrays["train_x"].reshape(-1, 3072)
    assert ds.train_x[1, 2, 5, 7] == torch.tensor(flat[1, 2 * 1024 + 5 * 32 + 7] / 255.0, dtype=torch.float32)


def test_truncated_idx_names_file(tmp_path):
    write_idx_dataset(tmp_path, 10, 5, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        load_dataset("mnist", root=str(tmp_path), download=False)
    assert "truncated" in str(err.value)


def test_bad_magic_names_file(tmp_path):
    write_idx_dataset(tmp_path, 10, 5, gz=True)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + bytes(9)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*magic"):
        load_dataset("mnist", root=str(tmp_path), download=False)


@pytest.mark.parametrize("corrupt", ["garbage", "truncated"])
def test_corrupt_gzip_names_file(tmp_path, corrupt):
    write_idx_dataset(tmp_path, 10, 5, gz=True)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bad.read_bytes()
    bad.write_bytes(b"not gzip at all" if corrupt == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*gzip"):
        load_dataset("mnist", root=str(tmp_path), download=False)


def test_label_count_mismatch(tmp_path):
    write_idx_dataset(tmp_path, 10, 5, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(DataError, match="9 labels.*10 images"):
        load_dataset("mnist", root=str(tmp_path), download=False)


def test_corrupt_pickle_names_file(tmp_path):
    write_cifar_dataset(tmp_path, "cifar10", n_per_batch=3)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", root=str(tmp_path), download=False)


def test_pickle_wrong_array_size_names_file(tmp_path):
    import pickle

    write_cifar_dataset(tmp_path, "cifar100", n_per_batch=3)
    bad = tmp_path / "cifar-100-python" / "test"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"fine_labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(DataError, match=r"cifar-100-python/test.*3072"):
        load_dataset("cifar100", root=str(tmp_path), download=False)


def test_pickle_written_by_numpy1(tmp_path):
    # the official files name numpy.core.multiarray (numpy 1); numpy 2 writes numpy._core
    import pickle

    write_cifar_dataset(tmp_path, "cifar100", n_per_batch=3)
    path = tmp_path / "cifar-100-python" / "test"
    data = np.arange(3 * 3072, dtype=np.uint64).astype(np.uint8).reshape(3, 3072)
    raw = pickle.dumps({b"data": data, b"fine_labels": [5, 6, 99]}, protocol=2)
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ds = load_dataset("cifar100", root=str(tmp_path), download=False)
    assert ds.test_y.tolist() == [5, 6, 99]
    assert torch.equal(ds.test_x.reshape(3, 3072), _expected_images(data))


def test_pickle_refuses_code(tmp_path):
    import pickle

    write_cifar_dataset(tmp_path, "cifar100", n_per_batch=3)
    bad = tmp_path / "cifar-100-python" / "train"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match=r"cifar-100-python/train.*refusing"):
        load_dataset("cifar100", root=str(tmp_path), download=False)


def test_missing_files_message(tmp_path):
    write_idx_dataset(tmp_path / "fashion-mnist", 4, 2, gz=True)
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", root=str(tmp_path), download=False)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images" not in msg
    assert str(tmp_path / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.root" in msg and "download" in msg


def test_missing_cifar_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", root=str(tmp_path), download=False)
    msg = str(err.value)
    assert "data_batch_1" in msg and "test_batch" in msg
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in msg
    assert "apt-get" not in msg


def test_unknown_dataset():
    with pytest.raises(DataError, match="imagenet"):
        load_dataset("imagenet", download=False)


def test_resolve_root_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    write_idx_dataset(env / "mnist", 2, 1, gz=True)
    monkeypatch.setenv("SEMFL_DATA", str(env))
    assert resolve_root("mnist", None) == env / "mnist"
    assert resolve_root("mnist", str(explicit)) == explicit / "mnist"  # explicit wins, even when empty
    write_idx_dataset(explicit, 2, 1, gz=False)  # flat layout in the explicit root
    assert resolve_root("mnist", str(explicit)) == explicit
    assert load_dataset("mnist", root=str(explicit), download=False).train_x.shape[0] == 2
    # nothing under the env root yet: that is where a download would go
    assert resolve_root("cifar10", None) == env / "cifar10"
    monkeypatch.delenv("SEMFL_DATA")
    monkeypatch.chdir(tmp_path)
    assert resolve_root("mnist", None) == tmp_path / "data" / "mnist"
    assert resolve_root("mnist", "") == tmp_path / "data" / "mnist"  # empty config value = unset


def test_resolve_root_debian_fallback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = Path(DEBIAN_FASHION_MNIST) if (Path(DEBIAN_FASHION_MNIST) / "train-images-idx3-ubyte.gz").exists() \
        else tmp_path / "data" / "fashion-mnist"
    assert resolve_root("fashion-mnist", None) == expected
    monkeypatch.setenv("SEMFL_DATA", str(tmp_path / "env"))
    assert resolve_root("fashion-mnist", None) == tmp_path / "env" / "fashion-mnist"


@pytest.mark.skipif(not (Path(DEBIAN_FASHION_MNIST) / "train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.shape == (60000,) and set(ds.train_y.unique().tolist()) == set(range(10))
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() == 1.0
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10


# ---------------------------------------------------------------- downloads (offline)


def test_download_file_checksum(tmp_path):
    src = tmp_path / "src" / "payload.gz"
    src.parent.mkdir()
    src.write_bytes(b"some bytes" * 1000)
    dest_dir = tmp_path / "dest"
    with pytest.raises(DataError, match=r"payload\.gz.*checksum") as err:
        download.download_file(src.as_uri(), dest_dir / "payload.gz", "0" * 32)
    assert "0" * 32 in str(err.value)
    assert list(dest_dir.iterdir()) == []  # no partial or temporary file left behind
    out = download.download_file(src.as_uri(), dest_dir / "payload.gz", _md5(src))
    assert out.read_bytes() == src.read_bytes()
    assert [p.name for p in dest_dir.iterdir()] == ["payload.gz"]


def test_download_no_network(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError(OSError("Name or service not known"))

    monkeypatch.setattr(download, "fetch_url", offline)
    with pytest.raises(DataError, match=r"no network: could not download train-images-idx3-ubyte\.gz from http") as err:
        load_dataset("fashion-mnist", root=str(tmp_path), download=True)
    assert str(tmp_path / "fashion-mnist") in str(err.value) and "data.root" in str(err.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def _serve_locally(monkeypatch, name: str, files: list[Path]) -> None:
    """Point the dataset's resources at local file:// URLs with their true checksums."""
    resources = [download.Resource(f.as_uri(), _md5(f)) for f in files]
    monkeypatch.setitem(download.RESOURCES, name, resources)


def test_download_idx_end_to_end(tmp_path, monkeypatch):
    arrays = write_idx_dataset(tmp_path / "mirror", 6, 4, gz=True)
    target = tmp_path / "root" / "mnist"
    write_idx_dataset(target, 6, 4, gz=False)
    (target / "train-images-idx3-ubyte").unlink()  # only this one must be fetched
    _serve_locally(monkeypatch, "mnist", sorted((tmp_path / "mirror").iterdir()))
    fetched = []
    real_fetch = download.fetch_url
    monkeypatch.setattr(download, "fetch_url", lambda url, dest: (fetched.append(url), real_fetch(url, dest)))
    ds = load_dataset("mnist", root=str(tmp_path / "root"), download=True)
    assert [u.rsplit("/", 1)[-1] for u in fetched] == ["train-images-idx3-ubyte.gz"]
    assert torch.equal(ds.train_x[:, 0], _expected_images(arrays["train_x"]))
    fetched.clear()
    load_dataset("mnist", root=str(tmp_path / "root"), download=True)
    assert fetched == []  # present files are never downloaded again


def test_download_cifar_tarball(tmp_path, monkeypatch):
    arrays = write_cifar_dataset(tmp_path / "build", "cifar10", n_per_batch=2)
    tarball = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _serve_locally(monkeypatch, "cifar10", [tarball])
    ds = load_dataset("cifar10", root=str(tmp_path / "root"), download=True)
    assert torch.equal(ds.test_x, _expected_images(arrays["test_x"]))
    root_files = sorted(p.name for p in (tmp_path / "root" / "cifar10").iterdir())
    assert root_files == ["cifar-10-batches-py"]  # tarball and scratch folder removed


def test_extract_refuses_path_traversal(tmp_path):
    tarball = tmp_path / "evil.tar"
    with tarfile.open(tarball, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="evil.tar"):
        download.extract_tar(tarball, out)
    assert not (tmp_path / "escaped.txt").exists() and list(out.iterdir()) == []


def test_official_resources_table():
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100"):
        for res in download.RESOURCES[name]:
            assert len(res.md5) == 32 and int(res.md5, 16) >= 0
            assert res.url.startswith(("http://", "https://"))
    assert download.RESOURCES["cifar10"][0].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# ---------------------------------------------------------------- partitions


def _labels(n=3000, classes=10, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _assert_disjoint_valid(parts, n):
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert len(np.unique(allidx)) == len(allidx)
    assert allidx.min() >= 0 and allidx.max() < n


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_disjoint_cover_deterministic(scheme):
    labels = _labels()
    parts = partition(labels, 10, scheme, seed=1)
    _assert_disjoint_valid(parts, len(labels))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert all(len(p) >= 1 for p in parts)
    again = partition(labels, 10, scheme, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, 10, scheme, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_even_sizes():
    parts = partition(_labels(1003), 10, "iid", seed=0)
    assert sorted({len(p) for p in parts}) == [100, 101]


def test_iid_users_see_the_whole_label_distribution():
    """Each user's labels follow the data's (a split of sorted labels would give each user one or two
    classes): every class present, and each count within 5 sigma of the binomial mean."""
    labels = _labels(6000)
    for sizes in (None, [300, 600, 900, 1200, 1500, 1500]):
        parts = partition(labels, 6, "iid", seed=3, sizes=sizes)
        hist = class_histogram(labels, parts, 10)
        share = np.bincount(labels, minlength=10) / len(labels)
        for row in hist:
            n = row.sum()
            expected, sd = n * share, np.sqrt(n * share * (1 - share))
            assert np.all(np.abs(row - expected) < 5 * sd), row
        assert _mean_entropy(hist) > 0.95 * np.log(10)


def _mean_entropy(hist: np.ndarray) -> float:
    p = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(ent.mean())


def test_dirichlet_alpha_controls_skew():
    labels = _labels(5000)
    skewed = class_histogram(labels, partition(labels, 10, "dirichlet", seed=0, alpha=0.1), 10)
    uniform = class_histogram(labels, partition(labels, 10, "dirichlet", seed=0, alpha=100.0), 10)
    assert _mean_entropy(skewed) < _mean_entropy(uniform) - 0.5
    assert _mean_entropy(uniform) > 0.95 * np.log(10)


def test_dirichlet_impossible_names_alpha():
    with pytest.raises(DataError, match="alpha=0.001"):
        partition(_labels(30), 25, "dirichlet", seed=0, alpha=0.001)


PSFL_SIZES = [1854, 3703, 4429, 4783, 5467, 5634, 5891, 8958, 9281]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "ways_shots"])
def test_sizes_respected(scheme):
    labels = _labels(60000)
    parts = partition(labels, 9, scheme, seed=4, sizes=PSFL_SIZES, alpha=0.5, ways=5, num_classes=10)
    assert [len(p) for p in parts] == PSFL_SIZES
    _assert_disjoint_valid(parts, len(labels))
    if scheme == "ways_shots":  # sizes or not, each user holds ways ± sigma classes (sigma 1 by default)
        classes = (class_histogram(labels, parts, 10) > 0).sum(1)
        assert np.all((classes >= 4) & (classes <= 6)), classes


def test_dirichlet_sizes_skew_and_availability():
    labels = _labels(2000)
    sizes = [400, 400, 400, 400, 399]  # 1999 of 2000: classes run out, shortfall goes elsewhere
    parts = partition(labels, 5, "dirichlet", seed=0, sizes=sizes, alpha=0.1)
    assert [len(p) for p in parts] == sizes
    _assert_disjoint_valid(parts, len(labels))
    small = partition(labels, 5, "dirichlet", seed=0, sizes=[100] * 5, alpha=0.1)
    large = partition(labels, 5, "dirichlet", seed=0, sizes=[100] * 5, alpha=100.0)
    assert _mean_entropy(class_histogram(labels, small, 10)) < _mean_entropy(class_histogram(labels, large, 10))


def test_sizes_errors():
    with pytest.raises(DataError, match="3001"):
        partition(_labels(3000), 2, "iid", seed=0, sizes=[3000, 1])
    with pytest.raises(DataError, match="num_users=3"):
        partition(_labels(3000), 3, "dirichlet", seed=0, sizes=[1, 2])


def test_ways_shots():
    labels = _labels(6000)
    ways, shots, sigma = 3, 40, 2
    parts = partition(labels, 20, "ways_shots", seed=0, ways=ways, shots=shots, sigma=sigma)
    _assert_disjoint_valid(parts, len(labels))
    hist = class_histogram(labels, parts, 10)
    for row in hist:
        present = row[row > 0]
        assert max(2, ways - sigma) <= len(present) <= ways + sigma
        assert np.all((present >= shots - sigma) & (present <= shots + sigma))
    again = partition(labels, 20, "ways_shots", seed=0, ways=ways, shots=shots, sigma=sigma)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_ways_shots_caps_the_spread_refuses_too_many_ways_and_runs_out_clearly():
    labels = _labels(600, classes=4)
    parts = partition(labels, 3, "ways_shots", seed=0, ways=4, shots=5, sigma=1)
    assert all(len(np.unique(labels[p])) in (3, 4) for p in parts)  # ways + sigma capped at num_classes
    with pytest.raises(DataError, match=r"^data.ways: 6 classes per user, but the dataset has 4"):
        partition(labels, 3, "ways_shots", seed=0, ways=6, shots=5, sigma=1)
    with pytest.raises(DataError, match="ways_shots: user .* lower shots"):
        partition(labels, 50, "ways_shots", seed=0, ways=3, shots=20, sigma=0)


def test_class_histogram_sums():
    labels = _labels()
    parts = partition(labels, 7, "dirichlet", seed=3, alpha=0.3)
    hist = class_histogram(labels, parts, 10)
    assert hist.shape == (7, 10)
    assert hist.sum(axis=1).tolist() == [len(p) for p in parts]
    assert hist.sum(axis=0).tolist() == np.bincount(labels, minlength=10).tolist()


def test_partition_bad_arguments():
    with pytest.raises(DataError, match="scheme 'pathological'"):
        partition(_labels(), 3, "pathological", seed=0)
    with pytest.raises(DataError, match="num_classes=5"):
        partition(_labels(), 3, "iid", seed=0, num_classes=5)
