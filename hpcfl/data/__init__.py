"""Data sets of MNIST's form: the catalogue, reading IDX files, fetching, the cache, sharding.

    catalogue.py  the data sets, their files, checksums and shapes (no I/O)
    idx.py        reading and validating a data set's files
    download.py   where data lives (folders, environment variables) and downloading it
    cache.py      the validated .npy cache every rank memory-maps; Dataset
    shard.py      which rows a rank reads, and each epoch's order

The names users and tests reach for are re-exported here.
"""
from ..errors import DataError
from .cache import Dataset, cache_root, open_cache, prepare_cache, verify_cache
from .catalogue import CATALOGUE, FILES, IMAGE_SHAPE, MEAN, MNIST_SPEC, SPLITS, STD, URLS, Spec, get
from .download import data_dir_variable, default_data_dir, fetch, missing_files, resolve_data_dir
from .idx import load_arrays, read_idx
from .shard import epoch_permutation, shard_range

__all__ = ["CATALOGUE", "FILES", "IMAGE_SHAPE", "MEAN", "MNIST_SPEC", "SPLITS", "STD", "URLS",
           "DataError", "Dataset", "Spec", "cache_root", "data_dir_variable", "default_data_dir",
           "epoch_permutation", "fetch", "get", "load_arrays", "missing_files", "open_cache",
           "prepare_cache", "read_idx", "resolve_data_dir", "shard_range", "verify_cache"]
