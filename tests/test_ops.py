"""The models' convolutions, matmuls and pools (f8net_jax.ops): the compute policy is exact,
the oneDNN backend computes what XLA computes, the hand-written gradients are autodiff's."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from f8net_jax import fixed_point as fp
from f8net_jax import layers, models, ops, streams, train_onednn
from f8net_jax.layers import QuantConfig
from f8net_jax.steps import cross_entropy

ONEDNN, WHY = train_onednn.status()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN not available: {WHY}")
XLA = ops.ComputePolicy(backend="xla", exact_dtype="float32")
XLA_BF16 = ops.ComputePolicy(backend="xla", exact_dtype="bfloat16")
ONEDNN_F32 = ops.ComputePolicy(backend="onednn")

# (model, image size, channels, extra create kwargs): every architecture at a small size.
MODELS = [("resnet18", 32, 3, {}), ("resnet50", 32, 3, {}), ("resnet20", 16, 1, {}),
          ("mobilenet_v1", 32, 3, {"width_multiplier": 0.25}),
          ("mobilenet_v2", 32, 3, {"width_multiplier": 0.25})]


def conv_shapes(name, size, channels, kwargs):
    """Every (x shape, kernel shape, stride, padding, groups) of a model's eval pass."""
    model = models.create(name, num_classes=10, quant=QuantConfig(conv_backend="xla"), **kwargs)
    x = jnp.zeros((2, size, size, channels), jnp.uint8)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                found.add((lhs, rhs, eqn.params["window_strides"][0],
                           eqn.params["padding"][0][0], eqn.params["feature_group_count"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return sorted(found)


def grid_operands(rng, x_shape, w_shape):
    """Random 8-bit fixed-point operands: unsigned activations, signed weights."""
    x = rng.integers(0, 256, x_shape) * 2.0 ** -rng.integers(0, 9)
    w = rng.integers(-127, 128, w_shape) * 2.0 ** -rng.integers(0, 8)
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("name, size, channels, kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_bfloat16_exact_pass_equals_float32_highest_on_every_model_conv(name, size, channels,
                                                                         kwargs):
    rng = np.random.default_rng(0)
    shapes = conv_shapes(name, size, channels, kwargs)
    assert len(shapes) >= 3
    for x_shape, w_shape, stride, pad, groups in shapes:
        x, w = grid_operands(rng, x_shape, w_shape)
        reference = jax.lax.conv_general_dilated(
            x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)
        got = ops.conv2d(x, w, strides=stride, padding=pad, groups=groups, exact=True,
                         compute=XLA_BF16)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(reference),
                                      err_msg=f"{name} conv {x_shape} * {w_shape}")


def test_bfloat16_exact_matmul_equals_float32():
    rng = np.random.default_rng(1)
    x, w = grid_operands(rng, (8, 1280), (1280, 1000))
    got = ops.matmul(x, w, exact=True, compute=XLA_BF16)
    want = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class SmallNet(nn.Module):
    """Stem conv, max pool, a strided conv, a depthwise conv, average pool, classifier: every
    op of the models, small enough to compile in seconds."""

    quant: QuantConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        q = self.quant
        stem = layers.QuantConvBN(1, 8, 3, q, input_kind="image")
        readers = [layers.QuantConvBN(8, 16, 3, q, strides=2),
                   layers.QuantConvBN(16, 16, 3, q, depthwise=True),
                   layers.QuantDense(16, 10, q)]
        alphas, scales = streams.scale_plan([stem] + readers)
        x = stem(x.astype(jnp.float32) / 256.0, alpha=alphas[0], out_scale=scales[1],
                 train=train)
        x = streams.max_pool(nn.relu(x), 3, 2, 1, compute=q.compute)
        for i, reader in enumerate(readers[:2]):
            x = reader(x, alpha=alphas[i + 1], out_scale=scales[i + 2], train=train)
        x, factor = streams.global_average_pool(x, q)
        return readers[2](x, alpha=alphas[3], input_factor=factor, train=train)


def _train_steps(quant_kwargs, mode="fixed", steps=2):
    """(variables, losses) after ``steps`` SGD steps of SmallNet on one batch."""
    model = SmallNet(QuantConfig(mode=mode, rescale_classifier=False, **quant_kwargs))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (4, 16, 16, 1)), jnp.uint8)
    labels = jnp.asarray(rng.integers(0, 10, 4))
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, train=False))()

    @jax.jit
    def step(variables):
        def loss_fn(params):
            logits, state = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats", "quant_stats"])
            return cross_entropy(logits, labels, jnp.ones(4)), state
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {**variables, **state, "params": params}, loss

    losses = []
    for _ in range(steps):
        variables, loss = step(variables)
        losses.append(loss)
    return jax.device_get(variables), np.asarray(losses)


