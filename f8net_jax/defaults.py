"""The default of every configuration field, with what it does; every experiment config
(configs/*.py) starts from ``get_config()`` and the training system checks configs
against it (unknown fields, types, ranges). Any field can be overridden on the command
line, e.g. --config.batch_size=64 or --config.quant.format_rule=grid. The quant block is
built from ``QuantConfig``'s fields (f8net_jax/quant_config.py), where each has its default
and its comment.
"""

import ml_collections

from f8net_jax import quant_config


def get_config():
    config = ml_collections.ConfigDict()

    # Model.
    config.model = "resnet20"             # resnet18/34/50, resnet20/56, mobilenet_v1/v2
    config.width_multiplier = 1.0         # channel multiplier of the MobileNets
    # Quantization: every field of QuantConfig with its default; each field's comment is
    # beside it in f8net_jax/quant_config.py.
    config.quant = ml_collections.ConfigDict(quant_config.config_defaults())

    # Data.
    config.dataset = "synthetic"          # a tfds name, fashion_mnist_offline, mnist5k, synthetic
    config.data_dir = ""                  # tfds data_dir ("" = tfds default)
    config.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"  # Debian's IDX files
    config.train_split = "train"          # tfds split names
    config.eval_split = "test"            # ImageNet: "validation"
    config.image_size = 32                # model input height = width
    config.channels = 3                   # channels of synthetic images
    config.num_classes = 10               # classes of synthetic data (tfds: from the dataset)
    config.augment = "none"               # small datasets: "none" or "crop_flip"
    config.synthetic_train_size = 512     # synthetic training images
    config.synthetic_eval_size = 128      # synthetic eval images
    config.train_examples = -1            # in-memory datasets: train on the first N (-1: all)
    config.shuffle_buffer = 0             # streamed datasets: examples in the shuffle buffer
                                          # (0: 16 x host batch; memory: f8net_jax/data/pipeline.py)

    # Optimization (the official recipe: SGD, Nesterov momentum, cosine per step).
    config.optimizer = "sgd"              # "sgd" or "adam"
    config.learning_rate = 0.1            # base lr; scaled by batch/256 above batch 256
    config.warmup_epochs = 5              # linear warm-up when the lr is scaled up
    config.lr_schedule = "cosine"         # "cosine" (per step) or "constant"
    config.momentum = 0.9                 # SGD momentum
    config.nesterov = True                # Nesterov momentum
    config.weight_decay = 4e-5            # L2 weight decay added to the gradient
    config.weight_decay_scheme = "all"    # "all" or "no_depthwise_no_bn"
    config.batch_size = 128               # global batch over all devices and hosts
    config.num_epochs = 2                 # training length in epochs...
    config.num_train_steps = -1           # ...or in steps when > 0 (tiny fine-tuning)
    config.seed = 0                       # initialization and data order
    config.sync_batch_stats = True        # BN and format statistics over all devices
                                          # (False: per device, as the official DDP code)

    # Initialization.
    config.init_from = ""                 # workdir of a float run: start from its weights

    # Logging, evaluation and checkpoints.
    config.log_every_steps = 50           # train metrics every N steps
    config.eval_every_epochs = 1          # evaluation every N epochs (and at the end)
    config.checkpoint_every_steps = 0     # extra checkpoints every N steps (0: per epoch)
    config.max_checkpoints = 3            # checkpoints kept in the workdir
    config.eval_batches = -1              # limit evaluation to N batches (-1: whole split)
    return config
