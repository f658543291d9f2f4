"""Data sets for bnnzoo: the UCI regression splits, MNIST, Fashion-MNIST, CIFAR-10/100, and a sparse
teacher-student task.

Every loader returns a :class:`Dataset` of raw tensors (standardisation is done later, by the
fitted posterior, with training statistics) and raises :class:`DataError` for bad data.
"""

from .augment import AUGMENTATIONS, augmentation, random_crop_flip
from .cifar import load_cifar
from .dataset import Dataset
from .download import (
    CIFAR_ARCHIVES,
    FASHION_MNIST_MD5,
    MNIST_MD5,
    MNIST_URLS,
    download_cifar,
    download_fashion_mnist,
    download_mnist,
    file_md5,
    verify_md5,
)
from .errors import DataError
from .mnist import load_fashion_mnist, load_mnist, mnist_files
from .paths import bundled_dir
from .registry import DATASETS, load_dataset
from .synthetic import TeacherNet, make_sparse_teacher
from .uci import UCI_SETS, load_uci, uci_num_splits
from .validate import validate_arrays

__all__ = [
    "AUGMENTATIONS",
    "CIFAR_ARCHIVES",
    "DATASETS",
    "DataError",
    "Dataset",
    "FASHION_MNIST_MD5",
    "MNIST_MD5",
    "MNIST_URLS",
    "TeacherNet",
    "UCI_SETS",
    "augmentation",
    "bundled_dir",
    "download_cifar",
    "download_fashion_mnist",
    "download_mnist",
    "file_md5",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_uci",
    "make_sparse_teacher",
    "mnist_files",
    "random_crop_flip",
    "uci_num_splits",
    "validate_arrays",
    "verify_md5",
]
