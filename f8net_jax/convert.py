"""Brings pretrained and official F8Net checkpoints in as training workdirs.

    python -m f8net_jax.convert --from=torchvision|official --model=NAME --input=FILE \
        --output=WORKDIR [--config=configs/X.py] [--data_dir=TFDS] [--num_classes=K]

``--from=torchvision``: a state dict of torchvision's resnet18, resnet50 or mobilenet_v2
(their key names and shapes), or, for mobilenet_v1, which torchvision lacks, of the
official code's float MobileNet V1; into our float model without clipping, with
normalized input (the pretrained networks' own input). ``--from=official``: a state dict
saved by the official F8Net code (snap-research/F8Net, models/fix_resnet.py,
fix_mobilenet_v1.py, fix_mobilenet_v2.py), fixed point (its ``fix_quant`` configs) or
float (its ``floating`` configs, PACT clipping): every weight, BatchNorm statistic, used
alpha and running input fraclen goes to our variables.

FILE is a ``.pth``/``.pt`` (read with torch, which is then needed; a checkpoint holding
``state_dict`` or ``model`` is unwrapped, DataParallel's ``module.`` prefix dropped) or a
``.npz`` of the same keys (no torch needed). The config is ``--config`` or by default
configs/imagenet_<model>_{f8,fp}.py, adapted to the source (torchvision: float, no
clipping, normalized input, no classifier rescaling). WORKDIR receives an orbax
checkpoint at step 0 of the whole train state and config.json, as a training run would:
``init_from``, ``checkpoints.load_workdir`` and the ``integer.export_program`` and
``integer.verify_program`` commands accept it, and ``f8net_jax.main`` continues training it.

Everything is checked before anything is written: a key missing or left over, a wrong
shape or class count, and a fixed-point state dict given as float (or the reverse) fail
with a message naming the key. Keys we drop on purpose: ``num_batches_tracked`` (not
used in eval or training with a momentum), and the official alphas that its clipping
sharing never reads (``DROPPED`` below lists the rule per model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

import numpy as np

SOURCES = ("torchvision", "official")
CONVERTIBLE = {"torchvision": ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2"),
               "official": ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")}
BN_STATS = ("running_mean", "running_var")


class ConversionError(ValueError):
    """A state dict that does not fit the model: names the key."""


# --------------------------------------------------------------------------------------
# Reading.


def read_state_dict(path: str) -> dict:
    """{key: numpy array} of a .npz, or of a .pth/.pt read with torch (CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path!r} is not a file")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    if not path.endswith((".pth", ".pt")):
        raise ConversionError(f"--input {path!r}: expected a .pth, .pt or .npz file")
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"reading {path!r} needs torch (pip install torch), or save the "
                              f"state dict as .npz: numpy.savez(F, **{{k: v.numpy() for k, v "
                              f"in state_dict.items()}})") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            out[k[len("module."):] if k.startswith("module.") else k] = v.detach().cpu().numpy()
    return out


# --------------------------------------------------------------------------------------
# Which source layer is which of ours. A correspondence is a list of
# (our layer path, source prefix, kind), kind "convbn" or "dense".


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


# --------------------------------------------------------------------------------------
# Conversion.


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


def _ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def convert_variables(state: dict, entries: dict, ours: dict,
                      ignorable: Callable[[str], bool] = _ignorable,
                      constants: Optional[dict] = None) -> dict:
    """Our variables (``ours``: {(collection, path): shape}) filled from ``state`` by
    ``entries`` (and ``constants``, values no source key holds); raises ConversionError
    naming the first missing, extra or misshapen key."""
    constants = constants or {}
    missing_ours = sorted(set(ours) - set(entries) - set(constants))
    if missing_ours:
        col, path = missing_ours[0]
        raise ConversionError(f"no source key feeds our {col}/{path}")
    out, used = dict(constants), set()
    order = sorted(ours.items(), key=lambda item: (item[0][0] != "params", item[0][1]))
    missing = [(entries[k][0], k) for k, _ in order if k not in constants
               and entries[k][0] not in state]
    if missing:
        key, (col, path) = missing[0]
        raise ConversionError(f"key {key!r} is missing from the state dict (it feeds "
                              f"{col}/{path})" + (f"; {len(missing) - 1} more keys are missing"
                                                  if len(missing) > 1 else ""))
    for (col, path), shape in order:
        if (col, path) in constants:
            continue
        key, transform = entries[(col, path)]
        value = np.asarray(state[key], np.float32)
        if transform is not None:
            value = transform(value)
        if value.shape != tuple(shape):
            raise ConversionError(f"key {key!r} has shape {tuple(np.shape(state[key]))}, which "
                                  f"gives {value.shape}; {col}/{path} needs {tuple(shape)}")
        out[(col, path)] = value
        used.add(key)
    extra = sorted(k for k in state if k not in used and not ignorable(k))
    if extra:
        raise ConversionError(f"key {extra[0]!r} of the state dict has no place in our model"
                              + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))
    return out


def default_config(source: str, model: str, config_path: str = ""):
    """The run's config: --config, or configs/imagenet_<model>_{f8,fp}.py adapted to the
    source."""
    from f8net_jax.train import load_config_file as load_config
    check_choice(source, model)
    if config_path:
        return load_config(config_path)
    from f8net_jax import configs

    if source == "torchvision":
        name = f"imagenet_{model}_fp.py"
    elif model == "resnet50":  # the official ResNet-50 is the tiny fine-tuning recipe
        name = "imagenet_resnet50_tiny_finetune.py"
    else:
        name = f"imagenet_{model}_f8.py"
    config = load_config(configs.path(name))
    if source == "torchvision":
        config.quant.mode = "float"
        # ReLU networks: no clipping; MobileNet V2's ReLU6 is a clip (relu6_alphas);
        # the official float MobileNet V1 has PACT alphas.
        config.quant.clipping = model in ("mobilenet_v1", "mobilenet_v2")
        config.quant.normalized_input = model != "mobilenet_v1"
        config.quant.rescale_classifier = model == "mobilenet_v1"
    return config


