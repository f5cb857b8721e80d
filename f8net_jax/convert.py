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
sharing never reads (``correspondence.official_extras`` gives the rule).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

import numpy as np

from f8net_jax.correspondence import (CONVERTIBLE, SOURCES, ConversionError, official_extras,
                                      official_layers, relu6_alphas, source_entries,
                                      torchvision_layers)


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
# Conversion.


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
    from f8net_jax.run_config import load_config_file as load_config
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

    from f8net_jax import steps

    model = steps.create_model(config, num_classes)
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

    from f8net_jax import checkpoints, steps

    lr_fn = steps.learning_rate_fn(config, steps_per_epoch=1, total_steps=1)
    state = steps.create_train_state(jax.random.PRNGKey(0), config, model, image_shape, lr_fn)
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
