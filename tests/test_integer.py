"""Integer-only inference: exact equality with the simulation (logits and every
intermediate tensor) for every architecture, the jaxpr audit, static bounds, save/load,
jax.export and the export/verify commands."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from f8net_jax import fixed_point as fp
from f8net_jax import integer, machine, models
from f8net_jax.integer import (arithmetic, audit, executor, onednn, program as program_lib,
                               verification, vnni)
from f8net_jax.integer.verification import verify
from f8net_jax.layers import QuantConfig, QuantConvBN, QuantDense
from f8net_jax.models.common import prepare_image
from f8net_jax.streams import global_average_pool, relu, scale_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["im2col"] + (["xla", "vnni", "onednn"] if jax.default_backend() == "cpu" else [])
for _name, _available in executor.KERNEL_BACKENDS.items():
    if _name in BACKENDS and not _available()[0]:
        BACKENDS.remove(_name)
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def random_state(variables, seed):
    """Trained-looking state: BatchNorm affine and running statistics, alphas and running
    input formats drawn at random, so that formats, shifts and biases all differ."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    out = {}
    for path, value in flat.items():
        shape, leaf = np.shape(value), path[-1]
        if path[0] == "params" and leaf == "scale":
            value = rng.uniform(0.3, 1.5, shape)
        elif path[0] == "params" and leaf == "bias":
            value = rng.normal(0, 0.5, shape)
        elif leaf == "alpha":
            value = rng.uniform(1.0, 12.0, shape)
        elif leaf == "mean":
            value = rng.normal(0, 0.5, shape)
        elif leaf == "var":
            value = rng.uniform(0.2, 3.0, shape)
        elif leaf == "fraclen":
            value = rng.uniform(2.0, 8.4, shape)
        out[path] = jnp.asarray(value, jnp.float32)
    return flax.traverse_util.unflatten_dict(out)


def make(name, size, quant, *, channels=3, classes=10, width=1.0, seed=0):
    kwargs = {} if name.startswith("resnet") else {"width_multiplier": width}
    model = models.create(name, num_classes=classes, quant=quant, **kwargs)
    x = np.random.default_rng(seed).integers(0, 256, (3, size, size, channels), dtype=np.uint8)
    variables = random_state(jax.jit(lambda x: model.init(jax.random.PRNGKey(seed), x))(x), seed)
    program = integer.export(variables, name, {"quant": quant, "width_multiplier": width},
                             image_shape=x.shape[1:])
    return model, variables, program, x


CASES = [
    ("resnet20", 16, QuantConfig(), 1, 1.0),
    pytest.param("resnet20", 16, QuantConfig(granularity="channel"), 1, 1.0,
                 marks=pytest.mark.slow),
    ("resnet20", 16, QuantConfig(normalized_input=True, clipping=False, format_rule="grid"), 3,
     1.0),
    ("mobilenet_v1", 32, QuantConfig(), 3, 0.25),
    pytest.param("mobilenet_v2", 32, QuantConfig(granularity="channel",
                                                 share_classifier_alpha=True), 3, 0.25,
                 marks=pytest.mark.slow),
    pytest.param("resnet20", 16, QuantConfig(wide_fraclen=True, share_alpha=False), 1, 1.0,
                 marks=pytest.mark.slow),
    pytest.param("resnet18", 32, QuantConfig(granularity="channel"), 3, 1.0,
                 marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", 32, QuantConfig(), 3, 0.5, marks=pytest.mark.slow),
    pytest.param("resnet34", 32, QuantConfig(), 3, 1.0, marks=pytest.mark.slow),
    pytest.param("resnet50", 32, QuantConfig(granularity="channel"), 3, 1.0,
                 marks=pytest.mark.slow),
    pytest.param("resnet56", 16, QuantConfig(), 3, 1.0, marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", 32, QuantConfig(wide_fraclen=True, share_alpha=False,
                                                 granularity="channel"), 3, 0.25,
                 marks=pytest.mark.slow),
]
IDS = ["resnet20", "resnet20-channel", "resnet20-normalized", "mobilenet_v1",
       "mobilenet_v2-channel", "resnet20-wide-unshared", "resnet18-channel", "mobilenet_v2",
       "resnet34", "resnet50-channel", "resnet56", "mobilenet_v2-wide-unshared-channel"]


