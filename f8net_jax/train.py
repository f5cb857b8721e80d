"""Training and evaluation: train state, pmapped steps, the loop, checkpoints, logging.

    state = create_train_state(rng, config, model, image_shape)
    p_train_step = jax.pmap(partial(train_step, model=model), axis_name="batch")

The train step is one pure function of (state, batch): forward in train mode (batch
statistics, batch formats), cross-entropy, straight-through gradients, then the mean over
all devices of the gradients, the BatchNorm statistics and the running formats, and the
optax update. ``train_and_evaluate`` runs the loop, evaluates every epoch, writes metrics
and per-layer formats, and checkpoints into the workdir, resuming from its latest
checkpoint with the same data order.
"""


import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics
from flax import jax_utils
from flax.training import train_state

from f8net_jax import data as data_lib
from f8net_jax import analysis, checkpoints, models, writers
from f8net_jax.layers import QuantConfig

MUTABLE = ("batch_stats", "quant_stats")
OPTIMIZERS = ("sgd", "adam")
WEIGHT_DECAY_SCHEMES = ("all", "no_depthwise_no_bn")
LR_SCHEDULES = ("cosine", "constant")


class TrainState(train_state.TrainState):
    batch_stats: Any
    quant_stats: Any


@flax.struct.dataclass
class Metrics(metrics.Collection):
    """Top-1 accuracy and mean loss over the (masked) examples of all devices."""
    accuracy: metrics.Accuracy
    loss: metrics.Average.from_output("loss")


# --------------------------------------------------------------------------------------
# Configuration.


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
    if config.model not in models.MODEL_NAMES:
        raise ValueError(f"config.model must be one of {list(models.MODEL_NAMES)}, "
                         f"got {config.model!r}")
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


def quant_config(config) -> QuantConfig:
    """The model's QuantConfig; batch statistics span the pmap axis 'batch' when
    config.sync_batch_stats (the default)."""
    quant = QuantConfig.from_config(config.quant)
    if config.get("sync_batch_stats", True):
        quant = dataclasses.replace(quant, batch_axis_name="batch")
    return quant


def create_model(config, num_classes: int):
    return models.create(config.model, num_classes=num_classes, quant=quant_config(config),
                         width_multiplier=config.width_multiplier)


# --------------------------------------------------------------------------------------
# Optimization.


def learning_rate_fn(config, steps_per_epoch: int, total_steps: int):
    """The official rule: above batch 256 the base lr is scaled by batch / 256, reached by a
    linear warm-up over ``warmup_epochs`` that starts from the unscaled value; then cosine
    decay per step. At batch 256 or less: the base lr, no warm-up."""
    base, batch = config.learning_rate, config.batch_size
    if batch > 256:
        peak, warmup = base * batch / 256, int(config.warmup_epochs * steps_per_epoch)
    else:
        peak, warmup = base, 0
    warmup = min(warmup, total_steps)
    if config.lr_schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(peak * 256 / batch, peak, warmup), decay], [warmup])


def weight_decay_mask(params, scheme: str):
    """'all': every parameter. 'no_depthwise_no_bn' (official): conv kernels other than
    depthwise ones (one input channel per filter) and the classifier kernel only; not
    BatchNorm, biases or alpha."""
    def decays(path, p):
        if scheme == "all":
            return True
        return (p.ndim == 4 and p.shape[2] != 1) or (p.ndim == 2)
    return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(config, lr_fn, params):
    if config.optimizer == "sgd":
        opt = optax.sgd(lr_fn, momentum=config.momentum or None, nesterov=config.nesterov)
    else:
        opt = optax.adam(lr_fn)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay,
                                  weight_decay_mask(params, config.weight_decay_scheme)), opt)


def create_train_state(rng, config, model, image_shape, lr_fn) -> TrainState:
    """Initial variables (one jitted init on a dummy batch) and the optimizer state."""
    variables = jax.jit(lambda rng: model.init(
        rng, jnp.zeros((1,) + tuple(image_shape), jnp.uint8), train=False))(rng)
    tx = create_optimizer(config, lr_fn, variables["params"])
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}),
                             quant_stats=variables.get("quant_stats", {}))


