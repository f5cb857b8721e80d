"""The train state and the pmapped train and eval steps.

    state = create_train_state(rng, config, model, image_shape, lr_fn)
    p_train_step = pmap_train_step(model)

The train step is one pure function of (state, batch): forward in train mode (batch
statistics, batch formats), cross-entropy, straight-through gradients, then the mean over
all devices (pmap axis 'batch') of the gradients, the BatchNorm statistics and the running
formats, and the optax update. The optimizer and the learning rate follow the official
recipe (docs/METHOD.md 7).
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics
from flax.training import train_state

from f8net_jax import models
from f8net_jax.quant_config import QuantConfig

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
    # (The classifier of a quantized plain Flax model has the user's name.)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(sown.get("formats", {})))
    scale = next((v for k, v in flat.items() if k[-1] == "logit_scale"), (1.0,))[0]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits * scale, batch["label"])
    return _metrics(logits, batch, losses)


def pmap_eval_step(model):
    """``eval_step`` pmapped over the local devices (axis 'batch')."""
    return jax.pmap(functools.partial(eval_step, model=model), axis_name="batch")