@pytest.mark.parametrize("name, size, quant, channels, width", CASES, ids=IDS)
def test_integer_program_equals_the_simulation_in_every_tensor(name, size, quant, channels,
                                                               width):
    model, variables, program, x = make(name, size, quant, channels=channels, width=width)
    sim_fn = verification.simulation_fn(model)
    for backend in BACKENDS:
        report = verify(program, model, variables, x, backend=backend, sim_fn=sim_fn)
        # Logits (int32 / 2^fl) and every layer's input and output equal the simulation's.
        assert report.exact, (backend, report.tensors_differing, report.max_logit_diff)
        convs = sum(op["op"] in ("conv", "dense") for op in program.ops)
        assert report.tensors_compared >= 2 * convs
        # The static bounds hold for what was measured.
        bounds = {c["layer"]: c["accumulator_bound"] for c in program.checks()}
        assert report.observed_max.keys() == bounds.keys()
        assert all(report.observed_max[k] <= bounds[k] for k in bounds)
    # The numbers are not trivial: formats differ, shifts vary, accumulators are large.
    fls = {t["fraclen"][0] for t in program.tensors.values() if t["kind"] != "int32"}
    shifts = {v for op in program.ops if op["op"] == "requantize" for v in op["shift"]}
    assert len(fls) > 2 and len(shifts) > 2
    assert max(report.observed_max.values()) > 2 ** 12
    weight_fls = [v for op in program.ops if op["op"] in ("conv", "dense")
                  for v in op["weight_fraclen"]]
    if quant.wide_fraclen:  # the rule used fraclens past the word length, and stayed exact
        assert max(weight_fls) > fp.max_fraclen(signed=True)
    else:
        assert max(weight_fls) <= fp.max_fraclen(signed=True)
    if not quant.share_alpha:  # every stream reader has its own alpha
        alphas = [p for p in flax.traverse_util.flatten_dict(variables["params"]) if
                  p[-1] == "alpha"]
        assert len(alphas) > len([op for op in program.ops if op["op"] == "add"])


def _every_architecture():
    for name in models.MODEL_NAMES:
        size = 16 if name in ("resnet20", "resnet56") else 32
        width = 0.25 if name.startswith("mobilenet") else 1.0
        yield name, size, width


@pytest.mark.parametrize("name, size, width", [
    # The deeper ResNets reuse the blocks of ResNet-20, the MobileNets depthwise layers
    # that tests/test_new_model.py audits: they are audited in the slow suite.
    pytest.param(*a, marks=pytest.mark.slow) if a[0] != "resnet20" else a
    for a in _every_architecture()], ids=[a[0] for a in _every_architecture()])
def test_audit_finds_no_float_no_wide_multiply_no_division(name, size, width):
    quant = QuantConfig(granularity="channel" if name.endswith("0") else "layer")
    model = models.create(name, num_classes=10, quant=quant,
                          **({} if name.startswith("resnet") else {"width_multiplier": width}))
    x = jnp.zeros((1, size, size, 3), jnp.uint8)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(x)
    program = integer.export(variables, name, {"quant": quant, "width_multiplier": width},
                             image_shape=(size, size, 3))
    for backend in BACKENDS:
        jaxpr = executor.Executor(program, backend=backend).jaxpr(batch_size=2)
        assert audit.audit(jaxpr) == [], backend
        primitives = {e.primitive.name for e in jaxpr.jaxpr.eqns}
        assert primitives & {"conv_general_dilated", "ffi_call", "dot_general"}  # saw the convs


