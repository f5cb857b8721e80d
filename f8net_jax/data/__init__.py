"""Input data: per-device numpy batches of uint8 images and int32 labels.

``InputData`` is what the training loop consumes; it needs no TensorFlow:

* ``from_arrays(...)``: any images and labels held in memory (numpy), e.g. on a GPU
  machine without TensorFlow, or ``synthetic`` data for speed tests;
* ``create(config)``: a dataset by name. Small tfds datasets (the offline
  ``fashion_mnist_offline`` and ``mnist5k`` builders, cifar10, ...) are read once into memory
  and batched in numpy; ``imagenet2012`` streams through a tf.data pipeline
  (``f8net_jax.data.pipeline``). TensorFlow is imported only when a tfds dataset is asked for.

A batch is ``{'image': uint8 [devices, per_device, H, W, C], 'label': int32 [devices,
per_device], 'mask': bool [devices, per_device]}``; the mask marks the padding of the last
eval batch. The training order is a pure function of (seed, epoch): a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import numpy as np

Batch = dict
STREAMED = ("imagenet2012",)
OFFLINE = ("fashion_mnist_offline", "mnist5k")


@dataclasses.dataclass
class InputData:
    """A dataset as the training loop sees it.

    ``train_batches(epoch, start)`` yields the batches of one epoch from batch ``start`` on;
    ``eval_batches()`` yields the whole eval split once, padded and masked.
    """

    name: str
    num_classes: int
    image_shape: tuple
    train_size: int
    eval_size: int
    global_batch_size: int
    train_batches: Callable[[int, int], Iterator[Batch]]
    eval_batches: Callable[[], Iterator[Batch]]

    @property
    def steps_per_epoch(self) -> int:
        return self.train_size // self.global_batch_size


def host_batch_size(global_batch_size: int, local_devices: int, process_count: int) -> int:
    """This host's share of a global batch, which must split evenly over all devices."""
    if global_batch_size % (local_devices * process_count):
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by the number of devices "
            f"{local_devices * process_count}: set --config.batch_size to a multiple of it")
    return global_batch_size // process_count


def _split_for_devices(array: np.ndarray, devices: int) -> np.ndarray:
    return array.reshape((devices, -1) + array.shape[1:])


def from_arrays(name: str, train: tuple, eval: tuple, *, num_classes: int,
                global_batch_size: int, local_devices: int, seed: int,
                process_index: int = 0, process_count: int = 1,
                augment: Optional[Callable] = None) -> InputData:
    """Batches of in-memory arrays ``(images uint8 NHWC, labels)``.

    Each host takes its share of every global batch (by process index); each epoch's order
    is a permutation drawn from (seed, epoch); the last partial training batch is dropped,
    the last eval batch padded and masked. ``augment(images, rng)`` may transform the
    training images of a batch.
    """
    train_images, train_labels = train
    eval_images, eval_labels = eval
    for split, images, labels in (("train", train_images, train_labels),
                                  ("eval", eval_images, eval_labels)):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{name} {split} images must be uint8 NHWC, got {images.dtype} "
                             f"{images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
    host_batch = host_batch_size(global_batch_size, local_devices, process_count)
    if len(train_images) < global_batch_size:
        raise ValueError(f"{name}: batch_size {global_batch_size} exceeds the {len(train_images)} "
                         f"training images: lower --config.batch_size")
    steps = len(train_images) // global_batch_size

    def host_slice(indices):
        return indices[process_index * host_batch:(process_index + 1) * host_batch]

    def train_batches(epoch: int, start: int = 0):
        order = np.random.default_rng([seed, epoch]).permutation(len(train_images))
        for step in range(start, steps):
            idx = host_slice(order[step * global_batch_size:(step + 1) * global_batch_size])
            images = train_images[idx]
            if augment is not None:
                images = augment(images, np.random.default_rng([seed, epoch, step]))
            yield {"image": _split_for_devices(images, local_devices),
                   "label": _split_for_devices(train_labels[idx].astype(np.int32), local_devices),
                   "mask": _split_for_devices(np.ones(len(idx), bool), local_devices)}

    def eval_batches():
        n = len(eval_images)
        for begin in range(0, n, global_batch_size):
            idx = np.arange(begin, begin + global_batch_size)
            mask = idx < n
            idx = host_slice(np.where(mask, idx, 0))
            yield {"image": _split_for_devices(eval_images[idx], local_devices),
                   "label": _split_for_devices(eval_labels[idx].astype(np.int32), local_devices),
                   "mask": _split_for_devices(host_slice(mask), local_devices)}

    return InputData(name=name, num_classes=num_classes, image_shape=train_images.shape[1:],
                     train_size=len(train_images), eval_size=len(eval_images),
                     global_batch_size=global_batch_size, train_batches=train_batches,
                     eval_batches=eval_batches)


