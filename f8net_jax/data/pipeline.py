"""tfds/tf.data input (imports TensorFlow; nothing else in the package does).

* ``load_in_memory``: a small image-classification dataset, whole, as numpy arrays;
* ``streamed``: ImageNet through tf.data: random-resized crop (area 8%-100%, aspect 3/4-4/3)
  and flip for training, resize of the shorter side to 256 and a 224 center crop for eval,
  uint8 pixels out. Every epoch reads the files in a fresh order drawn from (seed, epoch),
  interleaves ``INTERLEAVE`` of them example by example and shuffles through a buffer of
  ``config.shuffle_buffer`` examples, which approximates the official fresh permutation
  of the whole training set per epoch. All random choices are stateless functions of
  (seed, epoch, position), and the interleave has a fixed width, so the order and the
  crops of a resumed run are those of an uninterrupted one, on any machine.

Memory of the shuffle buffer: it holds encoded JPEG examples (ImageNet's average about
110 kB), so the default 16 x host batch costs about 16 x 1024 x 110 kB = 1.8 GB of host
memory at batch 1024 per host; set --config.shuffle_buffer to trade mixing for memory.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from f8net_jax import data as data_lib
from f8net_jax.data import builders  # noqa: F401  (registers the offline builders)

tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators
AUTOTUNE = tf.data.AUTOTUNE
INTERLEAVE = 16  # files read at once, example by example (fixed: the order must not
                 # depend on the machine's core count, as an autotuned width would)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's file order, shuffle and crops."""
    return seed * 10007 + epoch


def shuffle_buffer_size(config, host_batch: int) -> int:
    """Examples in the training shuffle buffer: config.shuffle_buffer, or 16 host batches."""
    size = config.get("shuffle_buffer", 0)
    if size < 0:
        raise ValueError(f"config.shuffle_buffer must be >= 0 (0: 16 x host batch), got {size}")
    return size or 16 * host_batch


def _builder(config):
    if config.data_dir and not os.path.isdir(config.data_dir):
        raise FileNotFoundError(f"data_dir {config.data_dir!r} does not exist: set "
                                f"--config.data_dir to the folder that holds the tfds data")
    kwargs = {}
    if config.dataset == "fashion_mnist_offline":
        kwargs["source_dir"] = config.fashion_mnist_dir
    try:
        builder = tfds.builder(config.dataset, data_dir=config.data_dir or None, **kwargs)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"unknown dataset {config.dataset!r}: --config.dataset must name a tfds image "
            f"classification dataset (e.g. imagenet2012, cifar10), one of "
            f"{list(data_lib.OFFLINE)}, or 'synthetic'") from e
    if config.dataset in data_lib.OFFLINE:
        if config.dataset == "fashion_mnist_offline":
            builders.fashion_mnist_arrays(config.fashion_mnist_dir, "test")  # clear error early
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    elif not builder.is_prepared():
        raise FileNotFoundError(
            f"dataset {config.dataset!r} is not prepared under data_dir "
            f"{builder.data_dir!r}: prepare it there (tfds build {config.dataset}) or set "
            f"--config.data_dir to where it is")
    return builder


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    resized = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
    return np.asarray(tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8))


def load_in_memory(config):
    """((train images, labels), (eval images, labels), num_classes), images uint8 NHWC of
    config.image_size."""
    builder = _builder(config)
    arrays = []
    for split in (config.train_split, config.eval_split):
        ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
        example = tfds.as_numpy(ds)
        images, labels = example["image"], example["label"]
        if images.ndim == 3:
            images = images[..., None]
        arrays.append((_resize(images.astype(np.uint8), config.image_size),
                       labels.astype(np.int32)))
    num_classes = builder.info.features["label"].num_classes
    return arrays[0], arrays[1], num_classes


def _random_resized_crop(image_bytes, seed, size):
    shape = tf.io.extract_jpeg_shape(image_bytes)
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop)
    image = tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, (size, size), method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _center_crop(image_bytes, size, resize_to):
    image = tf.io.decode_jpeg(image_bytes, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize_to / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method="bilinear", antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    image = image[top:top + size, left:left + size]
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def streamed(config, *, global_batch_size, local_devices, seed, process_index=0,
             process_count=1) -> data_lib.InputData:
    """ImageNet-style streaming input (JPEG-encoded images), sharded by host."""
    builder = _builder(config)
    host_batch = data_lib.host_batch_size(global_batch_size, local_devices, process_count)
    size = config.image_size
    decoders = {"image": tfds.decode.SkipDecoding()}
    train_split = tfds.even_splits(config.train_split, n=process_count)[process_index]
    eval_split = tfds.even_splits(config.eval_split, n=process_count)[process_index]
    train_size = builder.info.splits[config.train_split].num_examples
    eval_size = builder.info.splits[config.eval_split].num_examples
    steps = train_size // global_batch_size

    def to_devices(batch):
        return {k: v.reshape((local_devices, -1) + v.shape[1:]) for k, v in batch.items()}

    buffer = shuffle_buffer_size(config, host_batch)

    def train_batches(epoch: int, start: int = 0):
        key = epoch_seed(seed, epoch)
        read_config = tfds.ReadConfig(shuffle_seed=key, shuffle_reshuffle_each_iteration=False,
                                      interleave_cycle_length=INTERLEAVE,
                                      interleave_block_length=1)
        ds = builder.as_dataset(split=train_split, shuffle_files=True, decoders=decoders,
                                read_config=read_config)
        ds = ds.shuffle(buffer, seed=key, reshuffle_each_iteration=False)
        ds = ds.enumerate().map(
            lambda i, ex: {
                "image": _random_resized_crop(ex["image"], tf.stack(
                    [tf.cast(key, tf.int64), i]), size),
                "label": tf.cast(ex["label"], tf.int32),
                "mask": tf.constant(True)},
            num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.batch(host_batch, drop_remainder=True).skip(start).take(steps - start)
        for batch in ds.prefetch(AUTOTUNE).as_numpy_iterator():
            yield to_devices(batch)

    def eval_batches():
        ds = builder.as_dataset(split=eval_split, shuffle_files=False, decoders=decoders)
        ds = ds.map(lambda ex: {"image": _center_crop(ex["image"], size, round(size * 256 / 224)),
                                "label": tf.cast(ex["label"], tf.int32),
                                "mask": tf.constant(True)},
                    num_parallel_calls=AUTOTUNE, deterministic=True)
        pad = {"image": tf.zeros((size, size, 3), tf.uint8), "label": tf.constant(0),
               "mask": tf.constant(False)}
        per_host = -(-eval_size // process_count)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(
            (-per_host) % host_batch + host_batch))
        total = -(-per_host // host_batch)
        for batch in ds.batch(host_batch, drop_remainder=True).take(total).as_numpy_iterator():
            yield to_devices(batch)

    return data_lib.InputData(
        name=config.dataset, num_classes=builder.info.features["label"].num_classes,
        image_shape=(size, size, 3), train_size=train_size, eval_size=eval_size,
        global_batch_size=global_batch_size, train_batches=train_batches,
        eval_batches=eval_batches)