def test_audit_flags_floats_wide_multiplies_divisions_and_unknown_kernels():
    i32 = jnp.ones((4,), jnp.int32)
    i8 = jnp.ones((4, 4), jnp.int8)
    assert any("float" in p for p in audit.audit(jax.make_jaxpr(lambda x: x * 0.5)(i32)))
    assert any("wider than 8 bits" in p for p in audit.audit(jax.make_jaxpr(lambda x: x * x)(i32)))
    assert any("square" in p for p in audit.audit(jax.make_jaxpr(jnp.square)(i32)))
    assert any("division" in p for p in audit.audit(jax.make_jaxpr(lambda x: x // 3)(i32)))
    wide_dot = jax.make_jaxpr(lambda a: jnp.dot(a.astype(jnp.int32), a.astype(jnp.int32)))(i8)
    assert any("dot_general" in p for p in audit.audit(wide_dot))
    nested = jax.make_jaxpr(jax.jit(lambda x: jax.lax.cond(x[0] > 0, lambda y: y * y,
                                                           lambda y: y, x)))(i32)
    assert any("mul" in p for p in audit.audit(nested))
    unknown = jax.make_jaxpr(lambda x: jax.ffi.ffi_call(
        "some_kernel", jax.ShapeDtypeStruct((4,), jnp.int32))(x))(i32)
    assert any("unknown custom call" in p for p in audit.audit(unknown))
    fine = jax.make_jaxpr(lambda a: jax.lax.dot_general(
        a, a, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32) >> 3)(i8)
    assert audit.audit(fine) == []


def test_saturation_where_the_static_bound_allows_overflow():
    quant = QuantConfig()
    model, variables, _, x = make("resnet20", 16, quant, channels=1)
    params = flax.core.unfreeze(variables["params"])
    params["stem"]["bias"] = params["stem"]["bias"].at[0].set(3e5)  # a huge folded bias
    variables = {**variables, "params": params}
    program = integer.export(variables, "resnet20", {"quant": quant}, image_shape=x.shape[1:])
    assert "stem" in program.saturating_ops()
    stem = next(c for c in program.checks() if c["layer"] == "stem")
    assert not stem["int32_safe"] and stem["accumulator_bound"] > 2 ** 31
    for backend in BACKENDS:
        _, seen = executor.Executor(program, backend=backend).collect(x)
        op = next(o for o in program.ops if o.get("name") == "stem")
        w = program.arrays[op["weight"]].astype(np.int64)
        b = program.arrays[op["bias"]].astype(np.int64)
        xi = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
        exact = sum(xi[:, i:i + 16, j:j + 16, :] @ w[i, j] for i in range(3) for j in range(3)) + b
        np.testing.assert_array_equal(np.asarray(seen["stem"]),
                                      np.clip(exact, -2 ** 31, 2 ** 31 - 1))


@pytest.mark.parametrize("signed", [False, True])
def test_requantize_with_mixed_shifts_matches_exact_rounding(signed):
    rng = np.random.default_rng(0)
    acc = rng.integers(-2 ** 31, 2 ** 31, (64, 6), dtype=np.int64).astype(np.int32)
    acc[:32] = rng.integers(-3000, 3000, (32, 6))
    acc[32:36] = [[4, 1, -1, 256, 2 ** 30, 1], [12, 0, 0, -256, -2 ** 31, 0],
                  [-12, 3, 2, 768, 2 ** 31 - 1, -1], [20, -3, -2, 1280, -1, 2]]
    shift = np.array([3, 0, -2, 9, 31, -7], np.int32)
    lo, hi = (-127, 127) if signed else (0, 255)
    # float64 holds acc * 2^-shift exactly; np.round rounds half to even.
    ref = np.clip(np.round(acc.astype(np.float64) * np.exp2(-shift.astype(np.float64))), lo, hi)
    for code in ("s8",) if signed else ("u8", "s8"):
        got = np.asarray(arithmetic.requantize(jnp.asarray(acc), shift, signed, code), np.int64)
        np.testing.assert_array_equal(got + (128 if code == "s8" and not signed else 0), ref)


def test_vnni_kernel_builds_on_cpus_that_have_the_instructions():
    if not machine.x86_features(["avx512_vnni"]):
        pytest.skip("this CPU has no AVX-512 VNNI: the executor uses XLA's convolutions")
    if jax.default_backend() != "cpu":
        pytest.skip("JAX computes on an accelerator here")
    ok, why = vnni.available()
    assert ok, why
    assert executor.default_backend() == ("onednn" if onednn.available()[0] else "vnni")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 9, 11, 5), dtype=np.uint8)   # odd sizes, 5 channels
    w = rng.integers(-127, 128, (3, 3, 5, 40), dtype=np.int8)  # 40 outputs: padded to 48
    b = rng.integers(-1000, 1000, (40,), dtype=np.int32)
    packed, cp, cop = vnni.pack_weight(w)
    xp = jnp.pad(jnp.asarray(x), ((0, 0), (1, 1), (1, 1), (0, cp - 5)))
    y = vnni.conv(xp, jnp.asarray(packed), jnp.asarray(np.pad(b, (0, cop - 40))),
                  kernel_size=3, strides=2, out_channels=40)
    xi = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(xi[:, i:i + 9:2, j:j + 11:2, :] @ w[i, j].astype(np.int64)
              for i in range(3) for j in range(3)) + b
    np.testing.assert_array_equal(np.asarray(y), ref)


def _reference_conv(x, w, strides, padding, groups):
    """Exact int64 convolution (NHWC, HWIO) by numpy."""
    n, h, wd, c = x.shape
    k, _, cg, o = w.shape
    xi = np.pad(x.astype(np.int64), ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
    oh, ow = (h + 2 * padding - k) // strides + 1, (wd + 2 * padding - k) // strides + 1
    out = np.zeros((n, oh, ow, o), np.int64)
    og = o // groups
    for g in range(groups):
        xs = xi[..., g * cg:(g + 1) * cg]
        for i in range(k):
            for j in range(k):
                patch = xs[:, i:i + (oh - 1) * strides + 1:strides,
                           j:j + (ow - 1) * strides + 1:strides, :]
                out[..., g * og:(g + 1) * og] += patch @ w[i, j, :, g * og:(g + 1) * og].astype(
                    np.int64)
    return out


# (batch, size, in channels, out channels, kernel, stride, padding, groups): a plain 3x3,
# a strided one with odd sizes, a 1x1 projection, a depthwise one, a 7x7 stem on 3 channels
# and one whose sums pass 2^24 (where a float32 step would round).
ONEDNN_CONVS = [(2, 9, 64, 64, 3, 1, 1, 1), (3, 13, 24, 40, 3, 2, 1, 1),
                (2, 8, 32, 48, 1, 2, 0, 1), (2, 9, 96, 96, 3, 1, 1, 96),
                (2, 12, 3, 16, 7, 2, 3, 1), (1, 5, 600, 32, 3, 1, 0, 1)]


@pytest.mark.parametrize("case", ONEDNN_CONVS, ids=lambda c: "x".join(map(str, c)))
def test_onednn_int8_conv_is_the_exact_integer_sum(case):
    ok, why = onednn.available()
    if not ok:
        pytest.skip(f"oneDNN int8 kernels unavailable: {why}")
    n, size, c, o, k, s, p, g = case
    rng = np.random.default_rng(sum(case))
    x = rng.integers(0, 256, (n, size, size, c), dtype=np.uint8)
    w = rng.integers(-127, 128, (k, k, c // g, o), dtype=np.int8)
    if c >= 600:  # every sum above 2^24 and odd: 255 * (127 * fan-in - 1)
        x[:], w[:] = 255, 127
        w[0, 0, 0, :] = 126
    geometry = onednn.layer("conv", batch=n, height=size, width=size, in_channels=c,
                            out_channels=o, kernel_size=k, strides=s, padding=p, groups=g,
                            signed=False)
    impl, exact, layout = onednn.choice(geometry)
    assert exact and ("vnni" in impl or "amx" in impl), impl
    packed = jnp.asarray(onednn.pack_weight(w, geometry))
    fn = jax.jit(lambda x, w: onednn.conv(x, w, kernel_size=k, strides=s, padding=p,
                                          groups=g, out_channels=o, layout=layout))
    ref = _reference_conv(x, w, s, p, g)
    if c >= 600:
        assert ref.min() > 2 ** 24 and np.all(ref % 2 == 1)
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(x), packed)), ref)
    jaxpr = jax.make_jaxpr(fn)(jnp.asarray(x), packed)
    assert audit.audit(jaxpr) == []


def test_onednn_int8_dense_is_exact_and_packed_weights_must_match_the_layer():
    ok, why = onednn.available()
    if not ok:
        pytest.skip(f"oneDNN int8 kernels unavailable: {why}")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 1200), dtype=np.uint8)
    w = rng.integers(-127, 128, (1200, 100), dtype=np.int8)
    x[0], w[:, 0] = 255, 127  # one sum of 255 * 127 * 1200 > 2^24
    geometry = onednn.layer("dense", batch=5, in_channels=1200, out_channels=100, signed=False)
    _, _, layout = onednn.choice(geometry)
    packed = onednn.pack_weight(w, geometry)
    y = onednn.dense(jnp.asarray(x), jnp.asarray(packed), out_channels=100, layout=layout)
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64))
    with pytest.raises(Exception, match="packed weights do not match"):
        jax.block_until_ready(onednn.dense(jnp.asarray(x[:, :600]), jnp.asarray(packed),
                                           out_channels=100, layout=layout))
    with pytest.raises(Exception, match="packed weights do not match"):  # another layout
        jax.block_until_ready(onednn.dense(jnp.asarray(x), jnp.asarray(packed),
                                           out_channels=100, layout=layout + 1))


