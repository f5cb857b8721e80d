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
