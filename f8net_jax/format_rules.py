"""Choosing a fixed-point format from a tensor's statistics: the format rules, as pure JAX
functions next to f8net_jax/fixed_point.py (docs/METHOD.md, section 2).

* ``tensor_metric``: the statistic (std, mae, rms) of a tensor or of each channel, over
  all devices when asked;
* ``fraclen_from_metric``: fl = clip(floor(log2(c / m)), 0, bits - signed), exactly;
* ``fraclen_grid_search``: the fl of the lowest RMS quantization error
  (``quantization_rms_error``).

``folding.choose_fraclen`` picks among them by the config's format_rule.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from f8net_jax import fixed_point as fp
from f8net_jax.fixed_point import ArrayLike

# c in fraclen = floor(log2(c / m)), fitted to the quantization-error analysis of 8-bit
# formats for a Gaussian (signed) or rectified Gaussian (unsigned) input.
METRIC_CONSTANTS = {
    # metric: (c signed, c unsigned)
    "std": (40.0, 70.0),
    "mae": (30.0, 30.0),
    "rms": (40.0, 50.0),
}
METRICS = tuple(METRIC_CONSTANTS)


def _mean(x: jax.Array, axes, axis_name: Optional[str]) -> jax.Array:
    """Mean over ``axes``, and over the devices of ``axis_name`` (equal shards) if given."""
    mean = jnp.mean(x, axis=axes)
    return mean if axis_name is None else jax.lax.pmean(mean, axis_name)


def tensor_metric(x: ArrayLike, metric: str, *, axis: Optional[int] = None,
                  axis_name: Optional[str] = None) -> jax.Array:
    """A statistic of x for the format rule, over the whole tensor (axis=None) or over all
    axes but ``axis`` (per channel):

    * 'std': unbiased standard deviation, sqrt(sum((x - mean)^2) / (N - 1));
    * 'mae': mean absolute value, mean(|x|);
    * 'rms': root mean square, sqrt(mean(x^2)).

    With ``axis_name`` (inside pmap), x is one device's shard of a tensor split evenly over
    the devices of that axis, and the statistic is the whole tensor's.
    """
    if metric not in METRIC_CONSTANTS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    x = jnp.asarray(x)
    axis = fp.normalize_axis(axis, x.ndim)
    reduce = None if axis is None else tuple(a for a in range(x.ndim) if a != axis)
    if metric == "std":
        if axis_name is None:
            return jnp.std(x, axis=reduce, ddof=1)
        n = (x.size if axis is None else x.size // x.shape[axis]) * jax.lax.psum(1, axis_name)
        mean = _mean(x, reduce, axis_name)
        if axis is not None:
            mean = jnp.expand_dims(mean, reduce)
        return jnp.sqrt(_mean(jnp.square(x - mean), reduce, axis_name) * (n / (n - 1)))
    if metric == "mae":
        return _mean(jnp.abs(x), reduce, axis_name)
    return jnp.sqrt(_mean(jnp.square(x), reduce, axis_name))


def _floor_log2(r: jax.Array) -> jax.Array:
    """floor(log2(r)) for positive r, exact (from the binary exponent, not a log kernel);
    +inf for r = inf, -inf for r = 0."""
    _, exponent = jnp.frexp(r)  # r = mantissa * 2^exponent, mantissa in [0.5, 1)
    fl = (exponent - 1).astype(r.dtype)
    fl = jnp.where(jnp.isinf(r), jnp.inf, fl)
    return jnp.where(r == 0, -jnp.inf, fl)


def fraclen_from_metric(value: ArrayLike, *, metric: str = "std", signed: bool,
                        bits: int = 8, wide: bool = False) -> jax.Array:
    """The format rule: fl = clip(floor(log2(c / m)), 0, bits - signed) (the upper bound
    is ``fp.max_fraclen(..., wide=wide)``).

    c depends on the metric and the sign (``METRIC_CONSTANTS``: std 40/70, mae 30/30,
    rms 40/50, signed/unsigned); the constants are fitted for 8 bits only. As in the
    official code, c / m is evaluated in float32 as c * (1 / m). floor(log2(.)) is taken
    exactly from the binary exponent, so the rule gives the same answer on every backend
    (a float log2 kernel can round up just below a power of two).

    m = 0 gives the largest fl, m = inf gives 0. Returns float32 holding integers, the
    shape of ``value`` (a scalar per layer, a vector per channel).
    """
    if metric not in METRIC_CONSTANTS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    bits = fp.check_bits(bits)
    signed = fp.check_signed(signed)
    if bits != 8:
        raise ValueError(
            f"the '{metric}' format rule's constants are fitted for bits=8 only, got "
            f"bits={bits}: use fraclen_grid_search for other word lengths"
        )
    c = METRIC_CONSTANTS[metric][0 if signed else 1]
    m = jnp.asarray(value, jnp.float32)
    ratio = jnp.float32(c) * (jnp.float32(1.0) / m)
    fl = _floor_log2(ratio)
    return jnp.clip(fl, 0, fp.max_fraclen(signed=signed, bits=bits, wide=wide))


def quantization_rms_error(x: ArrayLike, fraclen: ArrayLike, *, signed: bool, bits: int = 8,
                           axis: Optional[int] = None,
                           axis_name: Optional[str] = None, wide: bool = False) -> jax.Array:
    """sqrt(mean((x - Q(x; fl))^2)) over the whole tensor, or per channel along ``axis``
    when fraclen is per channel (over all devices of ``axis_name`` when given)."""
    x = jnp.asarray(x)
    err = jnp.square(x - fp.quantize(x, fraclen, signed=signed, bits=bits, axis=axis,
                                     wide=wide))
    ax = fp.normalize_axis(axis, x.ndim)
    if ax is None or jnp.ndim(fraclen) == 0:
        return jnp.sqrt(_mean(err, None, axis_name))
    return jnp.sqrt(_mean(err, tuple(a for a in range(x.ndim) if a != ax), axis_name))


def fraclen_grid_search(x: ArrayLike, *, signed: bool, bits: int = 8,
                        axis: Optional[int] = None,
                        axis_name: Optional[str] = None, wide: bool = False) -> jax.Array:
    """The fl in [0, fp.max_fraclen(..., wide=wide)] with the lowest RMS quantization error
    sqrt(mean((x - Q(x; fl))^2)); the smallest fl wins a tie.

    Over the whole tensor (axis=None, the official rule), or per channel along ``axis``;
    over all devices of ``axis_name`` when given. Returns float32 holding integers: a
    scalar, or a vector of x.shape[axis]. No gradient.
    """
    bits = fp.check_bits(bits)
    signed = fp.check_signed(signed)
    x = jax.lax.stop_gradient(jnp.asarray(x))
    ax = fp.normalize_axis(axis, x.ndim)
    candidates = jnp.arange(fp.max_fraclen(signed=signed, bits=bits, wide=wide) + 1,
                            dtype=jnp.float32)
    if ax is None:
        errors = jax.vmap(lambda fl: quantization_rms_error(
            x, fl, signed=signed, bits=bits, axis_name=axis_name, wide=wide))(candidates)
    else:
        channels = x.shape[ax]
        errors = jax.vmap(lambda fl: quantization_rms_error(
            x, jnp.full((channels,), fl), signed=signed, bits=bits, axis=ax,
            axis_name=axis_name, wide=wide))(candidates)
    return jnp.argmin(errors, axis=0).astype(jnp.float32)  # argmin returns the first minimum