def test_saturating_add_clips_instead_of_wrapping():
    rng = np.random.default_rng(0)
    a = rng.integers(-2 ** 31, 2 ** 31, 4096, dtype=np.int64)
    b = rng.integers(-2 ** 31, 2 ** 31, 4096, dtype=np.int64)
    a[:4], b[:4] = [2 ** 31 - 1, -2 ** 31, 5, -7], [1, -1, -5, 7]
    got = np.asarray(arithmetic.saturating_add(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)))
    np.testing.assert_array_equal(got, np.clip(a + b, -2 ** 31, 2 ** 31 - 1))


def test_save_and_load_round_trip_and_bad_files(tmp_path):
    model, variables, program, x = make("resnet20", 16, QuantConfig(), channels=1)
    json_path, npz_path = integer.save(program, str(tmp_path / "prog"))
    assert json_path.endswith("prog.json") and npz_path.endswith("prog.npz")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    loaded = integer.load(str(tmp_path / "prog.npz"))
    assert loaded.ops == program.ops and loaded.tensors == program.tensors
    assert all(np.array_equal(loaded.arrays[k], v) for k, v in program.arrays.items())
    np.testing.assert_array_equal(integer.Executor(loaded)(x), integer.Executor(program)(x))
    header = json.load(open(json_path))
    assert header["version"] == integer.VERSION and "pickle" not in open(json_path).read()
    with np.load(npz_path, allow_pickle=False) as npz:
        assert {npz[k].dtype for k in npz.files} <= {np.dtype(np.int8), np.dtype(np.int32)}

    def rewrite(**changes):
        bad = dict(header, **changes)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))  # refers to prog.npz beside it
        return str(path)

    with pytest.raises(ValueError, match=f"version 99.*reads version {integer.VERSION}"):
        integer.load(rewrite(version=99))
    with pytest.raises(ValueError, match="not an f8net_jax integer program"):
        integer.load(rewrite(format="something"))
    (tmp_path / "corrupt.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.json.*corrupt JSON"):
        integer.load(str(tmp_path / "corrupt.json"))
    with pytest.raises(ValueError, match="checksum"):
        integer.load(rewrite(arrays_sha256="0" * 64))
    ops = [dict(op) for op in header["ops"]]
    ops[3]["op"] = "fft"
    with pytest.raises(ValueError, match="bad.json: op 3 has unknown type 'fft'"):
        integer.load(rewrite(ops=ops))
    with pytest.raises(FileNotFoundError, match="no integer program"):
        integer.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="'arrays_file' must name a file beside it"):
        integer.load(rewrite(arrays_file="../prog.npz"))
    # A program that does not validate is not written at all.
    broken = program_lib.IntegerProgram(**{**program.__dict__, "output": "nowhere"})
    with pytest.raises(ValueError, match="output 'nowhere'"):
        integer.save(broken, str(tmp_path / "broken"))
    assert not any(f.startswith("broken") or f.startswith(".tmp") for f in os.listdir(tmp_path))