def test_bfloat16_exact_pass_leaves_cpu_training_bit_identical():
    """Two fixed-point train steps with bfloat16 operands in every exact pass equal the
    float32 ones in every parameter and in the loss."""
    f32 = _train_steps({"conv_backend": "xla", "exact_dtype": "float32"})
    bf16 = _train_steps({"conv_backend": "xla", "exact_dtype": "bfloat16"})
    for a, b in zip(jax.tree_util.tree_leaves(f32), jax.tree_util.tree_leaves(bf16)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_precision_fields_are_checked_by_name():
    with pytest.raises(ValueError, match="precision"):
        QuantConfig(precision="float16")
    with pytest.raises(ValueError, match="conv_backend"):
        QuantConfig(conv_backend="mkl")
    with pytest.raises(ValueError, match="exact_dtype"):
        QuantConfig(exact_dtype="int8")
    with pytest.raises(ValueError, match="conv_backend 'onednn' computes in float32"):
        ops.ComputePolicy("bfloat16", "onednn").resolve()


def test_bfloat16_precision_casts_float_products_and_backward():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    low = ops.ComputePolicy("bfloat16", "xla")
    f = lambda a, b: jnp.sum(ops.conv2d(a, b, padding=1, compute=low) ** 2)
    g = lambda a, b: jnp.sum(ops.conv2d(a, b, padding=1, compute=XLA) ** 2)
    (va, ga), (vb, gb) = jax.value_and_grad(f, (0, 1))(x, w), jax.value_and_grad(g, (0, 1))(x, w)
    # bfloat16 operands: close to float32, not equal (8 bits of mantissa).
    np.testing.assert_allclose(va, vb, rtol=3e-2)
    assert float(va) != float(vb)
    for a, b in zip(ga, gb):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=6e-2, atol=6e-2 * float(jnp.max(jnp.abs(b))))


# --------------------------------------------------------------------------------------
# oneDNN against XLA.

CONV_CASES = [  # (x shape, kernel shape, stride, padding, groups)
    ((2, 9, 9, 3), (7, 7, 3, 8), 2, 3, 1),      # stem
    ((2, 8, 8, 16), (3, 3, 16, 16), 1, 1, 1),
    ((2, 8, 8, 16), (3, 3, 16, 32), 2, 1, 1),
    ((2, 8, 8, 16), (1, 1, 16, 32), 2, 0, 1),   # projection shortcut
    ((2, 7, 7, 12), (3, 3, 1, 12), 2, 1, 12),   # depthwise, odd size
    ((3, 1, 1, 32), (3, 3, 32, 32), 1, 1, 1),   # 1x1 spatial (ResNet-18 at 32x32)
]


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, stride, pad, groups", CONV_CASES)
def test_onednn_conv_and_gradients_match_xla(x_shape, w_shape, stride, pad, groups):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)

    def run(compute):
        f = functools.partial(ops.conv2d, strides=stride, padding=pad, groups=groups,
                              compute=compute)
        y, vjp = jax.vjp(f, x, w)
        return (y,) + vjp(jnp.asarray(rng.standard_normal(y.shape), jnp.float32))

    rng_state = rng.bit_generator.state
    want = jax.jit(lambda: run(XLA))()
    rng.bit_generator.state = rng_state
    got = jax.jit(lambda: run(ONEDNN_F32))()
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert a.shape == b.shape, name
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, atol=2e-6 * scale, rtol=0, err_msg=name)


