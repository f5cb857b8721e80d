"""MobileNet V2, F8Net fixed point from the full-precision run (72.6 top-1 in the paper).

    python -m f8net_jax.main --config=configs/imagenet_mobilenet_v2_f8.py --workdir=$WORKDIR --config.init_from=<workdir of imagenet_mobilenet_v2_fp> \
        --config.data_dir=<tfds data dir holding imagenet2012>
"""

from f8net_jax.configs.imagenet_common import imagenet_config


def get_config():
    return imagenet_config("mobilenet_v2", "fixed", learning_rate=0.1, weight_decay_scheme="no_depthwise_no_bn")