def test_executor_rejects_images_of_the_wrong_shape_or_dtype():
    _, _, program, x = make("resnet20", 16, QuantConfig(), channels=1)
    run = integer.Executor(program)
    with pytest.raises(ValueError, match=r"shape \(batch, 16, 16, 1\).*\(3, 16, 16, 3\)"):
        run(np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 pixels, got dtype float32"):
        run(x.astype(np.float32))
    with pytest.raises(ValueError, match="backend must be one of"):
        integer.Executor(program, backend="tpu")
    with pytest.raises(ValueError, match="serialize with 'im2col'"):
        integer.serialize(program, 2, backend="vnni")


def test_export_rejects_float_models_and_foreign_variables():
    float_quant = QuantConfig(mode="float")
    model = models.create("resnet20", num_classes=10, quant=float_quant)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1), jnp.uint8))
    with pytest.raises(ValueError, match="quant.mode is 'float'"):
        integer.export(variables, "resnet20", {"quant": float_quant}, image_shape=(16, 16, 1))
    _, fixed, _, _ = make("resnet20", 16, QuantConfig(), channels=1)
    with pytest.raises(ValueError, match="not those of a resnet18"):
        integer.export(fixed, "resnet18", {"quant": QuantConfig()}, image_shape=(32, 32, 1))
    with pytest.raises(ValueError, match="multiples of 4"):
        integer.export(fixed, "resnet20", {"quant": QuantConfig()}, image_shape=(18, 18, 1))


