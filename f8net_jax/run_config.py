"""A run's config: its checks, its file and its identity.

``check_config`` fails fast, naming the field, on a value the run cannot use (unknown
fields, types, FIELD_RANGES, choices, init_from); ``load_config_file`` reads a config file's
get_config(); ``check_same_run`` keeps a workdir to the run it holds (RUN_IDENTITY).
"""

import json
import math
import os

import jax
import ml_collections
from absl import logging

from f8net_jax import models
from f8net_jax.steps import LR_SCHEDULES, OPTIMIZERS, WEIGHT_DECAY_SCHEMES, quant_config

FIELD_RANGES = {  # field: (test, what is allowed)
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "num_epochs": (lambda v: v >= 0, ">= 0"),
    "num_train_steps": (lambda v: v == -1 or v >= 1, "-1 (use num_epochs) or >= 1"),
    "log_every_steps": (lambda v: v >= 1, ">= 1"),
    "checkpoint_every_steps": (lambda v: v >= 0, ">= 0 (0: once per epoch)"),
    "eval_every_epochs": (lambda v: v >= 1, ">= 1"),
    "eval_batches": (lambda v: v == -1 or v >= 1, "-1 (the whole split) or >= 1"),
    "max_checkpoints": (lambda v: v >= 1, ">= 1 (the last good checkpoint is always kept)"),
    "learning_rate": (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "image_size": (lambda v: v >= 1, ">= 1"),
    "channels": (lambda v: v >= 1, ">= 1"),
    "num_classes": (lambda v: v >= 1, ">= 1"),
    "synthetic_train_size": (lambda v: v >= 1, ">= 1"),
    "synthetic_eval_size": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "train_examples": (lambda v: v == -1 or v >= 1, "-1 (all) or >= 1"),
    "shuffle_buffer": (lambda v: v >= 0, ">= 0 (0: 16 x host batch)"),
    "width_multiplier": (lambda v: v > 0, "> 0"),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the field, on values the run cannot use."""
    from f8net_jax import defaults as default  # the reference set of fields

    reference = default.get_config()

    def walk(cfg, ref, prefix=""):
        for key in cfg.keys():
            if key not in ref:
                raise ValueError(f"config field {prefix}{key!r} does not exist; the fields are "
                                 f"{sorted(ref.keys())} (f8net_jax/defaults.py)")
            if isinstance(ref[key], ml_collections.ConfigDict):
                walk(cfg[key], ref[key], f"{prefix}{key}.")

    walk(config, reference)
    for field, (ok, allowed) in FIELD_RANGES.items():
        value = config.get(field, reference[field])
        kind = float if isinstance(reference[field], float) else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not float(value).is_integer()):
            raise ValueError(f"config.{field} must be {'a number' if kind is float else 'an integer'}"
                             f" ({allowed}), got {value!r}")
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"config.{field} must be {allowed}, got {value!r}")
    if models.is_user_model(config.model):
        from f8net_jax.models import user
        user.factory(config.model)  # importable and callable, else the error names the field
        if config.width_multiplier != 1.0:
            raise ValueError(f"config.width_multiplier applies to the MobileNets only, not "
                             f"{config.model!r}")
    elif config.model not in models.MODEL_NAMES:
        raise ValueError(f"config.model must be one of {list(models.MODEL_NAMES)} or a user "
                         f"model 'package.module:factory', got {config.model!r}")
    for field, allowed in (("optimizer", OPTIMIZERS), ("weight_decay_scheme", WEIGHT_DECAY_SCHEMES),
                           ("lr_schedule", LR_SCHEDULES)):
        if config[field] not in allowed:
            raise ValueError(f"config.{field} must be one of {list(allowed)}, got {config[field]!r}")
    if config.batch_size % jax.device_count():
        raise ValueError(f"config.batch_size {config.batch_size} is not divisible by the "
                         f"{jax.device_count()} devices: use a multiple of {jax.device_count()}")
    if config.num_epochs <= 0 and config.num_train_steps <= 0:
        raise ValueError("set config.num_epochs or config.num_train_steps to a positive value")
    quant_config(config)  # validates the quant fields
    if config.init_from:
        check_init_from(config)


def check_init_from(config) -> str:
    """Checks config.init_from's config.json against this run (same model and width; a
    fixed-point source only into a fixed-point run); returns the source's quant mode."""
    init_from = config.init_from
    if not os.path.isdir(os.path.join(init_from, "checkpoints")):
        raise FileNotFoundError(f"config.init_from {init_from!r} holds no checkpoints: "
                                f"give the workdir of a finished float run")
    source_config = os.path.join(init_from, "config.json")
    if not os.path.isfile(source_config):
        raise FileNotFoundError(f"config.init_from {init_from!r} holds no config.json: give "
                                f"the workdir of a training run (or of f8net_jax.convert)")
    try:
        theirs_config = json.load(open(source_config))
    except (OSError, ValueError) as e:
        raise ValueError(f"config.init_from: {source_config} cannot be read ({e})")
    for field in ("model", "width_multiplier"):
        if field in theirs_config and theirs_config[field] != config[field]:
            raise ValueError(f"config.init_from {init_from!r} is a run of {field} "
                             f"{theirs_config[field]!r}, this run is {config[field]!r}")
    their_mode = theirs_config.get("quant", {}).get("mode", "float")
    if their_mode == "fixed" and not quant_config(config).fixed:
        raise ValueError(f"config.init_from {init_from!r} is a fixed-point run: a "
                         f"{config.quant.mode} run starts from a float run")
    return their_mode


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """get_config() of a config file (configs/*.py, or a user's), imported with the folder
    above it on sys.path (so that a user's ``from myconfigs import ...`` works from
    anywhere)."""
    import importlib.util
    import sys

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(
        "config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config()")
    return module.get_config()


# What a workdir's run is: the fields that define the model, the data it sees and the
# quantization. A rerun in the same workdir must keep them; every other field (the length
# of training, logging, evaluation, checkpointing, the learning rate and the optimizer,
# data_dir, init_from, and how products are computed: quant.conv_backend, exact_dtype) may
# change, and a change is logged.
RUN_IDENTITY = ("model", "width_multiplier", "quant", "dataset", "train_split", "eval_split",
                "image_size", "channels", "num_classes", "train_examples",
                "synthetic_train_size", "synthetic_eval_size", "augment", "batch_size", "seed",
                "sync_batch_stats")
FREE_QUANT_FIELDS = ("conv_backend", "exact_dtype")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def check_same_run(config, workdir: str) -> None:
    """Compares ``config`` with the config.json of a workdir's first start: raises naming
    every differing field that defines the run (RUN_IDENTITY), logs the others."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"workdir {workdir!r} is a file, not a folder")
    if not os.path.exists(path):
        return
    try:
        saved = _flat(json.load(open(path)))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}): restore it or use another workdir")
    now = _flat(json.loads(config.to_json_best_effort()))
    differing = {k: (saved[k], now[k]) for k in sorted(saved.keys() & now.keys())
                 if saved[k] != now[k]}
    fixed = [k for k in differing if k.split(".")[0] in RUN_IDENTITY
             and not (k.startswith("quant.") and k.split(".")[1] in FREE_QUANT_FIELDS)]
    if fixed:
        listing = "; ".join(f"{k}: {differing[k][0]!r} -> {differing[k][1]!r}" for k in fixed)
        raise ValueError(
            f"workdir {workdir!r} holds a run of another configuration ({listing}): these "
            f"fields define the model, the data or the quantization, so a run keeps them "
            f"(its config.json); use another workdir, or the same values")
    for k, (before, after) in differing.items():
        logging.info("config.%s changed from %r to %r since this workdir's first start",
                     k, before, after)