def synthetic(*, image_shape, num_classes, train_size, eval_size, **kwargs) -> InputData:
    """Random uint8 images with labels that depend on them (the mean brightness decides
    the class), so a model can learn something; for speed tests and machines without data."""
    rng = np.random.default_rng(0)

    def make(n):
        images = rng.integers(0, 256, (n,) + tuple(image_shape), dtype=np.uint8)
        means = images.reshape(n, -1).mean(axis=1)
        edges = np.quantile(means, np.linspace(0, 1, num_classes + 1)[1:-1])
        return images, np.searchsorted(edges, means).astype(np.int32)

    return from_arrays("synthetic", make(train_size), make(eval_size), num_classes=num_classes,
                       **kwargs)


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """CIFAR-style augmentation: random crop of the image padded by ``pad``, random flip."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


AUGMENTATIONS = {"none": None, "crop_flip": pad_crop_flip}


def create(config, *, local_devices: int, process_index: int = 0,
           process_count: int = 1) -> InputData:
    """The dataset named by ``config.dataset``, batched for this host's devices."""
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, got {config.augment!r}")
    common = dict(global_batch_size=config.batch_size, local_devices=local_devices,
                  seed=config.seed, process_index=process_index, process_count=process_count)
    if config.dataset == "synthetic":
        return synthetic(image_shape=(config.image_size, config.image_size, config.channels),
                         num_classes=config.num_classes, train_size=config.synthetic_train_size,
                         eval_size=config.synthetic_eval_size, **common)
    limit = config.get("train_examples", -1)
    if config.dataset in STREAMED:
        if limit > 0:
            raise ValueError(f"config.train_examples applies to in-memory datasets, not "
                             f"{config.dataset!r}: use -1")
        from f8net_jax.data import pipeline  # imports TensorFlow
        return pipeline.streamed(config, **common)
    if config.dataset in OFFLINE and not _tensorflow_available():
        train, eval, num_classes = _offline_without_tensorflow(config)
    else:
        from f8net_jax.data import pipeline  # imports TensorFlow
        train, eval, num_classes = pipeline.load_in_memory(config)
    if limit > 0:
        if limit > len(train[0]):
            raise ValueError(f"config.train_examples {limit} exceeds the {len(train[0])} "
                             f"training images of {config.dataset!r}")
        train = (train[0][:limit], train[1][:limit])
    return from_arrays(config.dataset, train, eval, num_classes=num_classes,
                       augment=AUGMENTATIONS[config.augment], **common)


def _tensorflow_available() -> bool:
    import importlib.util
    return (importlib.util.find_spec("tensorflow") is not None
            and importlib.util.find_spec("tensorflow_datasets") is not None)


def _offline_without_tensorflow(config):
    """The offline datasets read with numpy, where TensorFlow is missing (GPU images).
    The images are the same as through tfds; their order in the arrays is the files' (tfds
    stores them in its own order), so a run's batches differ from a run with TensorFlow."""
    from f8net_jax.data import offline

    if config.image_size != 28:
        raise ValueError(f"config.image_size {config.image_size}: without TensorFlow the "
                         f"{config.dataset} images cannot be resized; use 28")
    if (config.train_split, config.eval_split) != ("train", "test"):
        raise ValueError(f"config.train_split/eval_split must be 'train'/'test' for "
                         f"{config.dataset} without TensorFlow")
    if config.dataset == "fashion_mnist_offline":
        read = lambda split: offline.fashion_mnist_arrays(config.fashion_mnist_dir, split)
    else:
        read = offline.mnist5k_arrays
    (train_x, train_y), (eval_x, eval_y) = read("train"), read("test")
    return ((train_x, train_y.astype(np.int32)), (eval_x, eval_y.astype(np.int32)), 10)
