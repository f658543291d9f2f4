"""CIFAR-10/100 and Fashion-MNIST readers, their md5-checked downloads (from a local mirror), and the
on-device crop-and-flip augmentation: on small files written in the standard formats."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bnnzoo.data import (
    CIFAR_ARCHIVES,
    FASHION_MNIST_MD5,
    DataError,
    Dataset,
    download_cifar,
    download_fashion_mnist,
    file_md5,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    random_crop_flip,
)


def _batch(n: int, classes: int, seed: int, cifar100: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, classes, n)]
    if cifar100:
        return {b"data": data, b"fine_labels": labels, b"coarse_labels": [v // 5 for v in labels],
                b"filenames": [b"x.png"] * n, b"batch_label": b"training batch"}
    return {b"data": data, b"labels": labels, b"filenames": [b"x.png"] * n, b"batch_label": b"batch"}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the files were written by Python 2's cPickle


def _fake_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    for k in range(1, 6):
        _write(folder / f"data_batch_{k}", _batch(4, 10, k))
    _write(folder / "test_batch", _batch(3, 10, 9))
    return folder


def _fake_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    _write(folder / "train", _batch(6, 100, 1, cifar100=True))
    _write(folder / "test", _batch(2, 100, 2, cifar100=True))
    return folder


def test_cifar10_reads_the_planes_in_order(tmp_path):
    folder = _fake_cifar10(tmp_path)
    ds = load_cifar(tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.n_train == 20 and ds.n_test == 3
    first = _batch(4, 10, 1)
    # red plane first, then green and blue, each 32x32 row-major; scaled to [0, 1]
    img = ds.x_train[1]
    raw = first[b"data"][1]
    assert img[0, 0, 0] == pytest.approx(raw[0] / 255) and img[0, 0, 31] == pytest.approx(raw[31] / 255)
    assert img[0, 1, 0] == pytest.approx(raw[32] / 255) and img[1, 0, 0] == pytest.approx(raw[1024] / 255)
    assert img[2, 31, 31] == pytest.approx(raw[3071] / 255)
    assert ds.y_train[:4].tolist() == first[b"labels"] and ds.y_train.dtype == torch.int64
    # the batches directory itself, a directory argument and the name with root all agree
    assert torch.equal(load_cifar(folder).x_test, ds.x_test)
    assert torch.equal(load_dataset(str(tmp_path)).x_train, ds.x_train)
    assert torch.equal(load_dataset("cifar-10", root=tmp_path).y_test, ds.y_test)


def test_cifar100_fine_and_coarse_labels(tmp_path):
    _fake_cifar100(tmp_path)
    fine = load_dataset("cifar100", root=tmp_path)
    coarse = load_cifar(tmp_path, num_classes=100, labels="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert torch.equal(coarse.y_train, fine.y_train // 5)
    assert load_dataset(str(tmp_path / "cifar-100-python")).name == "cifar100"
    with pytest.raises(DataError, match="'fine' or 'coarse'"):
        load_cifar(tmp_path, num_classes=100, labels="medium")
    with pytest.raises(DataError, match="10 or 100"):
        load_cifar(tmp_path, num_classes=20)


def test_cifar_bad_files_are_named(tmp_path):
    folder = _fake_cifar10(tmp_path)
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        load_cifar(tmp_path / "elsewhere")
    bad = _batch(4, 10, 3)
    bad[b"labels"][0] = 12
    _write(folder / "data_batch_3", bad)
    with pytest.raises(DataError, match=r"out of range \[0, 10\)"):
        load_cifar(tmp_path)
    _write(folder / "data_batch_3", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    with pytest.raises(DataError, match="data_batch_3: data must be a \\(N, 3072\\) uint8"):
        load_cifar(tmp_path)
    _write(folder / "data_batch_3", {b"data": np.zeros((4, 3072), np.uint8)})
    with pytest.raises(DataError, match="not a CIFAR batch"):
        load_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x02truncated")
    with pytest.raises(DataError, match="cannot read the CIFAR batch"):
        load_cifar(tmp_path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_names_other_code_is_refused(tmp_path, capsys):
    folder = _fake_cifar10(tmp_path)
    _write(folder / "data_batch_2", {b"data": _Payload(), b"labels": [0]})
    with pytest.raises(DataError, match="refusing to load .*print"):
        load_cifar(tmp_path)
    assert "must never run" not in capsys.readouterr().out


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_idx_set(root: Path, n_train: int = 12, n_test: int = 5) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_from_a_directory_and_by_name(tmp_path, monkeypatch):
    root = tmp_path / "fashion-mnist"
    _fake_idx_set(root)
    ds = load_fashion_mnist(root)
    assert ds.name == "fashion-mnist" and ds.n_train == 12 and ds.n_test == 5 and ds.input_shape == (1, 28, 28)
    assert load_dataset(str(root)).name == "fashion-mnist"  # the directory's name says which IDX set
    monkeypatch.setenv("BNNZOO_DATA", str(tmp_path))
    assert torch.equal(load_dataset("fashion-mnist").x_train, ds.x_train)  # found under $BNNZOO_DATA
    assert load_dataset("fashion-mnist", flatten=True).input_shape == (784,)
    monkeypatch.setenv("BNNZOO_DATA", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="Fashion-MNIST is not bundled"):
        load_fashion_mnist(None)


def test_download_fashion_mnist_checks_every_file(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    _fake_idx_set(mirror)
    for name in FASHION_MNIST_MD5:
        monkeypatch.setitem(FASHION_MNIST_MD5, name, file_md5(mirror / name))
    dest = tmp_path / "dest"
    assert download_fashion_mnist(dest, base_url=mirror.as_uri()) == str(dest)
    assert load_fashion_mnist(dest).n_train == 12
    monkeypatch.setitem(FASHION_MNIST_MD5, "t10k-images-idx3-ubyte.gz", "0" * 32)
    with pytest.raises(DataError, match="md5 mismatch for .*t10k-images-idx3-ubyte.gz"):
        download_fashion_mnist(tmp_path / "other", base_url=mirror.as_uri())
    assert not (tmp_path / "other" / "t10k-images-idx3-ubyte.gz").exists()


def _tar(folder: Path, archive: Path, extra: tuple[str, bytes] | None = None) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        if extra is not None:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            tar.addfile(info, io.BytesIO(extra[1]))


def test_download_cifar_unpacks_whole_or_not_at_all(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    folder = _fake_cifar10(tmp_path / "src")
    name, _, unpacked = CIFAR_ARCHIVES[10]
    _tar(folder, mirror / name)
    monkeypatch.setitem(CIFAR_ARCHIVES, 10, (name, file_md5(mirror / name), unpacked))
    dest = tmp_path / "dest"
    path = download_cifar(dest, 10, base_url=mirror.as_uri())
    assert path == str(dest / unpacked)
    assert torch.equal(load_cifar(dest).x_train, load_cifar(folder).x_train)
    assert sorted(p.name for p in dest.iterdir()) == sorted([name, unpacked])  # no staging left behind
    # an archive that escapes its directory is refused by tarfile's data filter, and nothing is left
    evil = tmp_path / "evil"
    evil.mkdir()
    _tar(folder, evil / name, extra=("../../outside.txt", b"x"))
    monkeypatch.setitem(CIFAR_ARCHIVES, 10, (name, file_md5(evil / name), unpacked))
    with pytest.raises(DataError, match="cannot unpack"):
        download_cifar(tmp_path / "dest2", 10, base_url=evil.as_uri())
    assert not (tmp_path / "dest2" / unpacked).exists() and not (tmp_path / "outside.txt").exists()
    assert [p.name for p in (tmp_path / "dest2").iterdir()] == [name]
    with pytest.raises(DataError, match="10 or 100"):
        download_cifar(dest, 1000)


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) + 1
    out = random_crop_flip(x, generator=gen, padding=2, flip=False)
    gen = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 5, (2, 2), generator=gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        r, c = int(offsets[0, b]), int(offsets[1, b])
        assert torch.equal(out[b], padded[b, :, r:r + 5, c:c + 6])
    assert random_crop_flip(x, padding=0, flip=False) is x


def test_random_crop_flip_statistics_and_determinism():
    x = torch.rand(4000, 1, 4, 4)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(3), padding=0)
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(3), padding=0)
    assert torch.equal(a, b)
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    kept = (a == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert abs(flipped.float().mean().item() - 0.5) < 0.04  # 4.5 standard errors
    # every offset in {0, ..., 2p}^2 occurs, about equally often
    ones = torch.ones(9000, 1, 3, 3)
    out = random_crop_flip(ones, generator=torch.Generator().manual_seed(1), padding=1, flip=False)
    zeros_top = (out[:, 0, 0, :] == 0).all(1).float().mean().item()  # row offset 0: padding row on top
    assert abs(zeros_top - 1 / 3) < 0.03
    with pytest.raises(DataError, match="needs images"):
        random_crop_flip(torch.zeros(3, 4))
    with pytest.raises(DataError, match="padding"):
        random_crop_flip(x, padding=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_crop_flip_stays_on_the_gpu():
    x = torch.rand(8, 3, 32, 32, device="cuda")
    out = random_crop_flip(x, generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.device == x.device and out.shape == x.shape


def _image_task(n: int = 64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (2 * n,), generator=g)
    x = 0.2 * torch.rand(2 * n, 1, 8, 8, generator=g)
    x[torch.arange(2 * n), 0, 2 * y + 1, 3] += 1.0
    return Dataset("toy", "classification", x[:n], y[:n], x[n:], y[n:], num_classes=3)


@pytest.mark.parametrize("name", ["meanfield-vi", "spike-slab-sghmc"])
def test_augment_option_transforms_every_minibatch(name, monkeypatch):
    import bnnzoo
    from bnnzoo.data import augment as augment_module

    seen = []

    def spy(x, generator=None, padding=4, flip=True):
        seen.append(x.shape)
        return random_crop_flip(x, generator, padding, flip)

    monkeypatch.setitem(augment_module.AUGMENTATIONS, "crop-flip", spy)
    data = _image_task()
    options = {"epochs": 4, "batch_size": 16, "network": {"arch": "lenet-300-100"}}
    options.update({"cycles": 2} if name == "spike-slab-sghmc" else {"validation_fraction": None})
    plain = bnnzoo.fit(name, data, progress=False, **options)
    assert seen == []
    augmented = bnnzoo.fit(name, data, progress=False, augment="crop-flip", **options)
    assert len(seen) == 4 * 4 and all(s == (16, 1, 8, 8) for s in seen)  # every step of every epoch
    a = augmented.posterior_mean() if hasattr(augmented, "guide") else next(augmented.draw_weights(1))
    b = plain.posterior_mean() if hasattr(plain, "guide") else next(plain.draw_weights(1))
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])
    again = bnnzoo.fit(name, data, progress=False, augment="crop-flip", **options)
    c = again.posterior_mean() if hasattr(again, "guide") else next(again.draw_weights(1))
    assert torch.equal(a["fc1.weight"], c["fc1.weight"])  # seeded: the crops and flips reproduce


def test_augment_refuses_inputs_that_are_not_images():
    import bnnzoo

    data = load_dataset("boston")
    from bnnzoo.data import Dataset

    fake = Dataset("flat", "classification", data.x_train, (data.y_train > 22).long(), data.x_test,
                   (data.y_test > 22).long(), num_classes=2)
    with pytest.raises(Exception, match="augment='crop-flip' crops and flips images"):
        bnnzoo.fit("meanfield-vi", fake, augment="crop-flip", epochs=1, progress=False)
    with pytest.raises(Exception, match="augment"):
        bnnzoo.create("meanfield-vi", "classification", (1, 8, 8), 3, augment="rotate")
