"""A user's own plain Flax model as ``config.model``: 'package.module:factory', a callable
returning the (unbound) Linen module, called with ``num_classes=`` when it takes that
argument. The launcher quantizes it (f8net_jax.quantize) with the config's quant block."""

from __future__ import annotations

import importlib
import inspect

import flax
import numpy as np


def is_user_model(name) -> bool:
    return isinstance(name, str) and ":" in name


def factory(name: str):
    """The callable named by 'package.module:factory'; ValueError naming config.model."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"config.model {name!r}: a user model is 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"config.model {name!r}: cannot import {module_name!r} ({e})") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"config.model {name!r}: {module_name} has no callable {attr!r}")
    return fn


def create(name: str, *, num_classes: int, quant):
    """The quantized user model of ``name``."""
    import flax.linen as nn

    from f8net_jax.quantized import Quantized, quantize

    fn = factory(name)
    try:
        takes_classes = "num_classes" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_classes = False
    module = fn(num_classes=num_classes) if takes_classes else fn()
    if isinstance(module, Quantized):
        module = module.original.module
    if not isinstance(module, nn.Module):
        raise ValueError(f"config.model {name!r}: the factory returned a "
                         f"{type(module).__name__}, not a flax.linen Module")
    return quantize(module, quant=quant)


def rebuild(name: str, params, *, quant, image_size: int, num_classes: int, channels: int):
    """(model, num_classes, channels) of a user model whose trained ``params`` are given:
    the classifier's and the first conv's shapes say how many classes and image channels
    it has."""
    model = create(name, num_classes=num_classes, quant=quant)
    plan = model.plan((1, image_size, image_size, channels), train=False)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    classes = int(np.shape(flat[f"{plan.classifier.name}/bias"])[0])
    channels = int(np.shape(flat[f"{plan.layers[0].name}/kernel"])[2])
    if classes != num_classes:
        model = create(name, num_classes=classes, quant=quant)
    return model, classes, channels
