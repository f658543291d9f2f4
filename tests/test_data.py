"""Tests of bnnzoo.data: the bundled sets, the loaders' error messages, and the synthetic teacher."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import bnnzoo.data as data_package
from bnnzoo.data import (
    DATASETS,
    MNIST_MD5,
    MNIST_URLS,
    UCI_SETS,
    DataError,
    Dataset,
    bundled_dir,
    download_mnist,
    file_md5,
    load_dataset,
    load_mnist,
    load_uci,
    make_sparse_teacher,
    mnist_files,
    uci_num_splits,
    validate_arrays,
    verify_md5,
)

BOSTON = bundled_dir("boston")
MNIST = bundled_dir("mnist")


# ---------------------------------------------------------------- helpers


def _ints(path: Path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.int64, ndmin=1)


@pytest.fixture
def boston_copy(tmp_path) -> Path:
    """A writable copy of the bundled Boston set."""
    dest = tmp_path / "bostonHousing"
    shutil.copytree(BOSTON, dest)
    return dest


def _write_idx(path: Path, arr: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    arr = np.asarray(arr, dtype=np.uint8)
    magic = (0x08 << 8 | arr.ndim) if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    if gz:
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def _fake_mnist(root: Path, prefix: str, n: int, labels=None, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    _write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)), gz=gz)
    labels = np.arange(n) % 10 if labels is None else labels
    _write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz=gz)


# ---------------------------------------------------------------- bundled Boston / UCI format


def test_bundled_boston_matches_files():
    raw = np.loadtxt(BOSTON / "data.txt")
    assert raw.shape == (506, 14)
    assert uci_num_splits("boston") == 20
    for split in range(20):
        ds = load_uci("boston", split=split)
        train, test = _ints(BOSTON / f"index_train_{split}.txt"), _ints(BOSTON / f"index_test_{split}.txt")
        assert ds.x_train.shape == (len(train), 13) and ds.x_test.shape == (len(test), 13)
        assert ds.n_train + ds.n_test == 506
        assert not set(train.tolist()) & set(test.tolist())
        assert ds.split == split
        # the rows of the data file behind each example, for matching examples across splits
        assert ds.meta["train_rows"] == train.tolist() and ds.meta["test_rows"] == test.tolist()
        np.testing.assert_allclose(ds.y_test.numpy(), raw[ds.meta["test_rows"], 13].astype(np.float32))
        # raw values, in file order of the index files
        np.testing.assert_allclose(ds.x_train.numpy(), raw[train, :13].astype(np.float32))
        np.testing.assert_allclose(ds.y_test.numpy(), raw[test, 13].astype(np.float32))


def test_boston_dataset_fields():
    ds = load_dataset()
    assert ds.name == "boston" and ds.task == "regression" and ds.split == 0
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.float32
    assert ds.y_train.dim() == 1
    assert ds.input_shape == (13,) and ds.output_dim == 1 and ds.num_classes is None
    assert 20 < float(ds.y_train.mean()) < 25  # not standardised (median house value in $1000s)
    assert ds.meta["n_hidden"] == 50 and ds.meta["n_epochs"] == 40
    assert Path(ds.source) == BOSTON
    assert torch.equal(ds.x_test, load_uci("bostonHousing").x_test)  # directory name works too
    assert UCI_SETS["boston"] == "bostonHousing" and UCI_SETS["protein"] == "protein-tertiary-structure"


def test_uci_directory_and_root_lookup(boston_copy, tmp_path, monkeypatch):
    via_dir = load_dataset(str(boston_copy), split=3)
    assert torch.equal(via_dir.x_train, load_uci("boston", split=3).x_train)
    # a named set under root/uci/<dir>, root/<dir>, $BNNZOO_DATA and a shared/data walk-up
    shutil.copytree(boston_copy, tmp_path / "r1" / "uci" / "yacht")
    shutil.copytree(boston_copy, tmp_path / "r2" / "concrete")
    shutil.copytree(boston_copy, tmp_path / "repo" / "shared" / "data" / "uci" / "energy")
    assert load_uci("yacht", root=tmp_path / "r1").source == str(tmp_path / "r1" / "uci" / "yacht")
    assert load_uci("concrete", root=str(tmp_path / "r2")).n_test == 51
    monkeypatch.setenv("BNNZOO_DATA", str(tmp_path / "r1"))
    assert load_dataset("yacht").source == str(tmp_path / "r1" / "uci" / "yacht")
    monkeypatch.delenv("BNNZOO_DATA")
    sub = tmp_path / "repo" / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    ds = load_uci("energy")
    assert ds.source == str(tmp_path / "repo" / "shared" / "data" / "uci" / "energy") and ds.name == "energy"
    with pytest.raises(DataError, match="not found") as err:
        load_uci("wine", root=tmp_path / "r2")
    assert str(tmp_path / "r2" / "wine-quality-red") in str(err.value)


def test_uci_nan_names_file_and_line(boston_copy):
    lines = (boston_copy / "data.txt").read_text().splitlines()
    fields = lines[6].split()
    fields[2] = "nan"
    lines[6] = " ".join(fields)
    (boston_copy / "data.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_uci(boston_copy)
    msg = str(err.value)
    assert "data.txt" in msg and str(boston_copy) in msg and "line 7" in msg and "column 3" in msg


def test_uci_malformed_rows(boston_copy):
    data = boston_copy / "data.txt"
    lines = data.read_text().splitlines()
    ragged = lines[:]
    ragged[9] = " ".join(ragged[9].split()[:-1])
    data.write_text("\n".join(ragged))
    with pytest.raises(DataError, match=r"line 10: malformed row, expected 14 columns, got 13"):
        load_uci(boston_copy)
    bad = lines[:]
    bad[0] = bad[0].replace("18.00", "abc")
    data.write_text("\n".join(bad))
    with pytest.raises(DataError, match=r"line 1, column 2: 'abc' is not a number"):
        load_uci(boston_copy)


def test_uci_missing_file_names_path(boston_copy):
    (boston_copy / "index_test_4.txt").unlink()
    assert load_uci(boston_copy, split=3).n_test == 51  # other splits still load
    with pytest.raises(DataError, match="missing file") as err:
        load_uci(boston_copy, split=4)
    assert str(boston_copy / "index_test_4.txt") in str(err.value)
    (boston_copy / "data.txt").unlink()
    with pytest.raises(DataError, match="missing file") as err:
        load_uci(boston_copy)
    assert str(boston_copy / "data.txt") in str(err.value)
    with pytest.raises(DataError, match="not found") as err:
        load_dataset(str(boston_copy / "nowhere"))
    assert str(boston_copy / "nowhere") in str(err.value)


def test_uci_bad_indices(boston_copy):
    (boston_copy / "index_train_0.txt").write_text("0\n1\n999\n")
    with pytest.raises(DataError, match=r"index_train_0.txt line 3: row index 999 is out of range \[0, 506\)"):
        load_uci(boston_copy, split=0)
    (boston_copy / "index_train_1.txt").write_text("0\n1\n2\n")
    (boston_copy / "index_test_1.txt").write_text("2\n3\n")
    with pytest.raises(DataError, match="share 1 rows"):
        load_uci(boston_copy, split=1)
    (boston_copy / "index_train_2.txt").write_text("0\n1.5\n")
    with pytest.raises(DataError, match="'1.5' is not an integer row index"):
        load_uci(boston_copy, split=2)


def test_uci_split_out_of_range():
    with pytest.raises(DataError, match=r"split 20 is out of range for boston: it has 20 splits \(0..19\)"):
        load_uci("boston", split=20)
    with pytest.raises(DataError, match="20 splits"):
        load_dataset("boston", split=-1)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(DataError, match="Did you mean 'boston'") as err:
        load_dataset("bostn")
    assert "sparse-teacher" in str(err.value)  # lists what is known
    with pytest.raises(DataError, match="'boston'"):
        load_uci("bostn")
    with pytest.raises(DataError, match="'mnist'"):
        load_dataset("mnsit")
    with pytest.raises(DataError, match="'cifar10'"):
        load_dataset("cifar1O")
    assert DATASETS == ["boston", "concrete", "energy", "yacht", "wine", "protein", "mnist", "fashion-mnist",
                        "cifar10", "cifar100", "sparse-teacher"]


# ---------------------------------------------------------------- MNIST


def test_bundled_mnist():
    ds = load_mnist()
    assert ds.task == "classification" and ds.num_classes == 10 and ds.output_dim == 10
    assert ds.x_train.shape == (5000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [500] * 10
    assert set(torch.unique(ds.y_test).tolist()) == set(range(10))
    for x in (ds.x_train, ds.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert ds.input_shape == (1, 28, 28)
    flat = load_dataset("mnist", flatten=True)
    assert flat.x_test.shape == (10000, 784)
    assert torch.equal(flat.x_test, ds.x_test.reshape(10000, -1))


def test_mnist_from_directory_gz_and_plain(tmp_path):
    gz_dir, plain_dir = tmp_path / "gz", tmp_path / "plain"
    shutil.copytree(MNIST, gz_dir)
    plain_dir.mkdir()
    for f in MNIST.glob("*.gz"):
        (plain_dir / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    ref = load_mnist()
    assert sorted(mnist_files(plain_dir)) == ["t10k", "train5k"]
    assert mnist_files(gz_dir)["t10k"]["labels"].name == "t10k-labels-idx1-ubyte.gz"
    for d in (gz_dir, plain_dir):
        ds = load_dataset(str(d))
        assert ds.source == str(d)
        assert torch.equal(ds.x_train, ref.x_train) and torch.equal(ds.y_test, ref.y_test)


def test_mnist_full_train_prefix(tmp_path):
    _fake_mnist(tmp_path, "train", 30, gz=True)
    _fake_mnist(tmp_path, "t10k", 20)
    ds = load_mnist(tmp_path, train="train")
    assert (ds.n_train, ds.n_test) == (30, 20)
    assert load_dataset("mnist", root=tmp_path).n_train == 30  # full set picked when present
    with pytest.raises(DataError, match="missing file") as err:
        load_mnist(tmp_path)  # default train5k is absent here
    assert str(tmp_path / "train5k-images-idx3-ubyte.gz") in str(err.value)


def test_mnist_bad_files(tmp_path):
    _fake_mnist(tmp_path, "t10k", 20)
    _fake_mnist(tmp_path, "train5k", 20, labels=np.full(20, 12))
    with pytest.raises(DataError, match=r"train5k-labels-idx1-ubyte: 20 labels out of range \[0, 10\)"):
        load_mnist(tmp_path)
    _write_idx(tmp_path / "train5k-labels-idx1-ubyte", np.zeros(19))
    with pytest.raises(DataError, match="holds 20 images but .*train5k-labels-idx1-ubyte holds 19 labels"):
        load_mnist(tmp_path)
    _write_idx(tmp_path / "train5k-labels-idx1-ubyte", np.zeros(20), magic=0x0803)
    with pytest.raises(DataError, match="train5k-labels-idx1-ubyte: bad magic number 0x00000803"):
        load_mnist(tmp_path)
    labels = tmp_path / "train5k-labels-idx1-ubyte"
    labels.write_bytes(_write_idx(labels, np.zeros(20)).read_bytes()[:-3])
    with pytest.raises(DataError, match="train5k-labels-idx1-ubyte: size mismatch"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"not gzip")
    (tmp_path / "t10k-images-idx3-ubyte").rename(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="cannot read .*t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, train="t10k")


# ---------------------------------------------------------------- download md5


def test_md5_constants():
    assert set(MNIST_MD5) == set(MNIST_URLS) and len(MNIST_MD5) == 4
    assert MNIST_MD5["t10k-images-idx3-ubyte.gz"] == "9fb629c4189551a2d022fa330f9573f3"
    assert MNIST_MD5["train-labels-idx1-ubyte.gz"] == "d53e105ee54ea40749a09fcbcd1e9432"
    assert file_md5(MNIST / "t10k-labels-idx1-ubyte.gz") == MNIST_MD5["t10k-labels-idx1-ubyte.gz"]


def test_download_verifies_md5(tmp_path, monkeypatch):
    src, dest = tmp_path / "mirror", tmp_path / "dest"
    src.mkdir()
    for i, name in enumerate(MNIST_MD5):
        (src / name).write_bytes(f"fake {i}".encode())
        monkeypatch.setitem(MNIST_MD5, name, file_md5(src / name))
    corrupt = "t10k-images-idx3-ubyte.gz"
    good_md5 = MNIST_MD5[corrupt]
    (src / corrupt).write_bytes(b"corrupted")
    with pytest.raises(DataError, match="md5 mismatch") as err:
        download_mnist(str(dest), base_url=src.as_uri())
    assert corrupt in str(err.value)
    assert not (dest / corrupt).exists()  # the bad file was deleted
    (src / corrupt).write_bytes(b"fake 2")
    assert file_md5(src / corrupt) == good_md5
    assert download_mnist(str(dest), base_url=src.as_uri() + "/") == str(dest)
    assert all(file_md5(dest / n) == m for n, m in MNIST_MD5.items())
    # good copies are kept: a dead mirror is never contacted
    assert download_mnist(str(dest), base_url=(tmp_path / "gone").as_uri()) == str(dest)
    with pytest.raises(DataError, match="md5 mismatch"):
        verify_md5(dest / corrupt, "0" * 32, delete=False)
    assert (dest / corrupt).exists()


# ---------------------------------------------------------------- validate_arrays and Dataset


def test_validate_arrays_converts():
    x, y = validate_arrays(np.ones((4, 3)), np.arange(4.0).reshape(4, 1), "regression")
    assert x.dtype == torch.float32 and y.dtype == torch.float32 and y.shape == (4,)
    x, y = validate_arrays(torch.zeros(5, 2, dtype=torch.float64), np.array([0, 1, 2, 1, 0.0]), "classification", 3)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 1, 0]


@pytest.mark.parametrize(
    "x, y, task, k, pattern",
    [
        (np.ones((4, 2)), np.ones(3), "regression", None, "x has 4 rows but y has 3"),
        (
            np.array([[1, np.nan], [np.nan, 0], [1, 1]]),
            np.ones(3),
            "regression",
            None,
            r"x contains NaN in 2 of 3 rows \(first rows: \[0, 1\]\)",
        ),
        (np.ones((3, 2)), np.array([1.0, np.inf, 2]), "regression", None, r"y contains inf in 1 of 3 rows"),
        (np.ones((3, 2)), np.ones((3, 2)), "regression", None, r"regression y must have shape \(N,\) or \(N, 1\)"),
        (np.ones((3, 2)), np.array([0, 1.5, 2]), "classification", 3, "class labels must be integers.*row 1"),
        (np.ones((3, 2)), np.array([0, 1, 5]), "classification", 3, r"out of range \[0, 3\).*row 2 = 5"),
        (np.ones((3, 2)), np.array([0, -1, 1]), "classification", None, "out of range"),
        (np.ones((3, 2)), np.ones((3, 1), dtype=int), "classification", 3, "1-D integer labels"),
        (np.ones((0, 2)), np.ones(0), "regression", None, "empty data"),
        (np.ones(3), np.ones(3), "regression", None, "reshape"),
        (np.ones((3, 2)), np.ones(3), "ranking", None, "unknown task 'ranking'"),
        (np.array([["a", "b"]]), np.ones(1), "regression", None, "must be numeric"),
    ],
)
def test_validate_arrays_errors(x, y, task, k, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        validate_arrays(x, y, task, num_classes=k, what="my set")
    assert str(err.value).startswith("my set: ")


def test_dataset_to_subset_and_checks():
    ds = load_dataset("boston", split=2)
    small = ds.subset(n_train=50, n_test=10, seed=1)
    assert (small.n_train, small.n_test) == (50, 10) and small.split == 2 and small.name == "boston"
    assert torch.equal(small.x_train, ds.subset(50, 10, seed=1).x_train)
    assert not torch.equal(small.x_train, ds.subset(50, 10, seed=2).x_train)
    rows = {tuple(r) for r in ds.x_train.tolist()}
    assert all(tuple(r) in rows for r in small.x_train.tolist())
    # x and y rows stay paired
    pos = {tuple(r): float(t) for r, t in zip(ds.x_train.tolist(), ds.y_train.tolist())}
    assert all(pos[tuple(r)] == float(t) for r, t in zip(small.x_train.tolist(), small.y_train.tolist()))
    assert ds.subset(n_train=10_000).n_train == ds.n_train and ds.subset(n_test=5).n_train == ds.n_train
    with pytest.raises(DataError, match="n_train"):
        ds.subset(n_train=0)
    moved = ds.to("cpu")
    assert moved is not ds and torch.equal(moved.y_test, ds.y_test) and moved.x_train.device.type == "cpu"
    assert "train=455" in repr(ds)
    with pytest.raises(DataError, match="x_train has 3 rows but y_train has 2"):
        Dataset("t", "regression", torch.zeros(3, 1), torch.zeros(2), torch.zeros(1, 1), torch.zeros(1))
    with pytest.raises(DataError, match="unknown task"):
        Dataset("t", "clustering", torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, 1), torch.zeros(1))


def test_bundled_dir_inside_package():
    assert BOSTON.is_dir() and MNIST.is_dir()
    assert BOSTON.resolve().parent.parent == Path(data_package.__file__).resolve().parent


# ---------------------------------------------------------------- sparse teacher


def test_sparse_teacher_shapes_and_determinism():
    kw = dict(n_train=300, n_test=40, n_features=50, n_relevant=5, seed=3)
    a, b = make_sparse_teacher(**kw), make_sparse_teacher(**kw)
    assert a.x_train.shape == (300, 50) and a.y_train.shape == (300,) and a.x_test.shape == (40, 50)
    assert a.task == "regression" and a.name == "sparse-teacher" and a.input_shape == (50,)
    assert a.relevant_features == [0, 1, 2, 3, 4]
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    c = make_sparse_teacher(**{**kw, "seed": 4})
    assert not torch.equal(a.y_train, c.y_train)
    d = load_dataset("sparse-teacher", **kw)
    assert torch.equal(d.y_test, a.y_test)


def test_sparse_teacher_only_relevant_features_matter():
    ds = make_sparse_teacher(n_train=2000, n_test=10, n_features=30, n_relevant=4, seed=0)
    teacher, x = ds.meta["teacher"], ds.x_train
    f = teacher(x)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    for col in range(30):
        xp = x.clone()
        xp[:, col] = x[perm, col]
        changed = not torch.allclose(teacher(xp), f)
        assert changed == (col in ds.relevant_features), col
    assert torch.equal(teacher.weights[0][:, 4:], torch.zeros(5, 26))


def test_sparse_teacher_noise_and_signal():
    ds = make_sparse_teacher(n_train=8000, n_test=10, n_features=20, noise_var=0.5, seed=1)
    f = ds.meta["teacher"](ds.x_train)
    assert abs(float((ds.y_train - f).var()) - 0.5) < 0.05
    assert abs(float(f.var()) - 2.0) < 0.3  # signal var = 4 x noise var by default
    clean = make_sparse_teacher(n_train=50, n_test=10, n_features=20, noise_var=0.0, activation="tanh")
    assert torch.allclose(clean.y_train, clean.meta["teacher"](clean.x_train))
    with pytest.raises(DataError, match="n_relevant=30 exceeds n_features=20"):
        make_sparse_teacher(n_features=20, n_relevant=30)
    with pytest.raises(DataError, match="activation"):
        make_sparse_teacher(n_features=20, activation="gelu")


def test_validation_split_carves_the_training_part_and_never_touches_the_test_part():
    data = load_uci("boston", split=3)
    val = data.validation_split(0.2, seed=1)
    assert val.n_train + val.n_test == data.n_train and val.n_test == round(0.2 * data.n_train)
    train_rows = {tuple(r) for r in data.x_train.tolist()}
    test_rows = {tuple(r) for r in data.x_test.tolist()}
    for x in (val.x_train, val.x_test):
        rows = {tuple(r) for r in x.tolist()}
        assert rows <= train_rows and not rows & (test_rows - train_rows)
    assert not {tuple(r) for r in val.x_train.tolist()} & {tuple(r) for r in val.x_test.tolist()}
    again = data.validation_split(0.2, seed=1)
    assert torch.equal(again.x_test, val.x_test) and not torch.equal(data.validation_split(0.2, seed=2).x_test, val.x_test)
    with pytest.raises(DataError, match="fraction"):
        data.validation_split(1.0)


def test_validation_split_without_a_seed_holds_out_the_last_rows_in_order(boston):
    data = boston
    val = data.validation_split(0.25, seed=None)
    n_val = round(0.25 * data.n_train)
    assert torch.equal(val.x_test, data.x_train[-n_val:]) and torch.equal(val.y_train, data.y_train[:-n_val])