def our_shapes(config, num_classes: int):
    """{(collection, path): shape} of our model's variables, and the image shape."""
    import flax
    import jax
    import jax.numpy as jnp

    from f8net_jax import train

    model = train.create_model(config, num_classes)
    shape = (config.image_size, config.image_size, config.get("channels", 3))
    variables = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1,) + shape, jnp.uint8), train=False))
    out = {}
    for col in ("params", "batch_stats", "quant_stats"):
        for path, leaf in flax.traverse_util.flatten_dict(variables.get(col, {})).items():
            out[(col, "/".join(path))] = tuple(leaf.shape)
    return model, out, shape


def write_workdir(workdir: str, config, model, image_shape, values: dict) -> None:
    """An orbax checkpoint at step 0 of the train state holding ``values``, and
    config.json, as train.train_and_evaluate writes them."""
    import flax
    import jax
    import jax.numpy as jnp

    from f8net_jax import checkpoints, train

    lr_fn = train.learning_rate_fn(config, steps_per_epoch=1, total_steps=1)
    state = train.create_train_state(jax.random.PRNGKey(0), config, model, image_shape, lr_fn)
    trees = {}
    for col in ("params", "batch_stats", "quant_stats"):
        flat = {tuple(path.split("/")): jnp.asarray(v) for (c, path), v in values.items()
                if c == col}
        trees[col] = flax.traverse_util.unflatten_dict(flat) if flat else {}
    state = state.replace(params=trees["params"], batch_stats=trees["batch_stats"],
                          quant_stats=trees["quant_stats"])
    state = state.replace(opt_state=state.tx.init(state.params))
    os.makedirs(workdir, exist_ok=True)
    mngr = checkpoints.manager(workdir, config.max_checkpoints)
    checkpoints.save(mngr, 0, jax.device_get(state))
    mngr.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))


def check_choice(source: str, model: str) -> None:
    if source not in SOURCES:
        raise ConversionError(f"--from must be one of {list(SOURCES)}, got {source!r}")
    if model not in CONVERTIBLE[source]:
        raise ConversionError(f"--model {model!r} cannot come from {source}; choose one of "
                              f"{list(CONVERTIBLE[source])}")


def convert(source: str, model_name: str, state: dict, config,
            num_classes: Optional[int] = None):
    """(model, {(collection, path): array}, image shape, warnings) of ``state`` for
    ``config``."""
    check_choice(source, model_name)
    if config.model != model_name:
        raise ConversionError(f"the config's model is {config.model!r}, --model says "
                              f"{model_name!r}")
    fixed = config.quant.mode == "fixed"
    fraclen_keys = sorted(k for k in state if k.endswith("input_fraclen"))
    if source == "torchvision" and fixed:
        raise ConversionError("a torchvision state dict is a float model: use a config with "
                              "quant.mode='float'")
    if fraclen_keys and not fixed:
        raise ConversionError(f"key {fraclen_keys[0]!r} marks a fixed-point state dict, but the "
                              f"config is float (quant.mode='float'): use a fixed-point config")
    pairs = torchvision_layers(model_name) if source == "torchvision" else official_layers(
        model_name)
    classifier = next(theirs for ours, theirs, kind in pairs if kind == "dense")
    key = f"{classifier}.weight"
    if key not in state:
        raise ConversionError(f"key {key!r} (the classifier) is missing from the state dict")
    found = int(np.shape(state[key])[0])
    if num_classes is not None and found != num_classes:
        raise ConversionError(f"key {key!r} has {found} classes; --num_classes says "
                              f"{num_classes}")
    model, shapes, image_shape = our_shapes(config, found)
    entries, dropped, warnings = source_entries(pairs), set(), []
    if source == "official" or model_name == "mobilenet_v1":
        extra, dropped, warnings = official_extras(pairs, state, shapes)
        entries.update(extra)
    constants = (relu6_alphas(shapes) if source == "torchvision" and model_name == "mobilenet_v2"
                 else {})
    values = convert_variables(state, entries, shapes,
                               ignorable=lambda k: _ignorable(k) or k in dropped,
                               constants=constants)
    return model, values, image_shape, warnings


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m f8net_jax.convert",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, help=".pth/.pt (needs torch) or .npz")
    parser.add_argument("--output", required=True, help="the workdir to write")
    parser.add_argument("--config", default="", help="config file (default: "
                        "configs/imagenet_<model>_{fp,f8}.py adapted to the source)")
    parser.add_argument("--data_dir", default=None,
                        help="tfds data_dir written into the workdir's config")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="classes the classifier must have (default: any)")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.output) and (not os.path.isdir(args.output)
                                            or os.listdir(args.output)):
            raise ConversionError(f"--output {args.output!r} exists and is not an empty folder")
        state = read_state_dict(args.input)
        config = default_config(args.source, args.model, args.config)
        if args.data_dir is not None:
            config.data_dir = args.data_dir
        model, values, image_shape, warnings = convert(args.source, args.model, state, config,
                                                       args.num_classes)
        for warning in warnings:
            print(f"f8net_jax.convert: warning: {warning}", file=sys.stderr)
        write_workdir(args.output, config, model, image_shape, values)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"f8net_jax.convert: {e}")
    print(json.dumps({"workdir": args.output, "model": args.model, "source": args.source,
                      "mode": config.quant.mode, "variables": len(values)}))


if __name__ == "__main__":
    main(sys.argv[1:])