# --------------------------------------------------------------------------------------
# Steps (pmapped over the local devices, axis 'batch').


def unreplicate(tree):
    """The first device's copy of a pmapped output (works for any subset of devices)."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)



def cross_entropy(logits, labels, mask):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)


def train_step(state: TrainState, batch, *, model):
    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats,
                     "quant_stats": state.quant_stats}
        logits, new_state = model.apply(variables, batch["image"], train=True,
                                        mutable=list(MUTABLE))
        return cross_entropy(logits, batch["label"], batch["mask"]), (logits, new_state)

    (loss, (logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, "batch")
    new_state = jax.lax.pmean(new_state, "batch")
    state = state.apply_gradients(grads=grads, batch_stats=new_state["batch_stats"],
                                  quant_stats=new_state.get("quant_stats", state.quant_stats))
    return state, _metrics(logits, batch, jnp.broadcast_to(loss, batch["mask"].shape))


def donate_state() -> bool:
    """Whether the train step donates its input state. On accelerators it does (the old
    state's memory is reused); XLA:CPU then copies every donated parameter at the start of
    the step, which made the ResNet-18 step 9-17% slower than not donating (measured on
    2 cores), so on the CPU it does not."""
    return jax.default_backend() != "cpu"


def pmap_train_step(model):
    """``train_step`` pmapped over the local devices (axis 'batch')."""
    return jax.pmap(functools.partial(train_step, model=model), axis_name="batch",
                    donate_argnums=(0,) if donate_state() else ())


def _metrics(logits, batch, losses) -> Metrics:
    """Metrics of this device's examples, summed over all devices (an Average is a total
    and a count)."""
    local = Metrics.single_from_model_output(logits=logits, labels=batch["label"],
                                             loss=losses, mask=batch["mask"])
    return jax.tree_util.tree_map(lambda x: jax.lax.psum(x, "batch"), local)


def eval_step(state: TrainState, batch, *, model):
    variables = {"params": state.params, "batch_stats": state.batch_stats,
                 "quant_stats": state.quant_stats}
    logits, sown = model.apply(variables, batch["image"], train=False, mutable=["formats"])
    # Fixed-point eval logits are in the classifier's accumulator units; the loss is taken
    # on logits in training units (the argmax, hence the accuracy, is the same).
    scale = sown.get("formats", {}).get("classifier", {}).get("logit_scale", (1.0,))[0]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits * scale, batch["label"])
    return _metrics(logits, batch, losses)


# --------------------------------------------------------------------------------------
# Checkpoints.


def _init_from(state: TrainState, config, init_from: str) -> TrainState:
    """Params and batch_stats of another run's newest verified checkpoint. The source must
    be the same model (its config.json); a fixed-point source is allowed into a fixed-point
    run only, and logged. Every variable of ours must be there with its shape, except the
    clipping levels a float run may lack (they keep their initial value), and the source
    may hold no variable we do not use."""
    their_mode = check_init_from(config)
    if their_mode == "fixed":
        logging.warning("config.init_from %s is a fixed-point run: starting fixed point "
                        "from fixed-point weights", init_from)
    source, step = checkpoints.restore_latest(init_from, move_aside=False)
    if source is None:
        raise FileNotFoundError(f"config.init_from {init_from!r} holds no checkpoint")
    merged = {}
    for col in ("params", "batch_stats"):
        ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(getattr(state, col)))
        theirs = flax.traverse_util.flatten_dict(source.get(col, {}))
        missing = [k for k in ours if k not in theirs
                   and not (k[-1] == "alpha" and their_mode != "fixed")]
        unused = [k for k in theirs if k not in ours]
        for problem, keys in (("lacks", missing), ("has variables this model does not use:",
                                                  unused)):
            if keys:
                shown = ", ".join(f"{col}/{'/'.join(k)}" for k in keys[:3])
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                raise ValueError(f"config.init_from {init_from!r} is not a checkpoint of this "
                                 f"model: it {problem} {shown}{more}")
        for k, v in theirs.items():
            if np.shape(v) != np.shape(ours[k]):
                raise ValueError(f"config.init_from: {col}/{'/'.join(k)} has shape "
                                 f"{np.shape(v)}, expected {np.shape(ours[k])}")
        merged[col] = flax.traverse_util.unflatten_dict(
            {k: jnp.asarray(theirs.get(k, v)) for k, v in ours.items()})
    logging.info("Initialized params and batch_stats from %s (step %d)", init_from, step)
    return state.replace(params=merged["params"], batch_stats=merged["batch_stats"])


# --------------------------------------------------------------------------------------
# The loop.


def _write_formats(writer, tensorboard, step: int, formats: dict, workdir: str) -> None:
    lines = ["| layer | input fl | weight fl | alpha |", "| --- | --- | --- | --- |"]
    for layer, f in formats.items():
        alpha = f"{f['alpha']:.4g}" if "alpha" in f else ""
        lines.append(f"| {layer} | {f.get('input_fraclen', '')} | {f.get('weight_fraclen')} | "
                     f"{alpha} |")
        tensorboard.write_scalars(step, {f"formats/{layer}/{k}": v for k, v in f.items()
                                         if isinstance(v, float)})
    writer.write_texts(step, {"formats": "\n" + "\n".join(lines)})
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "formats.json"), "w") as f:
            json.dump({"step": step, "layers": formats}, f, indent=1,
                      default=lambda a: np.asarray(a).tolist())


def _check_finite(pending, last_good: Optional[int], workdir: str) -> None:
    """Raises on the first non-finite training loss among the pending (step, metrics)."""
    for step, step_metrics in pending:
        loss = float(step_metrics.loss.compute())
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {step}: stopping; "
                                     + _kept(last_good, workdir))


def _non_finite(host_state) -> str:
    """The first variable (params, batch_stats, quant_stats, opt_state) holding a NaN or
    an infinity, or ''."""
    for col in ("params", "batch_stats", "quant_stats", "opt_state"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(host_state, col))[0]:
            a = np.asarray(leaf)
            if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
                return col + jax.tree_util.keystr(path)
    return ""


def _kept(last_good: Optional[int], workdir: str) -> str:
    if last_good is None:
        return "no checkpoint was written"
    return (f"the last good checkpoint (step {last_good}) is kept in "
            f"{os.path.join(workdir, 'checkpoints')}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: Optional[data_lib.InputData] = None) -> dict:
    """Trains and evaluates ``config`` in ``workdir``; resumes from its latest checkpoint.

    ``data`` replaces the dataset named by the config (any ``InputData``, e.g. from
    ``data.from_arrays``). Returns the last evaluation's metrics.
    """
    check_config(config)
    check_same_run(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    if data is None:
        data = data_lib.create(config, local_devices=jax.local_device_count(),
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
    model = create_model(config, data.num_classes)
    steps_per_epoch = data.steps_per_epoch
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else int(config.num_epochs * steps_per_epoch))
    lr_fn = learning_rate_fn(config, steps_per_epoch, total_steps)

    state = create_train_state(jax.random.PRNGKey(config.seed), config, model, data.image_shape,
                               lr_fn)
    restored, start = checkpoints.restore_latest(workdir, state)
    if restored is not None:
        state = restored
        logging.info("Resumed from %s at step %d", workdir, start)
    else:
        start = 0
        if config.init_from:
            state = _init_from(state, config, config.init_from)
    mngr = checkpoints.manager(workdir, config.max_checkpoints)
    if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, "config.json")):
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))

    # Metrics go to TensorBoard (process 0) and the console; per-layer formats to
    # TensorBoard, formats.json and one console table per evaluation.
    writer, tensorboard, report = writers.create(workdir, is_chief=jax.process_index() == 0,
                                                 num_train_steps=total_steps)
    backends = writers.record_backends(workdir, "train", quant_config(config).compute.describe())
    tensorboard.write_texts(start, {"backends": backends})
    p_train = pmap_train_step(model)
    p_eval = jax.pmap(functools.partial(eval_step, model=model), axis_name="batch")
    fixed = quant_config(config).fixed

    def evaluate(state, step):
        collected = None
        for i, batch in enumerate(data.eval_batches()):
            if 0 <= config.eval_batches <= i:
                break
            m = unreplicate(p_eval(state, batch))
            collected = m if collected is None else collected.merge(m)
        if collected is None:
            raise ValueError("evaluation saw no batch: config.eval_batches must be -1 or "
                             "positive, and the eval split must not be empty")
        result = {f"eval_{k}": float(v) for k, v in collected.compute().items()}
        writer.write_scalars(step, result)
        if fixed:
            host = unreplicate(state)
            variables = {"params": host.params, "batch_stats": host.batch_stats,
                         "quant_stats": host.quant_stats}
            _write_formats(writer, tensorboard, step,
                           analysis.layer_formats(model, variables, data.image_shape), workdir)
        writer.flush()
        return result

    if start >= total_steps:
        logging.info("Training already finished at step %d; evaluating only.", start)
        return evaluate(jax_utils.replicate(state), start)

    # Throughput of the training steps alone: from the end of the second (compiling) step,
    # without the time spent in evaluation and checkpointing.
    timing = {"start": None, "other": 0.0}
    state = jax_utils.replicate(state)
    result, pending, train_metrics, last_good = {}, [], None, start or None
    step = start
    t0 = time.time()
    epoch, offset = divmod(start, steps_per_epoch)
    while step < total_steps:
        for batch in data.train_batches(epoch, offset):
            state, step_metrics = p_train(state, batch)
            step += 1
            if timing["start"] is None and step - start == min(2, total_steps - start):
                # The first two steps compile (the second sees pmap-output arrays).
                jax.block_until_ready(step_metrics)
                timing["start"], first_step = time.time(), step
            step_metrics = unreplicate(step_metrics)
            pending.append((step, step_metrics))
            train_metrics = (step_metrics if train_metrics is None
                             else train_metrics.merge(step_metrics))
            report(step)
            end_of_epoch = step % steps_per_epoch == 0
            checkpoint = (step == total_steps or end_of_epoch
                          or (config.checkpoint_every_steps > 0
                              and step % config.checkpoint_every_steps == 0))
            if step % config.log_every_steps == 0 or checkpoint:
                _check_finite(pending, last_good, workdir)
                pending = []
                scalars = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
                writer.write_scalars(step, {**scalars, "learning_rate": float(lr_fn(step - 1))})
                train_metrics = None
            other_start = time.time()
            if checkpoint:
                host_state = jax.device_get(unreplicate(state))
                bad = _non_finite(host_state)
                if bad:
                    raise FloatingPointError(
                        f"non-finite values in {bad} at step {step}: stopping; "
                        + _kept(last_good, workdir))
                checkpoints.save(mngr, step, host_state)
                last_good = step
            if step == total_steps or (end_of_epoch and (step // steps_per_epoch)
                                       % config.eval_every_epochs == 0):
                result = evaluate(state, step)
            if timing["start"] is not None:
                timing["other"] += time.time() - other_start
            if step >= total_steps:
                break
        epoch, offset = epoch + 1, 0
    jax.block_until_ready(state)
    train_time = time.time() - (timing["start"] or 0.0) - timing["other"]
    if timing["start"] is not None and step > first_step and train_time > 0:
        result["train_images_per_sec"] = (step - first_step) * data.global_batch_size / train_time
    logging.info("Trained %d steps in %.1f s (%.0f images/s)", step - start, time.time() - t0,
                 result.get("train_images_per_sec", float("nan")))
    writer.flush()
    mngr.close()
    return result
