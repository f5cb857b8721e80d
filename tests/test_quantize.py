"""f8net_jax.quantize: a ResNet-20 written in plain Flax, given models.resnet20's
parameters (mapped by name), computes through quantize what ours computes, bit for bit:
logits, gradients, formats after training steps, the integer program; what F8Net cannot
express is refused at init, naming the module and the op."""

import functools

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

SIZE, BATCH, CLASSES = 8, 4, 10


class PlainBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                               epsilon=1e-5)
        conv = functools.partial(nn.Conv, use_bias=False)
        y = conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = bn(name="bn2")(conv(self.features, (3, 3), padding=1, name="conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), self.strides, padding=0, name="shortcut")(x)
            x = bn(name="shortcut_bn")(x)
        return nn.relu(y + x)


class PlainResNet20(nn.Module):
    """CIFAR ResNet-20 as a Flax user writes it: no F8Net in sight."""

    num_classes: int = CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 name="stem_bn")(x))
        for i, width in enumerate((16, 32, 64)):
            for j in range(3):
                x = PlainBlock(width, 2 if i > 0 and j == 0 else 1,
                               name=f"stage{i + 1}_block{j + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


# Our layer -> (the plain model's conv or dense, its BatchNorm).
def _layer_names():
    names = {"stem": ("stem", "stem_bn"), "classifier": ("head", None)}
    for i in range(3):
        for j in range(3):
            block = f"stage{i + 1}_block{j + 1}"
            names[f"{block}/body_0"] = (f"{block}/conv1", f"{block}/bn1")
            names[f"{block}/body_1"] = (f"{block}/conv2", f"{block}/bn2")
            if i > 0 and j == 0:
                names[f"{block}/shortcut"] = (f"{block}/shortcut", f"{block}/shortcut_bn")
    return names


LAYERS = _layer_names()


def to_plain(tree: dict) -> dict:
    """Our variables (any collections) under the plain model's names."""
    out = {}
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
        collection, *inner = path
        for depth in (2, 1):
            ours = "/".join(inner[:depth])
            if ours in LAYERS:
                rest = inner[depth:]
                conv, bn = LAYERS[ours]
                owner = bn if rest[0] in ("scale", "bias", "mean", "var") and bn else conv
                out[(collection, *owner.split("/"), *rest)] = value
                break
        else:
            raise KeyError(path)
    return flax.traverse_util.unflatten_dict(out)


def from_plain(tree: dict) -> dict:
    back = {}
    for ours, (conv, bn) in LAYERS.items():
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


def _images(seed=0, n=BATCH):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _pair(quant):
    ours = models.create("resnet20", num_classes=CLASSES, quant=quant)
    plain = f8net_jax.quantize(PlainResNet20(), quant=quant)
    variables = jax.jit(lambda x: ours.init(jax.random.PRNGKey(1), x))(_images())
    variables = {c: variables[c] for c in ("params", "batch_stats", "quant_stats")
                 if c in variables}
    return ours, plain, variables


QUANTS = [QuantConfig(), QuantConfig(mode="float"), QuantConfig(mode="float", clipping=False)]


@pytest.mark.parametrize("quant", QUANTS[:2], ids=["fixed", "float"])
def test_plain_resnet20_has_our_variables_under_its_own_names(quant):
    ours, plain, variables = _pair(quant)
    theirs = jax.eval_shape(lambda x: plain.init(jax.random.PRNGKey(0), x), _images())
    theirs = {c: theirs[c] for c in variables}
    assert jax.tree_util.tree_map(np.shape, to_plain(variables)) == \
        jax.tree_util.tree_map(lambda a: a.shape, theirs)


@pytest.mark.parametrize("quant", QUANTS, ids=["fixed", "float", "float-noclip"])
def test_logits_gradients_and_state_updates_are_ours_bit_for_bit(quant):
    ours, plain, variables = _pair(quant)
    images, labels = _images(3), np.arange(BATCH) % CLASSES

    def step(model, variables):
        def loss(params):
            logits, new = model.apply({**variables, "params": params}, images, train=True,
                                      mutable=["batch_stats", "quant_stats"])
            return jnp.mean(-jax.nn.log_softmax(logits)[np.arange(BATCH), labels]), (
                logits, new)
        (_, (logits, new)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return logits, grads, new, model.apply(variables, images, train=False)

    mine = jax.jit(functools.partial(step, ours))(variables)
    theirs = jax.jit(functools.partial(step, plain))(to_plain(variables))
    for name, a, b in zip(("train logits", "grads", "updates", "eval logits"), mine, theirs):
        if name == "grads":
            _assert_same_tree({"params": a}, from_plain({"params": b}))
        elif isinstance(a, dict):
            _assert_same_tree(a, from_plain(b))
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _train(model, variables, steps=3, lr=0.05):
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
        variables = step(variables, _images(10 + i), np.arange(BATCH) % CLASSES)
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


def test_formats_after_training_and_the_integer_program_are_ours():
    quant = QuantConfig()
    ours, plain, variables = _pair(quant)
    mine = _train(ours, variables)
    theirs = _train(plain, to_plain(variables))
    _assert_same_tree(mine, from_plain(theirs))
    formats = np.asarray(jax.tree_util.tree_leaves(mine["quant_stats"]))
    assert np.any(formats != 6.0)  # the running formats moved

    ours_program = integer.export(mine, ours, image_shape=(SIZE, SIZE, 3))
    plain_program = integer.export(theirs, plain, image_shape=(SIZE, SIZE, 3))
    rename = sorted(((conv, o) for o, (conv, _) in LAYERS.items()), key=lambda p: -len(p[0]))
    ops, tensors, arrays = _program_names(plain_program, rename)
    assert ops == ours_program.ops
    assert tensors == ours_program.tensors
    assert sorted(arrays) == sorted(ours_program.arrays)
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], ours_program.arrays[k], err_msg=k)

    report = verify(plain_program, plain, theirs, _images(20, 8))
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
