"""Checksum-verified downloads from the datasets' official locations.

A file is fetched to a temporary name next to its destination, its MD5 checked, and only then
renamed into place, so an interrupted or tampered download never looks like a dataset.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from semfl.data.layouts import IDX_FILES, LAYOUTS, DataError, canonical_name


@dataclass(frozen=True)
class Resource:
    url: str
    md5: str  # of the file as published (the .gz / .tar.gz)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

# MD5s as published with the datasets (the same ones torchvision checks)
RESOURCES: dict[str, list[Resource]] = {
    "fashion-mnist": [
        Resource(FASHION_MNIST_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        Resource(FASHION_MNIST_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        Resource(FASHION_MNIST_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        Resource(FASHION_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ],
    "mnist": [
        Resource(MNIST_URL + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        Resource(MNIST_URL + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        Resource(MNIST_URL + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        Resource(MNIST_URL + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ],
    "cifar10": [Resource(CIFAR_URL + "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
    "cifar100": [Resource(CIFAR_URL + "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")],
}

TIMEOUT_S = 60.0


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_url(url: str, dest: Path) -> None:
    """Copy ``url`` to ``dest``. Module-level so tests can replace it and stay offline."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def download_file(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` to ``dest`` if its MD5 is ``md5``; otherwise DataError and nothing left behind."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DataError(f"cannot write to {dest.parent} to download {dest.name}: {exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            fetch_url(url, tmp)
        except urllib.error.HTTPError as exc:  # the server answered: not a network problem
            raise DataError(f"could not download {dest.name} from {url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(f"no network: could not download {dest.name} from {url} ({reason}); "
                            f"put the files in {dest.parent} or set data.root") from exc
        except OSError as exc:
            raise DataError(f"could not download {dest.name} from {url} to {dest.parent}: {exc}") from exc
        got = md5sum(tmp)
        if got != md5.lower():
            raise DataError(f"checksum mismatch for {dest.name} from {url}: md5 {got}, expected {md5}; "
                            "the download was discarded")
        os.replace(tmp, dest)  # atomic on one filesystem: dest is either absent or complete
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def extract_tar(archive: Path, directory: Path) -> None:
    """Unpack ``archive`` into ``directory``: members go to a scratch folder first and each
    top-level entry is renamed into place, so a failed extraction leaves no half dataset."""
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=directory))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(scratch, filter="data")  # 'data' refuses absolute paths, .., devices
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"cannot extract {archive}: {exc}") from exc
        for entry in scratch.iterdir():
            target = directory / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def download_dataset(name: str, dataset_dir: Path) -> None:
    """Fetch whatever of ``name`` is missing from ``dataset_dir`` (IDX: the .gz files; CIFAR: the
    tarball, unpacked into ``dataset_dir`` and then deleted)."""
    name = canonical_name(name)
    dataset_dir = Path(dataset_dir)
    for res in RESOURCES[name]:
        if LAYOUTS[name][1] is IDX_FILES:
            stem = res.filename.removesuffix(".gz")
            if (dataset_dir / stem).is_file() or (dataset_dir / res.filename).is_file():
                continue
            download_file(res.url, dataset_dir / res.filename, res.md5)
        else:
            archive = download_file(res.url, dataset_dir / res.filename, res.md5)
            try:
                extract_tar(archive, dataset_dir)
            finally:
                archive.unlink(missing_ok=True)
