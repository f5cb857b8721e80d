"""The default of every configuration field, with what it does; every experiment config
(configs/*.py) starts from ``get_config()`` and the training system checks configs
against it (unknown fields, types, ranges). Any field can be overridden on the command
line, e.g. --config.batch_size=64 or --config.quant.format_rule=grid. The quant block holds
``layers.QuantConfig``'s defaults (a test keeps them equal).
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    # Model.
    config.model = "resnet20"             # resnet18/34/50, resnet20/56, mobilenet_v1/v2
    config.width_multiplier = 1.0         # channel multiplier of the MobileNets
    config.quant = ml_collections.ConfigDict(dict(
        mode="fixed",                     # "float" (full precision) or "fixed" (F8Net)
        format_rule="std",                # formats from "std", "mae", "rms" or "grid" search
        granularity="layer",              # weight formats per "layer" or output "channel"
        clipping=True,                    # PACT alpha; off: no clipping (tiny fine-tuning)
        format_momentum=0.1,              # running input format momentum
        weight_format=(8, 7),             # (bits, initial fraclen) of weights
        input_format=(8, 6),              # (bits, initial running fraclen) of layer inputs
        consistent_clip=False,            # consistent training scale (METHOD.md 8.6)
        alpha_init=8.0,                   # initial PACT clipping level
        bn_momentum=0.1,                  # BatchNorm running-statistics momentum
        bn_eps=1e-5,                      # BatchNorm epsilon
        rescale_classifier=True,          # classifier weight rescaling (official configs)
        share_classifier_alpha=False,     # classifier reads the last chain's alpha (8.7)
        share_alpha=True,                 # readers of one stream share its alpha (METHOD 5);
                                          # False: every layer its own (an ablation)
        wide_fraclen=False,               # weight fraclens may pass the word length (up to
                                          # 15): more of the int8 codes for small weights
        normalized_input=False,           # feed mean/std-normalized images instead of pixels
        precision="float32",              # operands of the float products and the backward:
                                          # "float32", or "bfloat16" on GPU/TPU (f8net_jax.ops)
        conv_backend="auto",              # "auto" (oneDNN on CPU if found), "xla", "onednn"
        exact_dtype="auto",               # operands of the exact (8-bit grid) pass under XLA:
                                          # "auto" (bfloat16 on GPU/TPU), "bfloat16", "float32"
    ))

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
