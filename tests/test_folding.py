"""The folding functions against direct numpy float32 computations in the official order
of operations, under jit as the layers call them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from f8net_jax import fixed_point as fp
from f8net_jax import folding

FOLD = jax.jit(lambda k, g, b, m, v, si, so: folding.fold_conv_bn(
    k, g, b, m, v, eps=1e-5, in_scale=si, out_scale=so))


def random_layer(rng, shape):
    c = shape[-1]
    return (rng.normal(0, 0.05, shape).astype(np.float32),
            rng.uniform(0.3, 1.5, c).astype(np.float32), rng.normal(0, 0.5, c).astype(np.float32),
            rng.normal(0, 0.5, c).astype(np.float32), rng.uniform(0.2, 3.0, c).astype(np.float32),
            np.float32(rng.uniform(0.005, 0.2)), np.float32(rng.uniform(0.005, 0.2)))


def official_order(k, g, b, m, v, si, so):
    """numpy float32, one correctly rounded operation at a time, in the official order."""
    inv_sigma = g / np.sqrt(v + np.float32(1e-5))
    return inv_sigma * k * si / so, (b - inv_sigma * m) / so


@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (1, 1, 64, 128), (3, 3, 1, 96), (7, 7, 3, 64)])
def test_jitted_fold_gives_the_official_folded_weight_bit_for_bit(shape):
    rng = np.random.default_rng(sum(shape))
    differing = total = 0
    for _ in range(20):
        layer = random_layer(rng, shape)
        w, _ = FOLD(*layer)
        expected, _ = official_order(*layer)
        differing += int(np.sum(np.asarray(w) != expected))
        total += expected.size
    # Without the barriers XLA computed g * rsqrt(v) and x * (1/s): about a quarter of the
    # entries were one ulp off.
    assert differing == 0, f"{differing} of {total} folded weights differ"


@pytest.mark.parametrize("channels", [1, 64, 256])
def test_jitted_fold_gives_the_official_folded_bias_bit_for_bit(channels):
    """Left alone, the compiler contracted beta - g/sigma * mu into one fused multiply-add:
    a quarter of the biases were an ulp off, 0.6% of them after rounding to the
    accumulator's grid at fraclen 16."""
    rng = np.random.default_rng(channels)
    differing = total = 0
    for _ in range(30):
        layer = random_layer(rng, (1, 1, 4, channels))
        _, b = FOLD(*layer)
        _, expected = official_order(*layer)
        differing += int(np.sum(np.asarray(b) != expected))
        total += expected.size
    assert differing == 0, f"{differing} of {total} folded biases differ"


def test_the_fold_has_gradients_through_every_input():
    grads = jax.grad(lambda *a: sum(jnp.sum(t) for t in folding.fold_conv_bn(
        *a, eps=1e-5, in_scale=2.0, out_scale=4.0)), argnums=(0, 1, 2, 3, 4))(
        *(jnp.asarray(v) for v in random_layer(np.random.default_rng(0), (3, 3, 2, 4))[:5]))
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


def test_round_bias_puts_the_bias_on_the_accumulator_grid_and_saturates():
    b = jnp.asarray([0.3, -1.2, 1e9, -1e9], jnp.float32)
    out = np.asarray(folding.round_bias(b, jnp.float32(4.0)), np.float64)
    np.testing.assert_array_equal(out * 16, np.round(out * 16))
    assert out[0] == 5 / 16 and out[1] == -19 / 16
    assert out[2] * 16 == np.float32(fp.INT32_MAX) and out[3] * 16 == -np.float32(fp.INT32_MAX)


def test_jitted_activation_scale_is_a_correctly_rounded_division():
    alphas = np.random.default_rng(3).uniform(0.5, 12.0, 2000).astype(np.float32)
    for signed, levels in ((False, 255), (True, 127)):
        f = jax.jit(jax.vmap(lambda a: folding.activation_scale(a, jnp.float32(6.0),
                                                                 signed=signed)))
        expected = (np.float32(64) * alphas) / np.float32(levels)
        assert np.array_equal(np.asarray(f(alphas)), expected)


def test_activation_scale_is_pact_step_times_two_to_the_fraclen():
    s = folding.activation_scale(jnp.float32(-6.0), jnp.float32(5.0), signed=False)
    assert float(s) == pytest.approx(32 * 6.0 / 255)
    s = folding.activation_scale(jnp.float32(6.0), jnp.float32(5.0), signed=True)
    assert float(s) == pytest.approx(32 * 6.0 / 127)


def test_running_fraclen_rounds_and_clips_to_the_format():
    running = jnp.asarray([-0.6, 3.5, 4.5, 7.6, 9.4, 20.0], jnp.float32)
    np.testing.assert_array_equal(folding.running_fraclen(running, signed=True),
                                  [0, 4, 4, 7, 7, 7])
    np.testing.assert_array_equal(folding.running_fraclen(running, signed=False),
                                  [0, 4, 4, 8, 8, 8])


def test_choose_fraclen_wide_lets_small_tensors_pass_the_word_length():
    w = jnp.asarray(np.random.default_rng(0).normal(0, 0.01, 1000), jnp.float32)
    assert float(folding.choose_fraclen(w, "std", signed=True)) == 7
    # std 0.01: floor(log2(40 / 0.01)) = 11
    assert float(folding.choose_fraclen(w, "std", signed=True, wide=True)) == 11
    assert float(folding.choose_fraclen(w, "grid", signed=True, wide=True)) > 7


def test_pool_shift_and_its_errors():
    assert [folding.pool_shift(n) for n in (1, 4, 49, 64)] == [0, 2, 6, 6]
    with pytest.raises(ValueError, match="at least one value"):
        folding.pool_shift(0)
