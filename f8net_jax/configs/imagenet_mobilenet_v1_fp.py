"""MobileNet V1, full precision with PACT clipping (72.4 top-1 in the paper).

    python -m f8net_jax.main --config=configs/imagenet_mobilenet_v1_fp.py --workdir=$WORKDIR \
        --config.data_dir=<tfds data dir holding imagenet2012>
"""

from f8net_jax.configs.imagenet_common import imagenet_config


def get_config():
    return imagenet_config("mobilenet_v1", "float", learning_rate=0.05, weight_decay_scheme="all")
