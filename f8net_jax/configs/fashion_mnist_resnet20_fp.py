"""Full-precision ResNet-20 (PACT clipping) on Fashion-MNIST: the start of the demo.

    python -m f8net_jax.main --config=configs/fashion_mnist_resnet20_fp.py --workdir=/tmp/fm_fp
"""

from f8net_jax.configs.fashion_mnist_common import fashion_mnist_config


def get_config():
    config = fashion_mnist_config("float")
    config.learning_rate = 0.1
    config.num_epochs = 2
    return config
