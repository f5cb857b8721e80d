"""ResNet-50, full precision with PACT clipping, with ResNet-18's recipe.

    python -m f8net_jax.main --config=configs/imagenet_resnet50_fp.py --workdir=$WORKDIR \
        --config.data_dir=<tfds data dir holding imagenet2012>
"""

from f8net_jax.configs.imagenet_common import imagenet_config


def get_config():
    return imagenet_config("resnet50", "float", learning_rate=0.05, weight_decay_scheme="all")
