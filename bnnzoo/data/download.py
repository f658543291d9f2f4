"""Download of the four standard MNIST files, with md5 verification."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from .errors import DataError

DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"

MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_URLS: dict[str, str] = {name: DEFAULT_MIRROR + name for name in MNIST_MD5}


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
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


def download_mnist(root: str | os.PathLike, base_url: str = DEFAULT_MIRROR) -> str:
    """Fetch the four standard MNIST files into ``root`` (skipping good copies); returns ``root``."""
    root_path = Path(root).expanduser()
    root_path.mkdir(parents=True, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"
    for name, md5 in MNIST_MD5.items():
        dest = root_path / name
        if dest.is_file() and file_md5(dest) == md5:
            continue
        _fetch(base + name, dest)
        verify_md5(dest, md5, delete=True)
    return str(root_path)
