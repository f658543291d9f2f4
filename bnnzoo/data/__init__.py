"""Data sets for bnnzoo: the UCI regression splits, MNIST, and a sparse teacher-student task.

Every loader returns a :class:`Dataset` of raw tensors (standardisation is done later, by the
fitted posterior, with training statistics) and raises :class:`DataError` for bad data.
"""

from .dataset import Dataset
from .download import MNIST_MD5, MNIST_URLS, download_mnist, file_md5, verify_md5
from .errors import DataError
from .mnist import load_mnist, mnist_files
from .paths import bundled_dir
from .registry import DATASETS, load_dataset
from .synthetic import TeacherNet, make_sparse_teacher
from .uci import UCI_SETS, load_uci, uci_num_splits
from .validate import validate_arrays

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "MNIST_MD5",
    "MNIST_URLS",
    "TeacherNet",
    "UCI_SETS",
    "bundled_dir",
    "download_mnist",
    "file_md5",
    "load_dataset",
    "load_mnist",
    "load_uci",
    "make_sparse_teacher",
    "mnist_files",
    "uci_num_splits",
    "validate_arrays",
    "verify_md5",
]
