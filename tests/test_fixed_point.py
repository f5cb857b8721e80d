"""Invariants of the fixed-point functions (property tests) and their bad-input errors."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from f8net_jax import fixed_point as fp
from f8net_jax import format_rules as rules

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@st.composite
def tensor_and_format(draw, max_side=6):
    signed = draw(st.booleans())
    bits = draw(st.sampled_from([2, 4, 8, 12, 16]))
    fl = draw(st.integers(0, fp.max_fraclen(signed=signed, bits=bits)))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=max_side))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    return x, fl, signed, bits


def numpy_quantize(x, fl, signed, bits):
    lo, hi = fp.integer_range(signed=signed, bits=bits)
    r = np.round(x.astype(np.float64) * 2.0**fl)
    return (np.clip(r, lo, hi) / 2.0**fl).astype(np.float32), r


@given(tensor_and_format())
def test_quantize_output_is_on_the_grid_and_in_range(case):
    x, fl, signed, bits = case
    out = np.asarray(fp.quantize(x, fl, signed=signed, bits=bits))
    q = out.astype(np.float64) * 2.0**fl
    lo, hi = fp.integer_range(signed=signed, bits=bits)
    np.testing.assert_array_equal(q, np.round(q))
    assert q.min() >= lo and q.max() <= hi
    np.testing.assert_array_equal(out, numpy_quantize(x, fl, signed, bits)[0])


@given(tensor_and_format())
def test_quantize_is_idempotent(case):
    x, fl, signed, bits = case
    once = fp.quantize(x, fl, signed=signed, bits=bits)
    np.testing.assert_array_equal(fp.quantize(once, fl, signed=signed, bits=bits), once)


@given(tensor_and_format())
def test_quantize_gradient_is_the_straight_through_mask(case):
    x, fl, signed, bits = case
    upstream = np.random.default_rng(0).uniform(0.5, 2.0, x.shape).astype(np.float32)
    _, vjp = jax.vjp(lambda v: fp.quantize(v, fl, signed=signed, bits=bits), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(upstream))
    _, r = numpy_quantize(x, fl, signed, bits)
    hi = fp.integer_range(signed=signed, bits=bits)[1]
    mask = (np.abs(r) < hi) if signed else ((r > 0) & (r < hi))
    np.testing.assert_array_equal(np.asarray(grad), np.where(mask, upstream, 0.0))


def test_quantize_rounds_ties_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.25, 0.75], np.float32)
    np.testing.assert_array_equal(
        fp.quantize(x, 0, signed=True), [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0, 1.0])
    np.testing.assert_array_equal(fp.quantize(x / 4, 2, signed=True), fp.quantize(x, 0, signed=True) / 4)


def test_quantize_signed_range_is_symmetric_and_unsigned_clips_negatives():
    x = np.array([-1000.0, -1.0, 0.3, 1000.0], np.float32)
    np.testing.assert_array_equal(fp.quantize(x, 0, signed=True), [-127, -1, 0, 127])
    np.testing.assert_array_equal(fp.quantize(x, 0, signed=False), [0, 0, 0, 255])
    np.testing.assert_array_equal(fp.quantize(x, 8, signed=False), [0, 0, 77 / 256, 255 / 256])


@given(tensor_and_format())
def test_per_channel_quantize_equals_per_slice_quantize(case):
    x, _, signed, bits = case
    axis = x.ndim - 1
    fls = np.arange(x.shape[axis]) % (fp.max_fraclen(signed=signed, bits=bits) + 1)
    out = np.asarray(fp.quantize(x, fls, signed=signed, bits=bits, axis=axis))
    for c, fl in enumerate(fls):
        np.testing.assert_array_equal(
            out[..., c], fp.quantize(x[..., c], int(fl), signed=signed, bits=bits))


def test_jit_vmap_and_grad_through_quantize_with_a_traced_fraclen():
    x = jnp.linspace(-3.0, 3.0, 41)

    @jax.jit
    def loss(x, fl):
        return jnp.sum(fp.quantize(x, fl, signed=True) ** 2)

    for fl in range(8):
        eager = jnp.sum(fp.quantize(x, fl, signed=True) ** 2)
        assert float(loss(x, jnp.float32(fl))) == float(eager)
    gx, gfl = jax.grad(loss, argnums=(0, 1))(x, jnp.float32(5.0))
    q = fp.quantize(x, 5, signed=True)
    np.testing.assert_array_equal(gx, jnp.where(jnp.abs(jnp.round(x * 32)) < 127, 2 * q, 0.0))
    assert float(gfl) == 0.0
    # vmap over a batch of formats, and over a batch of inputs with per-sample formats.
    fls = jnp.arange(8, dtype=jnp.float32)
    batched = jax.vmap(lambda fl: fp.quantize(x, fl, signed=True))(fls)
    for fl in range(8):
        np.testing.assert_array_equal(batched[fl], fp.quantize(x, fl, signed=True))
    xs = jnp.stack([x, 2 * x])
    per_sample = jax.jit(jax.vmap(lambda v, fl: fp.quantize(v, fl, signed=False)))(xs, fls[:2] + 3)
    np.testing.assert_array_equal(per_sample[1], fp.quantize(2 * x, 4, signed=False))
    # A traced per-channel fraclen, with grad.
    w = jnp.ones((3, 4)) * 0.3
    g = jax.jit(jax.grad(lambda w, fl: jnp.sum(fp.quantize(w, fl, signed=True, axis=1))))(
        w, jnp.array([0.0, 1.0, 2.0, 7.0]))
    np.testing.assert_array_equal(g, jnp.ones((3, 4)))


# ----------------------------------------------------------------- format rules


@given(st.floats(1e-30, 1e30, allow_nan=False), st.sampled_from(rules.METRICS), st.booleans())
def test_fraclen_from_metric_follows_the_rule(m, metric, signed):
    m = np.float32(m)
    c = rules.METRIC_CONSTANTS[metric][0 if signed else 1]
    ratio = np.float32(c) * (np.float32(1.0) / m)
    expected = np.clip(np.floor(np.log2(np.float64(ratio))), 0, 8 - int(signed))
    assert float(rules.fraclen_from_metric(m, metric=metric, signed=signed)) == expected


def test_fraclen_from_metric_handles_zero_and_infinity():
    out = rules.fraclen_from_metric(np.array([0.0, np.inf], np.float32), signed=True)
    np.testing.assert_array_equal(out, [7.0, 0.0])
    out = rules.fraclen_from_metric(np.array([0.0, np.inf], np.float32), metric="rms", signed=False)
    np.testing.assert_array_equal(out, [8.0, 0.0])


def test_fraclen_from_metric_std_matches_hand_computed_formats():
    # c = 40 signed: sigma = 1 -> floor(log2 40) = 5; sigma = 0.3 -> log2(133.3) -> 7.
    # c = 70 unsigned: sigma = 1 -> floor(log2 70) = 6; sigma = 100 -> log2(0.7) < 0 -> 0.
    np.testing.assert_array_equal(rules.fraclen_from_metric(np.float32([1.0, 0.3]), signed=True), [5, 7])
    np.testing.assert_array_equal(rules.fraclen_from_metric(np.float32([1.0, 100.0]), signed=False), [6, 0])


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=2, max_side=5),
                  elements=st.floats(-100, 100, width=32)),
       st.sampled_from(rules.METRICS))
def test_tensor_metric_per_channel_equals_metric_of_each_slice(x, metric):
    per_channel = np.asarray(rules.tensor_metric(x, metric, axis=0))
    for c in range(x.shape[0]):
        np.testing.assert_allclose(per_channel[c], rules.tensor_metric(x[c], metric), rtol=1e-5,
                                   atol=1e-6)


def test_tensor_metric_definitions():
    x = np.array([1.0, -2.0, 3.0, -4.0], np.float32)
    np.testing.assert_allclose(rules.tensor_metric(x, "std"), np.std(x, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(rules.tensor_metric(x, "mae"), 2.5, rtol=1e-6)
    np.testing.assert_allclose(rules.tensor_metric(x, "rms"), np.sqrt(7.5), rtol=1e-6)


@given(tensor_and_format())
def test_grid_search_picks_the_first_lowest_error(case):
    x, _, signed, bits = case
    errors = [float(rules.quantization_rms_error(x, fl, signed=signed, bits=bits))
              for fl in range(fp.max_fraclen(signed=signed, bits=bits) + 1)]
    assert float(rules.fraclen_grid_search(x, signed=signed, bits=bits)) == float(np.argmin(errors))


def test_grid_search_per_channel_equals_search_on_each_channel():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((3, 3, 4, 5)) * np.array([0.01, 0.1, 1.0, 5.0, 50.0])).astype(np.float32)
    per_channel = np.asarray(rules.fraclen_grid_search(w, signed=True, axis=-1))
    expected = [float(rules.fraclen_grid_search(w[..., c], signed=True)) for c in range(5)]
    np.testing.assert_array_equal(per_channel, expected)
    assert per_channel[0] == 7 and per_channel[-1] < 3


# ----------------------------------------------------------------- requantize


def exact_requantize(x, in_fl, out_fl, signed, bits=8):
    lo, hi = fp.integer_range(signed=signed, bits=bits)
    v = np.asarray(x, np.float64) * 2.0 ** (np.asarray(out_fl) - np.asarray(in_fl))
    return np.clip(np.round(v), lo, hi).astype(np.int64)


int32_values = st.one_of(
    st.integers(INT32_MIN, INT32_MAX),
    st.sampled_from([INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX - 1, INT32_MAX]),
    st.integers(-70000, 70000),
)


@given(st.lists(int32_values, min_size=1, max_size=64), st.integers(0, 40), st.booleans(),
       st.sampled_from([4, 8, 16]), st.data())
def test_requantize_equals_exact_rounding_for_any_int32(values, in_fl, signed, bits, data):
    out_fl = data.draw(st.integers(0, fp.max_fraclen(signed=signed, bits=bits)))
    acc = np.array(values, np.int32)
    ours = np.asarray(fp.requantize(acc, in_fl, out_fl, signed=signed, bits=bits))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, exact_requantize(acc, in_fl, out_fl, signed, bits))


def test_requantize_extremes_saturate_instead_of_wrapping():
    acc = np.array([INT32_MAX, INT32_MIN, INT32_MAX - 1, INT32_MIN + 1], np.int32)
    for in_fl in range(0, 33):
        for out_fl in range(0, 8):
            np.testing.assert_array_equal(
                fp.requantize(acc, in_fl, out_fl, signed=True),
                exact_requantize(acc, in_fl, out_fl, True), err_msg=f"{in_fl} -> {out_fl}")


def test_requantize_rounds_ties_to_even():
    acc = np.array([1, 3, 5, 7, -1, -3, -5, 2, 6], np.int32)  # halves after a shift of 1
    np.testing.assert_array_equal(fp.requantize(acc, 1, 0, signed=True),
                                  [0, 2, 2, 4, -0, -2, -2, 1, 3])
    np.testing.assert_array_equal(fp.requantize(acc, 1, 0, signed=False), [0, 2, 2, 4, 0, 0, 0, 1, 3])


def test_requantize_with_traced_per_channel_formats_under_jit():
    rng = np.random.default_rng(3)
    acc = rng.integers(-(2**20), 2**20, size=(2, 5, 4), dtype=np.int32)
    in_fl = np.array([9, 12, 14, 3], np.int32)
    out_fl = np.array([4, 6, 8, 5], np.int32)
    fn = jax.jit(lambda a, i, o: fp.requantize(a, i, o, signed=False, axis=-1))
    np.testing.assert_array_equal(fn(acc, in_fl, out_fl),
                                  exact_requantize(acc, in_fl, out_fl, False))


# ----------------------------------------------------------------- formats and bad input


def test_fixed_point_format_ranges():
    fmt = fp.FixedPointFormat(bits=8, fraclen=6, signed=True)
    assert (fmt.qmin, fmt.qmax, fmt.step) == (-127, 127, 1 / 64)
    fmt = fp.FixedPointFormat(bits=8, fraclen=8, signed=False)
    assert (fmt.qmin, fmt.qmax) == (0, 255)
    with pytest.raises(ValueError, match="fraclen"):
        fp.FixedPointFormat(bits=8, fraclen=8, signed=True)
    with pytest.raises(ValueError, match="bits"):
        fp.FixedPointFormat(bits=1, fraclen=0, signed=True)


X = np.ones((2, 3, 4), np.float32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fraclen=8, signed=True), r"fraclen must be in \[0, 7\]"),
    (dict(fraclen=9, signed=False), r"fraclen must be in \[0, 8\]"),
    (dict(fraclen=-1, signed=False), r"fraclen must be in \[0, 8\]"),
    (dict(fraclen=2.5, signed=True), "fraclen must hold integers"),
    (dict(fraclen=np.nan, signed=True), "fraclen must hold integers"),
    (dict(fraclen=3, signed=True, bits=1), r"bits must be in \[2, 16\]"),
    (dict(fraclen=3, signed=True, bits=17), r"bits must be in \[2, 16\]"),
    (dict(fraclen=3, signed=True, bits=8.0), "bits must be an int"),
    (dict(fraclen=3, signed=1), "signed must be True or False"),
    (dict(fraclen=3, signed=True, axis=3), r"axis=3 is out of bounds .* \[-3, 2\]"),
    (dict(fraclen=np.zeros(3), signed=True, axis=2), "fraclen has length 3 .* size 4 along axis 2"),
    (dict(fraclen=np.zeros(4), signed=True), "needs axis"),
    (dict(fraclen=np.zeros((2, 2)), signed=True, axis=0), "scalar or a 1-D array"),
])
def test_quantize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fp.quantize(X, **kwargs)


def test_quantize_rejects_integer_input():
    with pytest.raises(ValueError, match="x must be a float array"):
        fp.quantize(np.ones(3, np.int32), 3, signed=True)


def test_format_rules_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"metric must be one of \['std', 'mae', 'rms'\]"):
        rules.tensor_metric(X, "max")
    with pytest.raises(ValueError, match="metric must be one of"):
        rules.fraclen_from_metric(1.0, metric="var", signed=True)
    with pytest.raises(ValueError, match="fitted for bits=8 only.*fraclen_grid_search"):
        rules.fraclen_from_metric(1.0, signed=True, bits=4)
    with pytest.raises(ValueError, match="axis=-4 is out of bounds"):
        rules.tensor_metric(X, "std", axis=-4)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]"):
        rules.fraclen_grid_search(X, signed=True, bits=20)


def test_requantize_rejects_bad_arguments():
    acc = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="acc must be an integer array"):
        fp.requantize(acc.astype(np.float32), 8, 4, signed=True)
    with pytest.raises(ValueError, match="acc must be an integer array"):
        fp.requantize(acc.astype(np.int64), 8, 4, signed=True)
    with pytest.raises(ValueError, match=r"out_fraclen must be in \[0, 7\]"):
        fp.requantize(acc, 8, 8, signed=True)
    with pytest.raises(ValueError, match="in_fraclen must hold integers"):
        fp.requantize(acc, 8.5, 4, signed=True)
    with pytest.raises(ValueError, match="in_fraclen has length 3"):
        fp.requantize(acc, np.zeros(3, np.int32), 4, signed=True, axis=0)
