"""f8net_jax.quantize: a ResNet-20 written in plain Flax, given models.resnet20's
parameters (mapped by name), computes through quantize what ours computes, bit for bit:
logits, gradients, formats after training steps, the integer program; what F8Net cannot
express is refused at init, naming the module and the op."""

import functools
import os
import re
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import f8net_jax
from f8net_jax import integer, models
from f8net_jax.integer.verification import verify
from f8net_jax.plan import Refused
from f8net_jax.quant_config import QuantConfig
from plain_models import PlainMobileNetV2, PlainResNet20

SIZE, BATCH, CLASSES = 8, 4, 10
SIZES = {"resnet20": 8, "mobilenet_v2": 32}


# Our layer -> (the plain model's conv or dense, its BatchNorm).
def _resnet20_layers():
    names = {"stem": ("stem", "stem_bn"), "classifier": ("head", None)}
    for i in range(3):
        for j in range(3):
            block = f"stage{i + 1}_block{j + 1}"
            names[f"{block}/body_0"] = (f"{block}/conv1", f"{block}/bn1")
            names[f"{block}/body_1"] = (f"{block}/conv2", f"{block}/bn2")
            if i > 0 and j == 0:
                names[f"{block}/shortcut"] = (f"{block}/shortcut", f"{block}/shortcut_bn")
    return names


def _mobilenet_v2_layers():
    names = {"stem": ("stem", "stem_bn"), "tail": ("tail", "tail_bn"),
             "classifier": ("head", None)}
    index = 0
    for t, _, n, _ in PlainMobileNetV2.SETTING:
        for _ in range(n):
            index += 1
            for i in range(3 if t != 1 else 2):
                names[f"block{index}/layers_{i}"] = (f"block{index}/conv{i}",
                                                     f"block{index}/bn{i}")
    return names


MODELS = {  # ours, its plain Flax twin, the name map
    "resnet20": (dict(), lambda: PlainResNet20(num_classes=CLASSES), _resnet20_layers()),
    "mobilenet_v2": (dict(width_multiplier=0.25),
                     lambda: PlainMobileNetV2(num_classes=CLASSES, width=0.25),
                     _mobilenet_v2_layers()),
}
LAYERS = MODELS["resnet20"][2]


def to_plain(tree: dict, layers=LAYERS) -> dict:
    """Our variables (any collections) under the plain model's names."""
    out = {}
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
        collection, *inner = path
        for depth in (2, 1):
            ours = "/".join(inner[:depth])
            if ours in layers:
                rest = inner[depth:]
                conv, bn = layers[ours]
                owner = bn if rest[0] in ("scale", "bias", "mean", "var") and bn else conv
                out[(collection, *owner.split("/"), *rest)] = value
                break
        else:
            raise KeyError(path)
    return flax.traverse_util.unflatten_dict(out)


def from_plain(tree: dict, layers=LAYERS) -> dict:
    back = {}
    for ours, (conv, bn) in layers.items():
        back[conv] = ours
        if bn:
            back[bn] = ours
    out = {}
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
        collection, *inner = path
        for depth in (2, 1):
            plain = "/".join(inner[:depth])
            if plain in back:
                out[(collection, *back[plain].split("/"), *inner[depth:])] = value
                break
        else:
            raise KeyError(path)
    return flax.traverse_util.unflatten_dict(out)


def _assert_same_tree(a, b):
    fa, fb = (flax.traverse_util.flatten_dict(flax.core.unfreeze(t), sep="/") for t in (a, b))
    assert sorted(fa) == sorted(fb)
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def _images(seed=0, n=BATCH, size=SIZE):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _pair(quant, name="resnet20"):
    kwargs, make_plain, _ = MODELS[name]
    ours = models.create(name, num_classes=CLASSES, quant=quant, **kwargs)
    plain = f8net_jax.quantize(make_plain(), quant=quant)
    variables = jax.jit(lambda x: ours.init(jax.random.PRNGKey(1), x))(
        _images(size=SIZES[name]))
    variables = {c: variables[c] for c in ("params", "batch_stats", "quant_stats")
                 if c in variables}
    return ours, plain, variables