class Activated(nn.Module):
    """A stem and the classifier, the stem's activation looked up by name."""

    quant: QuantConfig
    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        activations = {"relu": relu, "relu6": functools.partial(relu, limit=6.0)}
        x = prepare_image(x, total_stride=1, model="Activated")
        stem = QuantConvBN(x.shape[-1], 8, 3, self.quant, input_kind="image", name="stem")
        classifier = QuantDense(8, 10, self.quant, name="classifier")
        alphas, scales = scale_plan([stem, classifier])
        x = stem(x, alpha=alphas[0], out_scale=scales[1], train=train)
        x, factor = global_average_pool(activations[self.activation](x), self.quant)
        return classifier(x, alpha=alphas[1], input_factor=factor, train=train)


def _activated():
    model = Activated(QuantConfig())
    return model, model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.uint8))


@pytest.mark.parametrize("activation, error, match", [
    ("gelu", KeyError, "gelu"),  # no such activation in the model's table
    ("relu6", TypeError, "unexpected keyword argument 'limit'"),  # relu takes no limit
])
def test_errors_of_the_models_own_code_keep_their_type_and_traceback(activation, error,
                                                                      match):
    model, variables = _activated()
    integer.export(variables, model, image_shape=(8, 8, 1))  # the model itself exports
    with pytest.raises(error, match=match) as caught:
        integer.export(variables, model.clone(activation=activation), image_shape=(8, 8, 1))
    assert any(entry.name == "__call__" and str(entry.path) == __file__ for entry in
               caught.traceback), "the traceback reaches the model's __call__"


def _edit(variables, collection, path, value):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[collection]))
    if value is None:
        del flat[path]
    else:
        flat[path] = value
    return {**variables, collection: flax.traverse_util.unflatten_dict(flat)}


@pytest.mark.parametrize("collection, path, value, match", [
    ("params", ("stem", "kernel"), np.zeros((3, 3, 1, 4), np.float32),
     r"params/stem/kernel has shape \(3, 3, 1, 4\), the model's has \(3, 3, 1, 8\)"),
    ("quant_stats", ("classifier", "input", "fraclen"), np.zeros(8, np.float32),
     r"quant_stats/classifier/input/fraclen has shape \(8,\), the model's has \(\)"),
    ("batch_stats", ("stem", "mean"), None, "batch_stats/stem/mean is missing"),
    ("params", ("head", "kernel"), np.zeros((8, 10), np.float32),
     "params/head/kernel is not one of the model's variables"),
])
def test_variables_that_are_not_the_models_are_named(collection, path, value, match):
    model, variables = _activated()
    with pytest.raises(ValueError, match="the variables are not those of a Activated "
                                         rf"\({match}\)"):
        integer.export(_edit(variables, collection, path, value), model,
                       image_shape=(8, 8, 1))


def test_jax_export_serializes_the_executor_for_a_fixed_batch():
    _, _, program, x = make("resnet20", 16, QuantConfig(granularity="channel"), channels=1)
    data = integer.serialize(program, batch_size=3)
    restored = integer.deserialize(data)
    np.testing.assert_array_equal(restored.call(x), integer.Executor(program)(x))
    assert "f8net_conv" not in restored.mlir_module()  # portable: no custom kernels
    assert set(restored.platforms) == {"cpu", "cuda"}


# --------------------------------------------------------------------------------------
# The commands, on a trained smoke run.


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.xdist_group("smoke_workdir")
def test_export_and_verify_commands_on_a_trained_run(smoke_workdir, tmp_path):
    out = str(tmp_path / "exported" / "smoke")
    result = _run("f8net_jax.integer.export_program", f"--workdir={smoke_workdir}", f"--output={out}",
                  "--jax_export_batch=4")
    assert result.returncode == 0, result.stderr
    assert "0 ops rely on saturation" in result.stdout
    for suffix in (".json", ".npz", ".jaxexport"):
        assert os.path.exists(out + suffix)
    assert not [f for f in os.listdir(os.path.dirname(out)) if "partial" in f or ".tmp" in f]
    exported = integer.deserialize(open(out + ".jaxexport", "rb").read())
    images = np.zeros((4,) + tuple(integer.load(out).image_shape), np.uint8)
    np.testing.assert_array_equal(exported.call(images), integer.Executor(integer.load(out))(images))
    result = _run("f8net_jax.integer.verify_program", f"--workdir={smoke_workdir}", "--num_images=40",
                  f"--program={out}")
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"integer vs simulation: agreement 100\.00% top-1 over 40 images, "
                         r"max \|logit diff\| 0 \(int32 units\), integer top-1 (\d+\.\d\d)%", last)
    assert match, last
    assert "audit: the executor's jaxpr has no float value" in result.stdout
    assert re.search(r"intermediates: (\d+)/\1 tensor comparisons exact", result.stdout)


