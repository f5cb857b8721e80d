"""Smoke test: a few steps of a fixed-point ResNet-20 on the 5,000 offline MNIST digits.

    python -m f8net_jax.main --config=configs/smoke.py --workdir=/tmp/f8net_smoke

Trains for well under a minute on 2 CPU cores; the tests run it.
"""

from f8net_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "mnist5k"
    config.image_size = 16
    config.batch_size = 32
    config.num_train_steps = 12
    config.learning_rate = 0.05
    config.quant.rescale_classifier = False  # sized for 1000 classes (fashion_mnist_common.py)
    config.log_every_steps = 4
    config.checkpoint_every_steps = 6
    config.eval_batches = 4
    return config
