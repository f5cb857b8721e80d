"""Fixed-point arithmetic of F8Net as pure JAX functions.

A fixed-point format is (word length ``bits``, fractional length ``fraclen``, sign). A value
v is stored as the integer q = round(v * 2^fraclen) and means q * 2^-fraclen.

* signed:   q in [-(2^(bits-1) - 1), 2^(bits-1) - 1] (symmetric), fraclen in 0..bits-1;
* unsigned: q in [0, 2^bits - 1], fraclen in 0..bits.

Wide formats (``wide=True``, an option beyond the paper) keep the same integers but let the
fraclen go past the word length, up to ``bits`` more (0..2*bits-1 signed, 0..2*bits
unsigned): a tensor whose values are all small then uses more of its codes. Products stay
8-bit x 8-bit into int32 and every rescaling stays a shift.

Rounding is round-half-to-even everywhere, in float and in integer code. Powers of two are
built from their bit patterns (``pow2``), never with ``exp2``/``pow``, whose XLA kernels are
not exact for integer arguments: every scaling here is exact.

What lives here (see docs/METHOD.md, sections 1 and 6):

* ``max_fraclen``, ``integer_range``, ``FixedPointFormat``: what a format allows;
* ``quantize``: the fake quantizer with its straight-through gradient (``jax.custom_vjp``),
  ``saturate`` and PACT's clip;
* ``requantize``: int32 accumulator to an 8-bit format by a rounding, saturating shift.

Choosing a format from statistics (the format rules) is f8net_jax/format_rules.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jax.Array, np.ndarray, float, int]

MIN_BITS = 2
MAX_BITS = 16
INT32_MAX = 2 ** 31 - 1   # accumulators, biases and residual streams are int32
INT32_MIN = -(2 ** 31)


# --------------------------------------------------------------------------------------
# Formats and validation.


def check_bits(bits: int) -> int:
    """``bits`` as an int, or ValueError unless it is an int in [MIN_BITS, MAX_BITS]."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return int(bits)


def check_signed(signed: bool) -> bool:
    """``signed`` as a bool, or ValueError unless it is True or False."""
    if not isinstance(signed, (bool, np.bool_)):
        raise ValueError(f"signed must be True or False, got {signed!r}")
    return bool(signed)


def max_fraclen(*, signed: bool, bits: int = 8, wide: bool = False) -> int:
    """Largest fractional length of a format: bits - 1 if signed, else bits; ``bits``
    more for wide formats."""
    bits = check_bits(bits)
    return bits - int(check_signed(signed)) + (bits if wide else 0)


def integer_range(*, signed: bool, bits: int = 8) -> tuple[int, int]:
    """(qmin, qmax) of the stored integers: symmetric [-(2^(bits-1)-1), 2^(bits-1)-1] if
    signed, [0, 2^bits - 1] if unsigned."""
    bits = check_bits(bits)
    if check_signed(signed):
        qmax = (1 << (bits - 1)) - 1
        return -qmax, qmax
    return 0, (1 << bits) - 1


@dataclasses.dataclass(frozen=True)
class FixedPointFormat:
    """A fixed-point format: a value v is stored as round(v * 2^fraclen) in [qmin, qmax]."""

    bits: int
    fraclen: int
    signed: bool

    def __post_init__(self):
        check_bits(self.bits)
        check_signed(self.signed)
        hi = max_fraclen(signed=self.signed, bits=self.bits)
        if isinstance(self.fraclen, bool) or not isinstance(self.fraclen, (int, np.integer)):
            raise ValueError(f"fraclen must be an int in [0, {hi}], got {self.fraclen!r}")
        if not 0 <= self.fraclen <= hi:
            raise ValueError(f"fraclen must be in [0, {hi}] for this format, got {self.fraclen}")

    @property
    def qmin(self) -> int:
        return integer_range(signed=self.signed, bits=self.bits)[0]

    @property
    def qmax(self) -> int:
        return integer_range(signed=self.signed, bits=self.bits)[1]

    @property
    def step(self) -> float:
        """The value of one integer unit, 2^-fraclen."""
        return 2.0 ** -self.fraclen