QUANTS = [QuantConfig(), QuantConfig(mode="float"), QuantConfig(mode="float", clipping=False)]
# (model, quant): ResNet-20 in every mode here, MobileNet V2 in the slow suite.
CASES = [pytest.param("resnet20", q, id=f"resnet20-{i}")
         for q, i in zip(QUANTS, ("fixed", "float", "float-noclip"))] + [
    pytest.param("mobilenet_v2", QUANTS[0], id="mobilenet_v2-fixed", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", QUANTS[1], id="mobilenet_v2-float", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", QUANTS[2], id="mobilenet_v2-float-noclip",
                 marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", [
    "resnet20", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_the_plain_models_have_our_variables_under_their_own_names(name):
    ours, plain, variables = _pair(QUANTS[0], name)
    images = _images(size=SIZES[name])
    theirs = jax.eval_shape(lambda x: plain.init(jax.random.PRNGKey(0), x), images)
    theirs = {c: theirs[c] for c in variables}
    assert jax.tree_util.tree_map(np.shape, to_plain(variables, MODELS[name][2])) == \
        jax.tree_util.tree_map(lambda a: a.shape, theirs)


@pytest.mark.parametrize("name, quant", CASES)
def test_logits_gradients_and_state_updates_are_ours_bit_for_bit(name, quant):
    ours, plain, variables = _pair(quant, name)
    layers = MODELS[name][2]
    images, labels = _images(3, size=SIZES[name]), np.arange(BATCH) % CLASSES

    def step(model, variables):
        def loss(params):
            logits, new = model.apply({**variables, "params": params}, images, train=True,
                                      mutable=["batch_stats", "quant_stats"])
            return jnp.mean(-jax.nn.log_softmax(logits)[np.arange(BATCH), labels]), (
                logits, new)
        (_, (logits, new)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return logits, grads, new, model.apply(variables, images, train=False)

    mine = jax.jit(functools.partial(step, ours))(variables)
    theirs = jax.jit(functools.partial(step, plain))(to_plain(variables, layers))
    for what, a, b in zip(("train logits", "grads", "updates", "eval logits"), mine, theirs):
        if what == "grads":
            _assert_same_tree({"params": a}, from_plain({"params": b}, layers))
        elif isinstance(a, dict):
            _assert_same_tree(a, from_plain(b, layers))
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)


def _train(model, variables, steps=3, lr=0.05, size=SIZE):
    @jax.jit
    def step(variables, images, labels):
        def loss(params):
            logits, new = model.apply({**variables, "params": params}, images, train=True,
                                      mutable=["batch_stats", "quant_stats"])
            return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(BATCH), labels]), new
        (_, new), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, variables["params"], grads)
        return {"params": params, **new}

    for i in range(steps):
        variables = step(variables, _images(10 + i, size=size), np.arange(BATCH) % CLASSES)
    return variables