EVAL_MODELS = [pytest.param(*m, marks=() if m[0] == "resnet20"
                            else pytest.mark.slow, id=m[0]) for m in MODELS]


@needs_onednn
@pytest.mark.parametrize("name, size, channels, kwargs", EVAL_MODELS)
def test_onednn_fixed_point_eval_logits_equal_xla_bit_for_bit(name, size, channels, kwargs):
    """Eval of a fixed-point model is all exact passes: both backends give the same bits."""
    x = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, size, size, channels)),
                    jnp.uint8)
    make = lambda backend: models.create(name, num_classes=10,
                                         quant=QuantConfig(conv_backend=backend), **kwargs)
    reference = make("xla")
    variables = jax.jit(lambda: reference.init(jax.random.PRNGKey(0), x, train=False))()
    # One training-mode pass gives BN statistics and formats that are not the defaults.
    _, state = jax.jit(lambda v: reference.apply(
        v, x, train=True, mutable=["batch_stats", "quant_stats"]))(variables)
    variables = {**variables, **state}
    logits = {b: np.asarray(jax.jit(lambda v: make(b).apply(v, x, train=False))(variables))
              for b in ("xla", "onednn")}
    np.testing.assert_array_equal(logits["onednn"], logits["xla"])


@needs_onednn
def test_onednn_training_matches_xla_to_float_rounding():
    """Float mode: parameters after two steps agree to float32 rounding. Fixed point: the
    first loss agrees; afterwards rounding onto the grid amplifies ulp differences of the
    float passes (a weight on a rounding tie), so only the first step is compared."""
    (pa, la), (pb, lb) = (_train_steps({"conv_backend": b}, "float") for b in ("xla", "onednn"))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for u, v in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    (_, la), (_, lb) = (_train_steps({"conv_backend": b}, "fixed", steps=1)
                        for b in ("xla", "onednn"))
    np.testing.assert_allclose(la, lb, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Max pooling and PACT's clip: hand-written gradients equal autodiff's.

POOLS = [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0), (5, 2, 2)]
POLICIES = [XLA] + ([ONEDNN_F32] if ONEDNN else [])


@pytest.mark.parametrize("compute", POLICIES, ids=lambda p: p.backend)
@pytest.mark.parametrize("window, stride, pad", POOLS)
@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 10, 12, 4)])
def test_max_pool_gradient_goes_to_the_first_maximum(compute, window, stride, pad, shape):
    rng = np.random.default_rng(5)
    # Small integers: many ties inside a window; integer gradients: sums are exact.
    x = jnp.asarray(rng.integers(0, 4, shape), jnp.float32)
    reference = lambda v: nn.max_pool(v, (window, window), (stride, stride),
                                      padding=[(pad, pad)] * 2)
    ours = lambda v: ops.max_pool(v, window=window, strides=stride, padding=pad,
                                  compute=compute)
    y, vjp_ref = jax.vjp(reference, x)
    g = jnp.asarray(rng.integers(-3, 4, y.shape), jnp.float32)
    got, vjp = jax.vjp(ours, x)
    np.testing.assert_array_equal(got, y)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


def test_max_pool_rejects_padding_as_wide_as_the_window():
    with pytest.raises(ValueError, match="padding"):
        ops.max_pool(jnp.zeros((1, 4, 4, 1)), window=2, strides=2, padding=2)


@pytest.mark.parametrize("signed", [False, True])
def test_pact_clip_matches_autodiff_of_clip(signed):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((4, 5, 6, 7)) * 3, jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    alpha = jnp.float32(1.7)
    reference = lambda v, a: jnp.clip(v, -a if signed else 0.0, a)
    ours = lambda v, a: fp.pact_clip(v, a, signed=signed)
    np.testing.assert_array_equal(ours(x, alpha), reference(x, alpha))
    (dx_r, da_r), (dx, da) = jax.vjp(reference, x, alpha)[1](g), jax.vjp(ours, x, alpha)[1](g)
    np.testing.assert_array_equal(dx, dx_r)
    np.testing.assert_allclose(da, da_r, rtol=1e-6)
    with pytest.raises(ValueError, match="alpha must be a scalar"):
        fp.pact_clip(x, jnp.ones(3))