def _concrete(value) -> Optional[np.ndarray]:
    """The value as a numpy array, or None if it is traced (known only at run time)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _check_fraclen(fraclen: ArrayLike, *, lo: int, hi: int, name: str = "fraclen") -> None:
    """Raises ValueError if a concrete fraclen is not integral or not in [lo, hi]."""
    value = _concrete(fraclen)
    if value is None:
        return
    if value.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array, got shape {value.shape}")
    if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {value.dtype}")
    if not np.all(np.isfinite(value)) or not np.all(np.round(value) == value):
        raise ValueError(f"{name} must hold integers in [{lo}, {hi}], got {value.tolist()}")
    if np.any(value < lo) or np.any(value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value.tolist()}")


def normalize_axis(axis: Optional[int], ndim: int, name: str = "axis") -> Optional[int]:
    """``axis`` in [0, ndim) (negative axes count from the end), None for None; ValueError
    when out of bounds."""
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"{name} must be None or an int in [{-ndim}, {ndim - 1}], got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name}={axis} is out of bounds for an array of {ndim} dimensions: "
            f"allowed None or [{-ndim}, {ndim - 1}]"
        )
    return int(axis) % ndim


def _along_axis(fraclen: ArrayLike, shape: tuple[int, ...], axis: Optional[int],
                name: str = "fraclen") -> jax.Array:
    """Lays a scalar or per-channel fraclen out so that it broadcasts against ``shape``,
    its entries along ``axis``."""
    fl = jnp.asarray(fraclen)
    ndim = len(shape)
    axis = normalize_axis(axis, ndim)
    if fl.ndim == 0:
        return fl
    if fl.ndim != 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array, got shape {fl.shape}")
    if axis is None:
        raise ValueError(
            f"a per-channel {name} (shape {fl.shape}) needs axis: the axis of x it lies along"
        )
    if fl.shape[0] != shape[axis]:
        raise ValueError(
            f"per-channel {name} has length {fl.shape[0]} but x has size {shape[axis]} "
            f"along axis {axis}: they must be equal"
        )
    return fl.reshape((-1,) + (1,) * (ndim - axis - 1))


def pow2(exponent: ArrayLike, dtype=jnp.float32) -> jax.Array:
    """2^exponent, exact, for integral exponents in [-126, 127], built from the float32
    bit pattern (XLA's exp2 and pow are not exact on every backend)."""
    e = jnp.clip(jnp.asarray(exponent).astype(jnp.int32), -126, 127)
    bits = jnp.left_shift(e + 127, jnp.int32(23))
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


# --------------------------------------------------------------------------------------
# The fake quantizer.


def _quantize_with_mask(x: jax.Array, fl: jax.Array, signed: bool, bits: int,
                        rounding: bool):
    lo, hi = integer_range(signed=signed, bits=bits)
    scale = pow2(fl, x.dtype)
    r = x * scale
    if rounding:
        r = jnp.round(r)  # jnp.round rounds half to even
    mask = (jnp.abs(r) < hi) if signed else ((r > 0) & (r < hi))
    return jnp.clip(r, lo, hi) / scale, mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fake_quant(x, fl, signed, bits, rounding):
    return _quantize_with_mask(x, fl, signed, bits, rounding)[0]


def _fake_quant_fwd(x, fl, signed, bits, rounding):
    out, mask = _quantize_with_mask(x, fl, signed, bits, rounding)
    return out, (mask, fl)


def _fake_quant_bwd(signed, bits, rounding, residuals, g):
    mask, fl = residuals
    return jnp.where(mask, g, jnp.zeros_like(g)), jnp.zeros_like(fl)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _prepare(x, fraclen, signed, bits, axis, wide):
    bits = check_bits(bits)
    signed = check_signed(signed)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array, got dtype {x.dtype}")
    _check_fraclen(fraclen, lo=0, hi=max_fraclen(signed=signed, bits=bits, wide=wide))
    fl = _along_axis(fraclen, x.shape, axis).astype(x.dtype)
    return x, fl, signed, bits


def quantize(x: ArrayLike, fraclen: ArrayLike, *, signed: bool, bits: int = 8,
             axis: Optional[int] = None, wide: bool = False) -> jax.Array:
    """Fake quantizer: Q(x; fl) = clip(round(x * 2^fl), qmin, qmax) * 2^-fl.

    Straight-through gradient: dQ/dx = 1 where r = round(x * 2^fl) lies strictly inside
    the integer range (signed |r| < qmax, unsigned 0 < r < qmax), else 0; the mask is taken
    after rounding and before clipping. No gradient flows to ``fraclen``.

    Args:
      x: a float array.
      fraclen: the fractional length: a scalar (per layer) or a 1-D array of per-channel
        values laid along ``axis`` of x. It may be traced; a concrete value must hold
        integers in [0, bits - signed] (``max_fraclen(..., wide=wide)``).
      signed: symmetric signed format if True, unsigned if False (static).
      bits: word length, 2..16 (static).
      axis: the axis of x that a per-channel fraclen lies along (static).
      wide: allow the fraclens of wide formats (static).
    """
    x, fl, signed, bits = _prepare(x, fraclen, signed, bits, axis, wide)
    return _fake_quant(x, fl, signed, bits, True)


def saturate(x: ArrayLike, fraclen: ArrayLike, *, signed: bool, bits: int = 8,
             axis: Optional[int] = None, wide: bool = False) -> jax.Array:
    """Clamps x to the range of a format without rounding: clip(x, qmin*2^-fl, qmax*2^-fl).

    This is the official code's 'floating' variant of the quantizer (its full-precision
    baseline clamps folded weights this way). Its gradient is the same straight-through
    mask as ``quantize``'s, taken on the unrounded x * 2^fl.
    """
    x, fl, signed, bits = _prepare(x, fraclen, signed, bits, axis, wide)
    return _fake_quant(x, fl, signed, bits, False)


@jax.custom_vjp
def _pact_clip(x, alpha, lo_scale):
    return jnp.clip(x, lo_scale * alpha, alpha)


def _pact_clip_fwd(x, alpha, lo_scale):
    return _pact_clip(x, alpha, lo_scale), (x, alpha, lo_scale)


def _pact_clip_bwd(residuals, g):
    x, alpha, lo_scale = residuals
    lo = lo_scale * alpha
    zero = jnp.zeros_like(g)
    dx = jnp.where((x > lo) & (x < alpha), g, zero)
    dalpha = jnp.sum(jnp.where(x >= alpha, g, zero)) + lo_scale * jnp.sum(
        jnp.where(x <= lo, g, zero))
    return dx, dalpha.astype(alpha.dtype), jnp.zeros_like(lo_scale)


_pact_clip.defvjp(_pact_clip_fwd, _pact_clip_bwd)


def pact_clip(x: ArrayLike, alpha: ArrayLike, *, signed: bool = False) -> jax.Array:
    """PACT's clip: clip(x, 0, alpha), or clip(x, -alpha, alpha) if ``signed``, with
    alpha >= 0 a scalar.

    Gradients as PACT defines them: dx = 1 strictly inside the range, d alpha = 1 where
    x >= alpha (and -1 where x <= -alpha, signed). Written out because autodiff of
    min/max splits ties and divides at every element, which on a CPU cost as much as the
    convolutions of a small network.
    """
    x = jnp.asarray(x)
    alpha = jnp.asarray(alpha, x.dtype)
    if alpha.ndim != 0:
        raise ValueError(f"alpha must be a scalar, got shape {alpha.shape}")
    return _pact_clip(x, alpha, jnp.asarray(-1.0 if check_signed(signed) else 0.0, x.dtype))


# --------------------------------------------------------------------------------------
# Integer requantization.


def rounding_shift(acc: ArrayLike, shift: ArrayLike) -> jax.Array:
    """round_half_to_even(acc / 2^shift) for int32 acc and integral shift >= 0, exact for
    every int32 input (no intermediate can overflow).

    acc = q * 2^shift + r with q = acc >> shift (floor) and 0 <= r < 2^shift; the result is
    q + 1 when r > 2^(shift-1), or when r = 2^(shift-1) and q is odd. Shifts of 32 or more
    give 0 (|acc / 2^32| <= 1/2 rounds to 0).
    """
    acc = jnp.asarray(acc, jnp.int32)
    s = jnp.asarray(shift, jnp.int32)
    s_c = jnp.clip(s, 0, 31)
    q = jnp.right_shift(acc, s_c)
    one = jnp.int32(1)
    r = acc & (jnp.left_shift(one, s_c) - 1)  # 2^31 - 1 at s_c = 31, no overflow
    half = jnp.left_shift(one, jnp.maximum(s_c - 1, 0))
    up = (s_c > 0) & ((r > half) | ((r == half) & ((q & 1) == 1)))
    out = q + up.astype(jnp.int32)  # q <= 2^30 when s_c >= 1: cannot overflow
    return jnp.where(s >= 32, jnp.int32(0), out)


def saturating_shift_left(acc: ArrayLike, shift: ArrayLike, lo: int, hi: int) -> jax.Array:
    """clip(acc * 2^shift, lo, hi) for int32 acc, shift >= 0 and lo <= 0 <= hi, without
    overflow: values whose product would leave [lo, hi] saturate before shifting."""
    acc = jnp.asarray(acc, jnp.int32)
    s = jnp.clip(jnp.asarray(shift, jnp.int32), 0, 31)
    upper = jnp.right_shift(jnp.int32(hi), s)       # floor(hi / 2^s)
    lower = -jnp.right_shift(jnp.int32(-lo), s)     # ceil(lo / 2^s)
    shifted = jnp.left_shift(jnp.clip(acc, lower, upper), s)   # in [lo, hi]
    return jnp.where(acc > upper, jnp.int32(hi), jnp.where(acc < lower, jnp.int32(lo), shifted))


def requantize(acc: ArrayLike, in_fraclen: ArrayLike, out_fraclen: ArrayLike, *,
               signed: bool, bits: int = 8, axis: Optional[int] = None,
               wide: bool = False) -> jax.Array:
    """An int32 accumulator at fl_in to the consumer's ``bits`` format at fl_out.

    With n = fl_in - fl_out: for n > 0, round_half_to_even(acc / 2^n) by an arithmetic
    shift; for n <= 0, acc * 2^-n; then saturation to [qmin, qmax] (for unsigned formats
    this is also the ReLU). Exact and saturating for every int32 input, unlike the
    official code, whose rounding addition wraps near 2^31.

    ``in_fraclen`` and ``out_fraclen`` are integers (scalars, or per-channel vectors along
    ``axis``; traced values are allowed); ``wide`` admits the out_fraclen of a wide
    format. Returns int32 values in [qmin, qmax].
    """
    bits = check_bits(bits)
    signed = check_signed(signed)
    dtype = acc.dtype if hasattr(acc, "dtype") else np.asarray(acc).dtype
    if isinstance(acc, (int, np.integer)):  # a Python int scalar
        dtype = np.dtype(np.int32)
    if not jnp.issubdtype(dtype, jnp.integer) or np.dtype(dtype).itemsize > 4:
        raise ValueError(f"acc must be an integer array of at most 32 bits, got {dtype}")
    acc = jnp.asarray(acc, jnp.int32)
    _check_fraclen(in_fraclen, lo=0, hi=62, name="in_fraclen")
    _check_fraclen(out_fraclen, lo=0, hi=max_fraclen(signed=signed, bits=bits, wide=wide),
                   name="out_fraclen")
    lo, hi = integer_range(signed=signed, bits=bits)
    fl_in = _along_axis(in_fraclen, acc.shape, axis, "in_fraclen").astype(jnp.int32)
    fl_out = _along_axis(out_fraclen, acc.shape, axis, "out_fraclen").astype(jnp.int32)
    net = fl_in - fl_out
    down = jnp.clip(rounding_shift(acc, jnp.maximum(net, 0)), lo, hi)
    up = saturating_shift_left(acc, jnp.maximum(-net, 0), lo, hi)
    return jnp.where(net > 0, down, up)
