"""ImageNet preprocessing on JPEG bytes: crops, sizes, dtype and determinism."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from f8net_jax.data import pipeline  # noqa: E402


def jpeg(height, width, seed=0):
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return tf.io.encode_jpeg(image)


def test_random_resized_crop_gives_uint8_crops_that_depend_only_on_the_seed():
    data = jpeg(120, 90)
    seed = tf.constant([7, 3], tf.int64)
    a = pipeline._random_resized_crop(data, seed, 64).numpy()
    b = pipeline._random_resized_crop(data, seed, 64).numpy()
    c = pipeline._random_resized_crop(data, tf.constant([7, 4], tf.int64), 64).numpy()
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_center_crop_resizes_the_shorter_side_then_crops_the_middle():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 90:110] = 255  # a bright vertical band in the middle
    out = pipeline._center_crop(tf.io.encode_jpeg(image, quality=100), 32, 37).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    column = out[16, :, 0].astype(int)
    assert column[16] > 200 and column[0] < 50 and column[-1] < 50


class FakeJpegImages(__import__("tensorflow_datasets").core.GeneratorBasedBuilder):
    """A tiny ImageNet-like dataset: JPEG images of varying sizes, 3 classes."""

    # tfds looks for a builder's resources in its package; lend it the offline builders'.
    __module__ = "f8net_jax.data.builders"

    VERSION = __import__("tensorflow_datasets").core.Version("1.0.0")

    def _info(self):
        tfds = __import__("tensorflow_datasets")
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40),
                "validation": self._generate_examples(1, 10)}

    def _generate_examples(self, seed, n):
        rng = np.random.default_rng(seed)
        for i in range(n):
            h, w = rng.integers(40, 80, 2)
            yield i, {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": i % 3}


def test_streamed_pipeline_batches_resumes_and_masks(tmp_path):
    from f8net_jax.configs import default
    FakeJpegImages(data_dir=str(tmp_path)).download_and_prepare()
    config = default.get_config()
    config.dataset, config.data_dir = "fake_jpeg_images", str(tmp_path)
    config.train_split, config.eval_split, config.image_size = "train", "validation", 32
    data = pipeline.streamed(config, global_batch_size=8, local_devices=2, seed=3)
    assert (data.train_size, data.eval_size, data.num_classes, data.steps_per_epoch) == (40, 10, 3, 5)
    epoch0 = list(data.train_batches(0, 0))
    assert len(epoch0) == 5
    assert epoch0[0]["image"].shape == (2, 4, 32, 32, 3) and epoch0[0]["image"].dtype == np.uint8
    again = list(data.train_batches(0, 0))
    for a, b in zip(epoch0, again):  # the order and the crops depend only on (seed, epoch)
        np.testing.assert_array_equal(a["image"], b["image"])
    resumed = list(data.train_batches(0, 3))  # a run resumed at batch 3 of the epoch
    assert len(resumed) == 2
    np.testing.assert_array_equal(resumed[0]["image"], epoch0[3]["image"])
    labels = np.concatenate([b["label"].ravel() for b in epoch0])
    assert sorted(labels.tolist()) == sorted([i % 3 for i in range(40)])  # each image once
    assert not np.array_equal(list(data.train_batches(1, 0))[0]["label"], epoch0[0]["label"])
    evals = list(data.eval_batches())
    assert len(evals) == 2 and sum(int(b["mask"].sum()) for b in evals) == 10
    assert all(b["image"].shape == (2, 4, 32, 32, 3) for b in evals)


class FakeJpegShards(FakeJpegImages):
    """40 JPEG images, each its own class (the label tells which image), in 4 files."""

    __module__ = "f8net_jax.data.builders"

    def _info(self):
        tfds = __import__("tensorflow_datasets")
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=40)}))

    def _generate_examples(self, seed, n):
        for key, example in super()._generate_examples(seed, n):
            yield key, {**example, "label": key}


@pytest.fixture(scope="module")
def sharded_config(tmp_path_factory):
    tfds = __import__("tensorflow_datasets")
    from f8net_jax.configs import default
    data_dir = str(tmp_path_factory.mktemp("shards"))
    FakeJpegShards(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    config = default.get_config()
    config.dataset, config.data_dir = "fake_jpeg_shards", data_dir
    config.train_split, config.eval_split, config.image_size = "train", "validation", 32
    return config


def _order(data, epoch, start=0):
    return [int(v) for b in data.train_batches(epoch, start) for v in b["label"].ravel()]


def test_streamed_epochs_draw_fresh_orders_and_a_restarted_epoch_repeats_its_batches(
        sharded_config):
    data = pipeline.streamed(sharded_config, global_batch_size=8, local_devices=1, seed=5)
    orders = [_order(data, epoch) for epoch in range(3)]
    for order in orders:
        assert sorted(order) == list(range(40))  # every image once per epoch
    assert len({tuple(o) for o in orders}) == 3  # each epoch its own order
    # A run killed during epoch 1 and restarted at its batch 2 sees the same batches, crops
    # included, as the uninterrupted epoch.
    full, resumed = list(data.train_batches(1, 0)), list(data.train_batches(1, 2))
    assert len(resumed) == 3
    for a, b in zip(full[2:], resumed):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])
    # Another seed, another order.
    other = pipeline.streamed(sharded_config, global_batch_size=8, local_devices=1, seed=6)
    assert _order(other, 0) != orders[0]


def test_streamed_files_are_shuffled_per_epoch_even_without_a_shuffle_buffer(sharded_config):
    config = sharded_config.copy_and_resolve_references()
    config.shuffle_buffer = 1  # no example shuffling: only the file order and interleave
    data = pipeline.streamed(config, global_batch_size=8, local_devices=1, seed=5)
    orders = [_order(data, epoch) for epoch in range(4)]
    assert all(sorted(o) == list(range(40)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert orders[0] == _order(data, 0)
    # The interleave takes one example from each file in turn: the first four examples of
    # an epoch come from the four files (read here one after the other).
    tfds = __import__("tensorflow_datasets")
    builder = tfds.builder("fake_jpeg_shards", data_dir=config.data_dir)
    in_file_order = [int(ex["label"]) for ex in builder.as_dataset(
        split="train", shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1)).as_numpy_iterator()]
    lengths = builder.info.splits["train"].shard_lengths
    assert len(lengths) == 4
    file_of = dict(zip(in_file_order, np.repeat(np.arange(4), lengths).tolist()))
    for order in orders:
        assert sorted(file_of[label] for label in order[:4]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="config.shuffle_buffer must be >= 0"):
        config.shuffle_buffer = -1
        pipeline.streamed(config, global_batch_size=8, local_devices=1, seed=5)
