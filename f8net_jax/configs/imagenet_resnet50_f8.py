"""ResNet-50, F8Net fixed point from the full-precision run, with ResNet-18's recipe.

    python -m f8net_jax.main --config=configs/imagenet_resnet50_f8.py --workdir=$WORKDIR --config.init_from=<workdir of imagenet_resnet50_fp> \
        --config.data_dir=<tfds data dir holding imagenet2012>
"""

from f8net_jax.configs.imagenet_common import imagenet_config


def get_config():
    return imagenet_config("resnet50", "fixed", learning_rate=0.1, weight_decay_scheme="all")
