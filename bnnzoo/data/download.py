"""Downloads of the standard image sets, each file checked against its published md5.

Every file is fetched into ``<name>.part`` and renamed only once complete; a file whose md5 does
not match is deleted and named in a :class:`DataError`. Good copies already present are kept (no
network). Archives (CIFAR) are unpacked into a temporary directory next to their destination and
renamed into place once whole, with :mod:`tarfile`'s ``"data"`` filter (no absolute paths, links or
device files out of the archive). Nothing here runs in the tests against the network: they point
``base_url`` at a local directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from .errors import DataError

DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR_MIRROR = "https://www.cs.toronto.edu/~kriz/"

MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_URLS: dict[str, str] = {name: DEFAULT_MIRROR + name for name in MNIST_MD5}

#: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): the same four IDX file names as MNIST
FASHION_MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

#: CIFAR-10 / CIFAR-100 (Krizhevsky 2009), python version: archive, its md5, the directory it holds
CIFAR_ARCHIVES: dict[int, tuple[str, str, str]] = {
    10: ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    100: ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str, delete: bool = True) -> None:
    """Raise :class:`DataError` (deleting the file when ``delete``) if its md5 is not ``expected``."""
    got = file_md5(path)
    if got != expected:
        if delete:
            Path(path).unlink(missing_ok=True)
        raise DataError(
            f"md5 mismatch for {path}: got {got}, expected {expected}"
            + (" (the file was deleted)" if delete else "")
        )


def _fetch(url: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    try:
        urllib.request.urlretrieve(url, tmp)
    except OSError as exc:  # URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed: {exc}") from exc
    tmp.replace(dest)


def download_files(root: str | os.PathLike, base_url: str, md5s: dict[str, str]) -> Path:
    """Fetch every ``name`` of ``md5s`` from ``base_url + name`` into ``root`` and check its md5,
    skipping good copies; returns ``root``."""
    root_path = Path(root).expanduser()
    root_path.mkdir(parents=True, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"
    for name, md5 in md5s.items():
        dest = root_path / name
        if dest.is_file() and file_md5(dest) == md5:
            continue
        _fetch(base + name, dest)
        verify_md5(dest, md5, delete=True)
    return root_path


def download_mnist(root: str | os.PathLike, base_url: str = DEFAULT_MIRROR) -> str:
    """Fetch the four standard MNIST files into ``root`` (skipping good copies); returns ``root``."""
    return str(download_files(root, base_url, MNIST_MD5))


def download_fashion_mnist(root: str | os.PathLike, base_url: str = FASHION_MNIST_MIRROR) -> str:
    """Fetch the four Fashion-MNIST IDX files into ``root`` (skipping good copies); returns ``root``,
    which :func:`~bnnzoo.data.load_fashion_mnist` then reads."""
    return str(download_files(root, base_url, FASHION_MNIST_MD5))


def download_cifar(root: str | os.PathLike, num_classes: int = 10, base_url: str = CIFAR_MIRROR) -> str:
    """Fetch and unpack CIFAR-10 or CIFAR-100 (python version) under ``root``; returns the unpacked
    directory (``root/cifar-10-batches-py`` or ``root/cifar-100-python``), which
    :func:`~bnnzoo.data.load_cifar` reads. An existing unpacked directory is kept as it is."""
    if num_classes not in CIFAR_ARCHIVES:
        raise DataError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes!r}")
    archive, md5, folder = CIFAR_ARCHIVES[num_classes]
    root_path = download_files(root, base_url, {archive: md5})
    target = root_path / folder
    if target.is_dir():
        return str(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root_path))
    try:
        try:
            with tarfile.open(root_path / archive, "r:gz") as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"cannot unpack {root_path / archive}: {exc}") from exc
        unpacked = staging / folder
        if not unpacked.is_dir():
            raise DataError(f"{root_path / archive} does not hold the directory {folder}/")
        unpacked.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
