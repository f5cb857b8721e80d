"""resnet50: tiny fine-tuning of a pretrained full-precision model to fixed point
(no clipping, grid-searched formats, 500 iterations at learning rate 1e-4).

    python -m f8net_jax.main --config=configs/imagenet_resnet50_tiny_finetune.py \
        --workdir=$WORKDIR --config.init_from=<workdir of a float resnet50 run> \
        --config.data_dir=<tfds data dir holding imagenet2012>

The float run must use the same network without clipping (--config.quant.clipping=False,
--config.quant.normalized_input=True), e.g. a converted pretrained model.
"""

from f8net_jax.configs.imagenet_common import tiny_finetuning_config


def get_config():
    return tiny_finetuning_config("resnet50", steps=500, learning_rate=1e-4)
