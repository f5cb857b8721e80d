"""How a quantized layer turns its variables into formats, scales and folded weights.

Pure functions, shared by the Flax layers (simulation) and the integer exporter, so both
derive the same numbers from the same variables (docs/METHOD.md, sections 2 to 6):

* ``choose_fraclen``: a tensor's format by one of the rules (std, mae, rms, grid);
* ``update_running_fraclen`` / ``running_fraclen``: the running input format, as state;
* ``activation_scale``: PACT's clipping level alpha as a fixed-point scale s;
* ``fold_conv_bn``: BatchNorm and the scales folded into the conv weight and bias;
* ``round_bias``: the bias rounded to the 32-bit accumulator format;
* ``classifier_weight_scale``, ``pool_shift``: the classifier's rescaling and the integer
  average pool's shift.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from f8net_jax import fixed_point as fp
from f8net_jax import format_rules

FORMAT_RULES = ("std", "mae", "rms", "grid")


def choose_fraclen(x: jax.Array, rule: str, *, signed: bool, bits: int = 8,
                   axis: Optional[int] = None, axis_name: Optional[str] = None,
                   wide: bool = False) -> jax.Array:
    """The format of x by ``rule``: 'std', 'mae' or 'rms' (format_rules.fraclen_from_metric
    of that statistic) or 'grid' (format_rules.fraclen_grid_search). Per tensor, or per
    channel along ``axis``; over the shards of x on all devices of ``axis_name`` when given;
    ``wide`` lets the fraclen pass the word length (fp.max_fraclen). Carries no gradient."""
    if rule not in FORMAT_RULES:
        raise ValueError(f"format_rule must be one of {list(FORMAT_RULES)}, got {rule!r}")
    x = jax.lax.stop_gradient(x)
    if rule == "grid":
        return format_rules.fraclen_grid_search(x, signed=signed, bits=bits, axis=axis,
                                                axis_name=axis_name, wide=wide)
    value = format_rules.tensor_metric(x, rule, axis=axis, axis_name=axis_name)
    return format_rules.fraclen_from_metric(value, metric=rule, signed=signed, bits=bits,
                                            wide=wide)


def update_running_fraclen(running: jax.Array, batch_fraclen: jax.Array,
                           momentum: float) -> jax.Array:
    """buf <- (1 - momentum) * buf + momentum * fl_batch (float, like BN's running mean)."""
    return (1.0 - momentum) * running + momentum * batch_fraclen


def running_fraclen(running: jax.Array, *, signed: bool, bits: int = 8) -> jax.Array:
    """The format used in eval (and in every scale): clip(round(buf), 0, bits - signed)."""
    return jnp.clip(jnp.round(running), 0, fp.max_fraclen(signed=signed, bits=bits))


def activation_scale(alpha: jax.Array, fraclen: jax.Array, *, signed: bool,
                     bits: int = 8) -> jax.Array:
    """s = 2^fl * |alpha| / (2^(bits - signed) - 1).

    A layer stores its input a = clip(z, 0, alpha) as x = a / s; then Q(x; fl) is exactly
    PACT's quantizer with clipping level alpha and step alpha / (2^(bits - signed) - 1).
    """
    levels = (1 << (bits - int(signed))) - 1
    value = fp.pow2(fraclen, jnp.float32) * jnp.abs(alpha)
    # A true division, as the official code's: XLA multiplies by the reciprocal of a
    # divisor it knows to be constant, one ulp off for most alphas; levels + 0 * value is
    # levels for every finite value, but not a constant.
    return value / _barrier(levels + jnp.zeros_like(value) * value)


def fold_conv_bn(kernel: jax.Array, gamma: jax.Array, beta: jax.Array, mean: jax.Array,
                 var: jax.Array, *, eps: float, in_scale, out_scale):
    """BatchNorm and the input/output scales folded into a conv (kernel's last axis is the
    output channel, as in HWIO and depthwise HW1C kernels):

        W_f = (gamma / sigma) * W * s_in / s_out,   b_f = (beta - gamma * mu / sigma) / s_out

    with sigma = sqrt(var + eps). The layer's output conv(x, W_f) + b_f is then in the
    units of its consumer (scale s_out) when x is in its own units (scale s_in).
    """
    # The official code's order of operations, each step correctly rounded in float32, so
    # that jitted code gives the numbers of the official code (and of numpy). Left alone,
    # XLA's simplifier turns g / sqrt(v) into g * rsqrt(v) and x / s for a scalar s into
    # x * (1 / s), and the compiler contracts b - g * m into one fused multiply-add: a
    # quarter of the entries then come out one ulp off, enough to move a weight across a
    # rounding tie. The barriers keep the sqrt and the divisors whole; the product of the
    # bias is materialized before the subtraction.
    sigma = _barrier(jnp.sqrt(var + eps))
    inv_sigma = gamma / sigma
    w_f = inv_sigma * kernel * in_scale
    w_f = w_f / _barrier(jnp.broadcast_to(jnp.asarray(out_scale, w_f.dtype), w_f.shape))
    b_f = beta - _materialized(inv_sigma * mean)
    b_f = b_f / _barrier(jnp.broadcast_to(jnp.asarray(out_scale, b_f.dtype), b_f.shape))
    return w_f, b_f


def _barrier(x: jax.Array) -> jax.Array:
    """x, hidden from XLA's algebraic rewrites (differentiable, no cost of its own)."""
    return jax.lax.optimization_barrier(x)


def _materialized(x: jax.Array) -> jax.Array:
    """x, rounded to its dtype before any consumer sees it, so that the compiler cannot
    contract its multiplication with the consumer's addition into a fused multiply-add
    (XLA drops optimization barriers on the CPU before fusing, and fuses reductions into
    loops). A sort is never fused: the first of sort([x, x]) is x. Meant for per-channel
    vectors: it costs one sort of pairs."""
    return jnp.sort(jnp.stack([x, x]), axis=0)[0]


def round_bias(bias: jax.Array, fraclen: jax.Array) -> jax.Array:
    """The bias as the integer accumulator stores it: round(b * 2^fl) * 2^-fl, saturated to
    the int32 range (32-bit fixed point at the accumulator's fl)."""
    scale = fp.pow2(fraclen, bias.dtype)
    return jnp.clip(jnp.round(bias * scale), -fp.INT32_MAX, fp.INT32_MAX) / scale


def classifier_weight_scale(quantized_kernel: jax.Array, features: int) -> jax.Array:
    """The classifier's forward rescaling ('rescale_forward', constant type, of the official
    configs): ws = (1 / sqrt(features)) / std(Q(w)), treated as a constant."""
    std = jnp.std(jax.lax.stop_gradient(quantized_kernel), ddof=1)
    return (1.0 / math.sqrt(features)) / std


def pool_shift(window: int) -> int:
    """Average pooling over ``window`` values as an integer sum and a right shift of
    round(log2(window)) bits; 2^shift / window is the factor the shift leaves over."""
    if window < 1:
        raise ValueError(f"the pooling window must hold at least one value, got {window}")
    return int(round(math.log2(window)))