def _program_names(program, rename):
    """The program as JSON-like data with the plain model's names turned into ours."""
    def fix(v):
        if isinstance(v, str):
            for plain, ours in rename:
                if v == plain or v.startswith(plain + "/"):
                    return ours + v[len(plain):]
            return v
        if isinstance(v, dict):
            return {fix(k): fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v
    return fix(program.ops), fix(program.tensors), {fix(k): np.asarray(a)
                                                    for k, a in program.arrays.items()}


@pytest.mark.parametrize("name", [
    "resnet20", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_formats_after_training_and_the_integer_program_are_ours(name):
    quant, layers, size = QuantConfig(), MODELS[name][2], SIZES[name]
    ours, plain, variables = _pair(quant, name)
    mine = _train(ours, variables, size=size)
    theirs = _train(plain, to_plain(variables, layers), size=size)
    _assert_same_tree(mine, from_plain(theirs, layers))
    formats = np.asarray(jax.tree_util.tree_leaves(mine["quant_stats"]))
    assert np.any(formats != 6.0)  # the running formats moved

    ours_program = integer.export(mine, ours, image_shape=(size, size, 3))
    plain_program = integer.export(theirs, plain, image_shape=(size, size, 3))
    rename = sorted(((conv, o) for o, (conv, _) in layers.items()), key=lambda p: -len(p[0]))
    ops, tensors, arrays = _program_names(plain_program, rename)
    assert ops == ours_program.ops
    assert tensors == ours_program.tensors
    assert sorted(arrays) == sorted(ours_program.arrays)
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], ours_program.arrays[k], err_msg=k)

    report = verify(plain_program, plain, theirs, _images(20, 8, size))
    assert report.exact, (report.tensors_differing, report.max_logit_diff)


# --------------------------------------------------------------------------------------
# Refused at init, naming the module and the op.


def _conv_bn(x, name, train=False):
    x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name=name)(x)
    return nn.BatchNorm(use_running_average=not train, name=name + "_bn")(x)


class Tiny(nn.Module):
    """stem, one more conv + BN, ``between`` applied to the stream, mean, classifier."""

    between: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_conv_bn(x, "stem", train))
        y = _conv_bn(x, "body", train)
        if self.between == "layernorm":
            y = nn.LayerNorm(name="norm")(y)
        elif self.between == "gelu":
            y = nn.gelu(y)
        elif self.between == "product":
            y = y * x
        elif self.between == "bn_alone":
            y = nn.BatchNorm(use_running_average=not train, name="lonely_bn")(nn.relu(y))
        y = nn.relu(y)
        if self.between == "avg3":
            y = nn.avg_pool(y, (3, 3), strides=(1, 1))
            return nn.Dense(4, name="head")(y.mean(axis=(1, 2)))
        return nn.Dense(4, name="head")(jnp.mean(y, axis=(1, 2)))


def _init(model, size=SIZE):
    x = np.zeros((1, size, size, 3), np.uint8)
    return f8net_jax.quantize(model).init(jax.random.PRNGKey(0), x)


def test_a_float_checkpoint_of_the_plain_model_loads_as_it_is():
    """The user's own variables (their nn.Module's init) are the quantized model's, less
    the alphas and formats it adds."""
    from plain_models import TinyPlainNet
    images = _images()
    theirs = TinyPlainNet(num_classes=4).init(jax.random.PRNGKey(3), images)
    model = f8net_jax.quantize(TinyPlainNet(num_classes=4))
    ours = model.init(jax.random.PRNGKey(0), images)
    ours = {c: ours[c] for c in ("params", "batch_stats", "quant_stats")}  # not the sown
    flat = lambda t: {k: np.shape(v) for k, v in
                      flax.traverse_util.flatten_dict(flax.core.unfreeze(t), sep="/").items()}
    added = {k for k in flat(ours) if k not in flat(theirs)}
    assert all(k.endswith(("input/alpha", "input/fraclen")) for k in added), added
    assert {k: flat(ours)[k] for k in flat(theirs)} == flat(theirs)
    # Their variables, with the added ones at their initial values, run as they are.
    merged = flax.traverse_util.flatten_dict(flax.core.unfreeze(ours))
    merged.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(theirs)))
    variables = flax.traverse_util.unflatten_dict(merged)
    logits = model.apply(variables, images)
    assert logits.shape == (BATCH, 4) and np.all(np.isfinite(np.asarray(logits)))


def test_a_plain_tiny_model_initializes():
    variables = _init(Tiny())
    assert "alpha" in variables["params"]["body"]["input"]


@pytest.mark.parametrize("between, size, match", [
    ("layernorm", SIZE, r"LayerNorm 'norm' runs between quantized layers"),
    ("gelu", SIZE, r"the model's top level computes '(tanh|erf|mul|gelu|add|pow|integer_pow)'"),
    ("product", SIZE, r"the model's top level computes 'mul'"),
    ("bn_alone", SIZE, r"nn.BatchNorm 'lonely_bn' follows no convolution"),
    ("avg3", 5, r"averages over a window of 9 values.*power of two"),
])
def test_ops_the_integer_program_cannot_express_are_refused_at_init(between, size, match):
    with pytest.raises(Refused, match=match):
        _init(Tiny(between), size)