@pytest.mark.xdist_group("smoke_workdir")
def test_commands_fail_cleanly_on_bad_workdirs(smoke_workdir, tmp_path):
    float_dir = str(tmp_path / "float")
    shutil.copytree(smoke_workdir, float_dir)
    config = json.load(open(os.path.join(float_dir, "config.json")))
    config["quant"]["mode"] = "float"
    json.dump(config, open(os.path.join(float_dir, "config.json"), "w"))
    out = str(tmp_path / "out")
    for args, message in [
        (("f8net_jax.integer.verify_program", f"--workdir={float_dir}"), "float-mode"),
        (("f8net_jax.integer.export_program", f"--workdir={float_dir}", f"--output={out}"), "float-mode"),
        (("f8net_jax.integer.verify_program", f"--workdir={tmp_path / 'none'}"), "no config.json"),
        (("f8net_jax.integer.verify_program", f"--workdir={smoke_workdir}", "--num_images=-1"),
         "--num_images must be >= 0"),
    ]:
        result = _run(*args)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not os.path.exists(out + ".json") and not os.path.exists(out + ".npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(smoke_workdir, "config.json"), empty)
    result = _run("f8net_jax.integer.export_program", f"--workdir={empty}", f"--output={out}")
    assert result.returncode != 0 and "no checkpoint" in result.stderr
    assert not os.path.exists(out + ".json") and not os.path.exists(out + ".npz")


@pytest.mark.xdist_group("smoke_workdir")
def test_export_into_a_folder_writes_the_model_name_inside(smoke_workdir, tmp_path):
    folder = tmp_path / "programs"
    result = _run("f8net_jax.integer.export_program", f"--workdir={smoke_workdir}",
                  f"--output={folder}{os.sep}")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(folder)) == ["resnet20.json", "resnet20.npz"]


def test_edited_program_graphs_are_refused(tmp_path):
    model, variables, program, x = make("resnet20", 16, QuantConfig(), channels=1)
    json_path, _ = integer.save(program, str(tmp_path / "prog"))
    header = json.load(open(json_path))

    def load_edited(edit):
        bad = json.loads(json.dumps(header))
        edit(bad)
        (tmp_path / "prog.json").write_text(json.dumps(bad))
        return lambda: integer.load(str(tmp_path / "prog"))

    def extra_relu(h):  # a ReLU on the logits, the output moved to it
        h["ops"].append({"op": "relu", "in": [h["output"]], "out": "logits/relu"})
        h["tensors"]["logits/relu"] = dict(h["tensors"][h["output"]])
        h["output"] = "logits/relu"

    def inner_output(h):
        h["output"] = h["ops"][-3]["out"]

    def more_classes(h):
        h["num_classes"] = 12

    def other_shift(h):  # not what the fraclens give
        op = next(op for op in h["ops"] if op["op"] == "requantize")
        op["shift"] = [s + 1 for s in op["shift"]]

    def saturating(h):  # well-formed, but not what was exported
        op = next(op for op in h["ops"] if op["op"] == "conv")
        op["saturate"] = not op["saturate"]

    for edit, match in ((extra_relu, "must be the logits"), (inner_output, "must be the logits"),
                        (more_classes, "have 10 channels but num_classes is 12"),
                        (other_shift, r"op \d+ \(requantize .*\): 'shift' is .* does not follow"),
                        (saturating, "does not match its checksum")):
        with pytest.raises(ValueError, match=match):
            load_edited(edit)()


def test_every_backend_runs_every_op_kind_and_commands_do_not_shadow_the_library():
    import importlib

    for name, backend in executor.EXECUTOR_BACKENDS.items():
        assert backend.name == name and set(backend.table()) == set(program_lib.OPS)
    importlib.import_module("f8net_jax.integer.export_program")
    importlib.import_module("f8net_jax.integer.verify_program")
    assert callable(integer.export) and callable(integer.load)
