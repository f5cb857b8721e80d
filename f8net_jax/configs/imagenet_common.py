"""The paper's ImageNet recipe (docs/METHOD.md 7), shared by the imagenet_*.py configs.

Conventional training: SGD with Nesterov momentum 0.9, global batch 2048, base learning
rate scaled by 2048/256 after 5 linear warm-up epochs, cosine decay per step, weight decay
4e-5, 150 epochs, per-layer formats from the std rule, weights (8, 7) and inputs (8, 6) at
the start, plain cross-entropy. The fixed-point run starts from the full-precision one
(--config.init_from=<its workdir>).
"""

from f8net_jax.configs import default


def imagenet_config(model: str, mode: str, *, learning_rate: float,
                    weight_decay_scheme: str = "all"):
    config = default.get_config()
    config.model = model
    config.quant.mode = mode                 # "float": the PACT baseline (clipping on)
    config.dataset = "imagenet2012"
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 224
    config.batch_size = 2048
    config.num_epochs = 150
    config.learning_rate = learning_rate
    config.warmup_epochs = 5
    config.weight_decay = 4e-5
    config.weight_decay_scheme = weight_decay_scheme
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    return config


def tiny_finetuning_config(model: str, *, steps: int, learning_rate: float):
    """Tiny fine-tuning of a pretrained float model (input normalization on): no clipping
    (s = 1), formats by grid search, ``steps`` iterations at a constant learning rate."""
    config = imagenet_config(model, "fixed", learning_rate=learning_rate,
                             weight_decay_scheme="no_depthwise_no_bn")
    config.quant.clipping = False
    config.quant.format_rule = "grid"
    config.quant.normalized_input = True
    config.num_train_steps = steps
    config.lr_schedule = "constant"
    config.weight_decay = 1e-4
    config.batch_size = 128                  # the official run: one GPU, batch 128 (no lr
                                             # scaling, no warm-up)
    config.checkpoint_every_steps = 0
    config.log_every_steps = 10
    return config