def test_asymmetric_padding_and_conv_bias_are_refused_naming_the_conv():
    class Same(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(8, (3, 3), strides=2, padding="SAME", use_bias=False, name="down")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
            return nn.Dense(2)(x.mean(axis=(1, 2)))

    with pytest.raises(Refused, match=r"nn.Conv 'down': padding 'SAME' pads"):
        _init(Same())


# --------------------------------------------------------------------------------------
# A model that takes uint8 pixels and normalizes them itself.


class _Normalized(nn.Module):
    """``how`` it treats its pixels, then the stem, a block, the mean, a classifier."""

    how: str = "per_channel"

    @nn.compact
    def __call__(self, x, train: bool = False):
        mean, std = jnp.asarray([0.49, 0.48, 0.45]), jnp.asarray([0.25, 0.24, 0.26])
        if self.how == "per_channel":
            x = (x.astype(jnp.float32) / 255.0 - mean) / std
        elif self.how == "by_position":   # a mean image: no table per channel can hold it
            x = x / 255.0 - jnp.linspace(0.0, 0.5, x.shape[2])[None, None, :, None]
        elif self.how == "by_image":      # the image's own mean: not elementwise
            x = x / 255.0 - jnp.mean(x / 255.0)
        elif self.how == "relu_after":
            x = nn.relu(_conv_bn((x / 127.5 - 1.0), "pre", train))
        x = nn.relu(_conv_bn(x, "stem", train))
        y = nn.relu(_conv_bn(x, "body", train) + x)
        return nn.Dense(4, name="head")(jnp.mean(y, axis=(1, 2)))


def test_a_model_normalizing_its_pixels_gets_that_as_the_programs_input_table():
    model = f8net_jax.quantize(_Normalized())
    images = _images(5)
    variables = model.init(jax.random.PRNGKey(0), images)
    assert "alpha" in variables["params"]["stem"]["input"]  # a signed input, its own chain
    variables = _train(model, variables)
    program = integer.export(variables, model, image_shape=(SIZE, SIZE, 3))
    first = program.ops[0]
    assert first["op"] == "lookup"
    # The table is the model's own arithmetic on 0..255, in the stem's input format.
    fl = program.tensors[first["out"]]["fraclen"][0]
    p = np.arange(256, dtype=np.float32)[:, None]
    value = (p / 255.0 - np.float32([0.49, 0.48, 0.45])) / np.float32([0.25, 0.24, 0.26])
    expected = np.clip(np.round(value * 2.0 ** fl), -127, 127).T  # symmetric int8
    np.testing.assert_array_equal(program.arrays[first["table"]], expected)
    report = verify(program, model, variables, _images(21, 16))
    assert report.exact, (report.tensors_differing, report.max_logit_diff)
    # The same model handed float images refuses the arithmetic: the program reads pixels.
    with pytest.raises(Refused, match=r"computes 'div' between quantized layers"):
        model.init(jax.random.PRNGKey(0), images.astype(np.float32) / 256)


def test_pixel_arithmetic_that_is_no_table_is_refused():
    model = f8net_jax.quantize(_Normalized("by_position"))
    variables = model.init(jax.random.PRNGKey(0), _images())
    with pytest.raises(ValueError, match=r"before nn.Conv 'stem' depends on where a pixel is"):
        integer.export(variables, model, image_shape=(SIZE, SIZE, 3))
    with pytest.raises(Refused, match=r"computes '(sub|reduce_sum|div)'"):
        f8net_jax.quantize(_Normalized("by_image")).init(jax.random.PRNGKey(0), _images())
    with pytest.raises(Refused, match=r"normalizes its pixels itself .*normalized_input"):
        f8net_jax.quantize(_Normalized(), quant=QuantConfig(normalized_input=True)).init(
            jax.random.PRNGKey(0), _images())


# --------------------------------------------------------------------------------------
# The launcher: a plain model by 'module:factory', float then fixed point, exported.


def _run(args, tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (tests, os.environ.get("PYTHONPATH", "")) if p))
    out = subprocess.run([sys.executable, "-m", *args], env=env, cwd=os.path.dirname(tests),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_the_launcher_trains_a_plain_model_and_its_program_is_exact(tmp_path):
    train = ["f8net_jax.main", "--config=f8net_jax/configs/smoke.py",
             "--config.model=plain_models:normalizing", "--config.num_train_steps=4"]
    _run([*train, "--config.quant.mode=float", f"--workdir={tmp_path}/float"], tmp_path)
    fixed = [*train[:-1], f"--config.init_from={tmp_path}/float", f"--workdir={tmp_path}/fixed"]
    _run([*fixed, "--config.num_train_steps=2"], tmp_path)
    out = _run([*fixed, "--config.num_train_steps=4"], tmp_path)  # resumes at step 2
    assert re.search(r"Resumed from .* at step 2", out), out[-3000:]
    _run(["f8net_jax.integer.export_program", f"--workdir={tmp_path}/fixed",
          f"--output={tmp_path}/tiny", "--onnx"], tmp_path)
    out = _run(["f8net_jax.integer.verify_program", f"--workdir={tmp_path}/fixed",
                "--num_images=32"], tmp_path)
    assert "max |logit diff| 0 (int32 units)" in out and "agreement 100.00%" in out

    program = integer.load(f"{tmp_path}/tiny")
    assert program.model == "plain_models:normalizing"
    # Its own normalization of the pixels is the program's input table.
    assert program.ops[0]["op"] == "lookup"
    assert {"max_pool", "add", "avg_pool", "dense"} <= {op["op"] for op in program.ops}
    from f8net_jax.integer import audit
    assert audit.audit(integer.Executor(program, backend="xla").jaxpr(batch_size=2)) == []
    pytest.importorskip("onnxruntime")
    from test_onnx import check_onnx_runtime_is_exact
    images = np.random.default_rng(0).integers(0, 256, (4, *program.image_shape), np.uint8)
    check_onnx_runtime_is_exact(program, images)


def test_a_user_model_that_cannot_be_imported_names_the_config_field():
    from f8net_jax import run_config
    from f8net_jax.configs import smoke
    config = smoke.get_config()
    config.model = "no_such_package.models:resnet"
    with pytest.raises(ValueError, match=r"config.model 'no_such_package.models:resnet': "
                                         r"cannot import"):
        run_config.check_config(config)
    config.model = "plain_models:no_such_factory"
    with pytest.raises(ValueError, match=r"config.model .*has no callable 'no_such_factory'"):
        run_config.check_config(config)


def test_a_model_built_with_nn_sequential_exports_an_exact_program():
    """Layers in an nn.Sequential (a container: its calls are read through)."""
    class Seq(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            body = nn.Sequential([
                nn.Conv(8, (3, 3), padding=1, use_bias=False),
                nn.BatchNorm(use_running_average=True), nn.relu,
                nn.Conv(8, (3, 3), padding=1, use_bias=False),
                nn.BatchNorm(use_running_average=True), nn.relu], name="body")
            return nn.Dense(4, name="head")(jnp.mean(body(x), axis=(1, 2)))

    model = f8net_jax.quantize(Seq())
    variables = model.init(jax.random.PRNGKey(0), _images())
    variables = {c: variables[c] for c in ("params", "batch_stats", "quant_stats")}
    program = integer.export(variables, model, image_shape=(SIZE, SIZE, 3))
    assert [op["op"] for op in program.ops].count("conv") == 2
    report = verify(program, model, variables, _images(22, 8))
    assert report.exact, (report.tensors_differing, report.max_logit_diff)
