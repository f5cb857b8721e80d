"""ResNet-20 on Fashion-MNIST (offline: Debian's dataset-fashion-mnist), sized for a CPU.

Shared by fashion_mnist_resnet20_fp.py and fashion_mnist_resnet20_f8.py.
"""

from f8net_jax.configs import default


def fashion_mnist_config(mode: str):
    config = default.get_config()
    config.model = "resnet20"
    config.quant.mode = mode
    config.dataset = "fashion_mnist_offline"
    config.image_size = 28
    config.batch_size = 128
    config.weight_decay = 1e-4
    # The official classifier rescaling (1/sqrt(classes) / std(w), with its N(0, 0.01)
    # init) is sized for 1000 classes; with 10 it multiplies the classifier's effective
    # learning rate by ~1000 and training stalls (32% vs 87% test top-1 after 300 steps:
    # python -m f8net_jax.main --config=configs/fashion_mnist_resnet20_fp.py --workdir=DIR
    #   --config.num_train_steps=300 --config.eval_batches=20
    #   --config.quant.rescale_classifier=True, then False).
    config.quant.rescale_classifier = False
    config.log_every_steps = 100
    config.eval_every_epochs = 1
    return config
