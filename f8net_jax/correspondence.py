"""Which layer of a torchvision or an official F8Net state dict is which of ours, key by key:
what f8net_jax.convert fills our variables by.

A correspondence is a list of (our layer path, source prefix, kind), kind "convbn" (the
prefix 'conv|bn' of a conv and its BatchNorm) or "dense"; ``source_entries`` turns it into
{(collection, our path): (source key, transform)}. ``official_extras`` adds the official
code's alphas and running input fraclens, ``relu6_alphas`` the constant clips that make
torchvision's MobileNet V2 our float model.
"""

from __future__ import annotations

import numpy as np

SOURCES = ("torchvision", "official")
CONVERTIBLE = {"torchvision": ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2"),
               "official": ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")}


class ConversionError(ValueError):
    """A state dict that does not fit the model: names the key."""


def _resnet_stages(model: str):
    from f8net_jax import models
    stages, bottleneck, cifar = models._RESNETS[model]
    return stages, bottleneck


def torchvision_layers(model: str) -> list:
    if model in ("resnet18", "resnet50"):
        stages, bottleneck = _resnet_stages(model)
        convs = 3 if bottleneck else 2
        pairs = [("stem", "conv1|bn1", "convbn")]
        for s, n in enumerate(stages):
            for b in range(n):
                ours, theirs = f"stage{s + 1}_block{b + 1}", f"layer{s + 1}.{b}"
                for j in range(convs):
                    pairs.append((f"{ours}/body_{j}", f"{theirs}.conv{j + 1}|{theirs}.bn{j + 1}",
                                  "convbn"))
                if b == 0 and (s > 0 or bottleneck):
                    pairs.append((f"{ours}/shortcut",
                                  f"{theirs}.downsample.0|{theirs}.downsample.1", "convbn"))
        return pairs + [("classifier", "fc", "dense")]
    if model == "mobilenet_v2":
        pairs = [("stem", "features.0.0|features.0.1", "convbn"),
                 ("block1/layers_0", "features.1.conv.0.0|features.1.conv.0.1", "convbn"),
                 ("block1/layers_1", "features.1.conv.1|features.1.conv.2", "convbn")]
        for k in range(2, 18):
            f = f"features.{k}.conv"
            pairs += [(f"block{k}/layers_0", f"{f}.0.0|{f}.0.1", "convbn"),
                      (f"block{k}/layers_1", f"{f}.1.0|{f}.1.1", "convbn"),
                      (f"block{k}/layers_2", f"{f}.2|{f}.3", "convbn")]
        return pairs + [("tail", "features.18.0|features.18.1", "convbn"),
                        ("classifier", "classifier.1", "dense")]
    if model == "mobilenet_v1":
        return official_layers(model)
    raise ConversionError(f"--model {model!r} cannot come from torchvision; choose one of "
                          f"{list(CONVERTIBLE['torchvision'])}")


def official_layers(model: str) -> list:
    """The official code's module names (models/fix_*.py): each ReLUClipFXQConvBN P has
    P.conv and P.bn (and P.alpha, P.input_fraclen); the classifier is classifier.0."""
    def convbn(ours, prefix):
        return (ours, f"{prefix}.conv|{prefix}.bn", "convbn")

    pairs = [convbn("stem", "head.0")]
    if model in ("resnet18", "resnet50"):
        stages, bottleneck = _resnet_stages(model)
        for s, n in enumerate(stages):
            for b in range(n):
                ours, theirs = f"stage{s + 1}_block{b + 1}", f"stage_{s}_layer_{b}"
                for j in range(3 if bottleneck else 2):
                    pairs.append(convbn(f"{ours}/body_{j}", f"{theirs}.body.{j}"))
                if b == 0 and (s > 0 or bottleneck):
                    pairs.append(convbn(f"{ours}/shortcut", f"{theirs}.shortcut.0"))
    elif model == "mobilenet_v1":
        k = 0
        for s, n in enumerate((1, 2, 2, 6, 2)):
            for i in range(n):
                k += 1
                pairs.append(convbn(f"layer{k}_depthwise", f"stage_{s}_layer_{i}.body.0"))
                pairs.append(convbn(f"layer{k}_pointwise", f"stage_{s}_layer_{i}.body.1"))
    elif model == "mobilenet_v2":
        k = 0
        for s, n in enumerate((1, 2, 3, 4, 3, 3, 1)):
            for i in range(n):
                k += 1
                for j in range(2 if s == 0 else 3):
                    pairs.append(convbn(f"block{k}/layers_{j}", f"stage_{s}_layer_{i}.body.{j}"))
        pairs.append(convbn("tail", "tail.0"))
    else:
        raise ConversionError(f"--model {model!r} has no official F8Net checkpoint; choose "
                              f"one of {list(CONVERTIBLE['official'])}")
    return pairs + [("classifier", "classifier.0", "dense")]


def _module(theirs: str) -> str:
    """The official module prefix P of a correspondence's source ('P.conv|P.bn' or P)."""
    return theirs.split("|")[0][:-len(".conv")] if "|" in theirs else theirs


def official_extras(pairs: list, state: dict, shapes: dict) -> tuple:
    """Entries of the alphas and running input fraclens our model has, the official keys we
    drop on purpose, and warnings. The official code gives every layer an alpha and (fixed
    point) an input_fraclen buffer, but reads the alpha of the chain's first layer in every
    layer of a residual chain, and never the stem's (it reads pixels unclipped): where our
    layer has no alpha (it reads its chain's), the official alpha is unused and dropped;
    so is the stem's input_fraclen unless the input is normalized."""
    entries, dropped, warnings = {}, set(), []
    for ours, theirs, kind in pairs:
        module = _module(theirs)
        alpha, fraclen = f"{ours}/input/alpha", f"{ours}/input/fraclen"
        if ("params", alpha) in shapes:
            entries[("params", alpha)] = (f"{module}.alpha", None)
        else:
            dropped.add(f"{module}.alpha")
        if ("quant_stats", fraclen) in shapes:
            entries[("quant_stats", fraclen)] = (f"{module}.input_fraclen", _scalar)
        else:
            dropped.add(f"{module}.input_fraclen")
    # ResNet-50: the official first projection shortcut clips at an alpha of its own, which
    # it does read; ours reads the alpha of the stream it shares with the block's first conv.
    own, shared = "stage_0_layer_0.shortcut.0.alpha", "stage_0_layer_0.body.0.alpha"
    if own in state and shared in state and own in dropped and not np.array_equal(
            state[own], state[shared]):
        warnings.append(
            f"{own} = {float(np.asarray(state[own])):.6g} differs from {shared} = "
            f"{float(np.asarray(state[shared])):.6g}: the official code clips the first "
            f"projection shortcut's input at its own alpha, ours at the alpha it shares with "
            f"stage1_block1/body_0 (METHOD.md 5), so that shortcut's output changes; "
            f"training recovers it")
    return entries, dropped, warnings


def _scalar(value: np.ndarray) -> np.ndarray:
    """A per-layer buffer of shape [1] as our scalar."""
    return value.reshape(()) if value.size == 1 else value


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO (depthwise [C,1,k,k] -> [k,k,1,C])


def source_entries(pairs: list, conv_suffix: str = ".weight") -> dict:
    """{(collection, our path): (source key, transform)} for the layers of ``pairs``."""
    entries = {}
    for ours, theirs, kind in pairs:
        if kind == "dense":
            entries[("params", f"{ours}/kernel")] = (f"{theirs}.weight", np.transpose)
            entries[("params", f"{ours}/bias")] = (f"{theirs}.bias", None)
            continue
        conv, bn = theirs.split("|")
        entries[("params", f"{ours}/kernel")] = (conv + conv_suffix, _conv_kernel)
        entries[("params", f"{ours}/scale")] = (f"{bn}.weight", None)
        entries[("params", f"{ours}/bias")] = (f"{bn}.bias", None)
        entries[("batch_stats", f"{ours}/mean")] = (f"{bn}.running_mean", None)
        entries[("batch_stats", f"{ours}/var")] = (f"{bn}.running_var", None)
    return entries


def relu6_alphas(shapes: dict) -> dict:
    """torchvision's MobileNet V2 in our float model with clipping: its ReLU6 is the clip
    at alpha 6 of every unsigned input; its linear bottlenecks, which our signed inputs
    clip at +-alpha, get alpha 2^15, far above any activation. The float model then
    computes torchvision's function exactly."""
    out = {}
    for col, path in shapes:
        if path.endswith("/input/alpha"):
            layer = path[:-len("/input/alpha")]
            signed = layer == "tail" or (layer.endswith("/layers_0") and layer != "block1/layers_0")
            out[(col, path)] = np.float32(2.0 ** 15 if signed else 6.0)
    return out
