"""F8Net ResNet-20 on Fashion-MNIST, initialized from the full-precision run.

    python -m f8net_jax.main --config=configs/fashion_mnist_resnet20_f8.py --workdir=/tmp/fm_f8 \
        --config.init_from=/tmp/fm_fp
"""

from f8net_jax.configs.fashion_mnist_common import fashion_mnist_config


def get_config():
    config = fashion_mnist_config("fixed")
    config.learning_rate = 0.02
    config.num_epochs = 1
    return config
