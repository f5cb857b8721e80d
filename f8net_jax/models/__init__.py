"""The paper's models, each usable in float and fixed point from one definition.

    model = models.create("resnet18", num_classes=1000, quant=QuantConfig(mode="fixed"))
    variables = model.init(rng, images, train=False)
    logits, updates = model.apply(variables, images, train=True,
                                  mutable=["batch_stats", "quant_stats"])
"""

from __future__ import annotations

from typing import Optional

from f8net_jax.layers import QuantConfig
from f8net_jax.models.mobilenet import MobileNetV1, MobileNetV2
from f8net_jax.models.resnet import ResNet
from f8net_jax.models import user
from f8net_jax.models.user import is_user_model

_RESNETS = {
    # name: (stage sizes, bottleneck, CIFAR-style)
    "resnet18": ((2, 2, 2, 2), False, False),
    "resnet34": ((3, 4, 6, 3), False, False),
    "resnet50": ((3, 4, 6, 3), True, False),
    "resnet20": ((3, 3, 3), False, True),
    "resnet56": ((9, 9, 9), False, True),
}
MODEL_NAMES = tuple(_RESNETS) + ("mobilenet_v1", "mobilenet_v2")


def create(name: str, *, num_classes: int, quant: Optional[QuantConfig] = None,
           width_multiplier: float = 1.0):
    """A linen module for ``name`` (one of MODEL_NAMES, or 'package.module:factory': a
    user's plain Flax model, quantized, see models/user.py). ``width_multiplier`` scales
    the channels of the MobileNets."""
    if name not in MODEL_NAMES and not is_user_model(name):
        raise ValueError(f"model must be one of {list(MODEL_NAMES)} or a user model "
                         f"'package.module:factory', got {name!r}")
    if quant is None:
        quant = QuantConfig()
    if not isinstance(quant, QuantConfig):
        raise ValueError(f"quant must be a QuantConfig, got {type(quant).__name__}")
    if is_user_model(name):
        if width_multiplier != 1.0:
            raise ValueError(f"width_multiplier applies to the MobileNets only, not {name}")
        return user.create(name, num_classes=num_classes, quant=quant)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
    if name in _RESNETS:
        if width_multiplier != 1.0:
            raise ValueError(f"width_multiplier applies to the MobileNets only, not {name}")
        stages, bottleneck, cifar = _RESNETS[name]
        return ResNet(stage_sizes=stages, num_classes=num_classes, quant=quant,
                      bottleneck=bottleneck, cifar_stem=cifar)
    cls = MobileNetV1 if name == "mobilenet_v1" else MobileNetV2
    return cls(num_classes=num_classes, quant=quant, width_multiplier=width_multiplier)
