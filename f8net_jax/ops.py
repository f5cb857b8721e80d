"""The convolutions, matmuls and max pools of the models: which implementation, which
precision.

Compute policy (``ComputePolicy``). A quantized layer runs two kinds of products
(docs/METHOD.md 4):

* the *exact* pass conv(Q(x), Q(W_f)) and the classifier's Q(x) @ Q(w): both operands are
  8-bit integers times powers of two, exactly representable in bfloat16, so they take
  bfloat16 operands with float32 accumulation (``preferred_element_type``). The result is
  the float32 one bit for bit wherever float32 is exact (integer partial sums below 2^24,
  which the integer exporter checks); on accelerators this is the tensor-core/MXU path
  instead of Precision.HIGHEST's emulated float32;
* the *float* products: the BatchNorm-statistics pass conv(s * Q(x), W), the float model,
  and the backward of both. Their operand precision is ``ComputePolicy.dtype`` ('float32',
  the default and the only choice worth having on a CPU, or 'bfloat16' on accelerators),
  with float32 accumulation.

Implementation (``ComputePolicy.backend``, one of ``CONV_BACKENDS``). 'xla' is
lax.conv_general_dilated. 'onednn' runs float32 convolutions, forward and both gradients,
and max pooling through oneDNN (f8net_jax/train_onednn.py): on this project's CPUs XLA's
convolutions are 2-3x slower than oneDNN's. 'auto' takes oneDNN on the CPU when the
library is found (``train_onednn.status()`` says whether and why not) and XLA elsewhere.
The exact pass is exact in float32 too, so oneDNN computes it in float32 and returns the
same numbers as bfloat16 operands would.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from f8net_jax import train_onednn

CONV_BACKENDS = ("auto", "xla", "onednn")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ComputePolicy:
    """How the training step computes its products (see the module docstring); a model's
    is ``QuantConfig.compute``.

    dtype: operand precision of the float products (BatchNorm-statistics pass, float
      model, backward of every pass): 'float32' or 'bfloat16'; accumulation is float32.
    backend: 'auto', 'xla' or 'onednn' (CONV_BACKENDS).
    exact_dtype: operands of the exact pass under XLA: 'bfloat16', 'float32', or 'auto'
      (bfloat16 on accelerators; float32 on the CPU, where XLA's bfloat16 convolution is
      slower and float32 is as exact).
    """

    dtype: str = "float32"
    backend: str = "auto"
    exact_dtype: str = "auto"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.exact_dtype not in DTYPES + ("auto",):
            raise ValueError(f"exact_dtype must be one of {list(DTYPES) + ['auto']}, got "
                             f"{self.exact_dtype!r}")
        if self.backend not in CONV_BACKENDS:
            raise ValueError(f"conv_backend must be one of {list(CONV_BACKENDS)}, got "
                             f"{self.backend!r}")

    def exact_operands(self) -> str:
        """The operand dtype of the exact pass under XLA."""
        if self.exact_dtype != "auto":
            return self.exact_dtype
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"

    def resolve(self) -> str:
        """The backend that runs: 'onednn' or 'xla'."""
        if self.backend == "xla":
            return "xla"
        if self.backend == "onednn":
            if self.dtype != "float32":
                raise ValueError(f"conv_backend 'onednn' computes in float32; precision "
                                 f"{self.dtype!r} needs conv_backend 'xla' or 'auto'")
            ok, why = train_onednn.status()
            if not ok:
                raise RuntimeError(f"conv_backend 'onednn' is not available: {why}")
            return "onednn"
        if self.dtype == "float32" and train_onednn.status()[0]:
            return "onednn"
        return "xla"

    def describe(self) -> dict:
        """What computes each pass of the training step and why (logged at start-up)."""
        backend = self.resolve()
        if self.backend != "auto":
            why = f"conv_backend {self.backend!r} in the config"
        elif backend == "onednn":
            why = "conv_backend 'auto': oneDNN's kernels built and loaded"
        elif self.dtype != "float32":
            why = f"conv_backend 'auto': oneDNN computes float32, precision is {self.dtype!r}"
        else:
            why = f"conv_backend 'auto' fell back to XLA: {train_onednn.status()[1]}"
        if backend == "onednn":
            passes = dict.fromkeys(("exact_pass", "statistics_pass", "backward", "max_pool"),
                                   "oneDNN float32")
        else:
            passes = {"exact_pass": f"XLA, {self.exact_operands()} operands",
                      "statistics_pass": f"XLA, {self.dtype} operands",
                      "backward": f"XLA, {self.dtype} operands", "max_pool": "XLA"}
        return {"conv_backend": backend, "why": why, **passes}


def window_output_size(size: int, window: int, strides: int, padding: int = 0) -> int:
    """Output length of a convolution or pool along one axis: (size + 2p - k) // s + 1."""
    return (size + 2 * padding - window) // strides + 1


# --------------------------------------------------------------------------------------
# Convolutions.


def _xla_conv(x, kernel, strides, padding, groups, *, precision=None,
              preferred_element_type=None):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(strides, strides), padding=[(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=precision, preferred_element_type=preferred_element_type)


def _out_shape(x_shape, kernel_shape, strides, padding):
    n, h, w, _ = x_shape
    kh, kw, _, o = kernel_shape
    return (n, window_output_size(h, kh, strides, padding),
            window_output_size(w, kw, strides, padding), o)


def _lowp(dtype: str):
    return jnp.bfloat16 if dtype == "bfloat16" else jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _xla_mixed_conv(x, kernel, strides, padding, groups, forward_dtype, backward_dtype):
    """conv with operands cast to ``forward_dtype``, float32 accumulation; its gradients
    with operands (and the incoming gradient) cast to ``backward_dtype``."""
    dt = _lowp(forward_dtype)
    return _xla_conv(x.astype(dt), kernel.astype(dt), strides, padding, groups,
                     precision=_highest(forward_dtype), preferred_element_type=jnp.float32)


def _xla_mixed_conv_fwd(x, kernel, strides, padding, groups, forward_dtype, backward_dtype):
    y = _xla_mixed_conv(x, kernel, strides, padding, groups, forward_dtype, backward_dtype)
    return y, (x, kernel)


def _xla_mixed_conv_bwd(strides, padding, groups, forward_dtype, backward_dtype, residuals, g):
    x, kernel = residuals
    dt = _lowp(backward_dtype)
    _, vjp = jax.vjp(lambda a, b: _xla_conv(a, b, strides, padding, groups,
                                            precision=_highest(backward_dtype)),
                     x.astype(dt), kernel.astype(dt))
    dx, dw = vjp(g.astype(dt))
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_xla_mixed_conv.defvjp(_xla_mixed_conv_fwd, _xla_mixed_conv_bwd)


def _highest(dtype: str):
    """float32 operands mean true float32 (no TF32 or bf16 passes on accelerators)."""
    return jax.lax.Precision.HIGHEST if dtype == "float32" else None


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: int = 1, padding: int = 0,
           groups: int = 1, exact: bool = False,
           compute: ComputePolicy = ComputePolicy()) -> jax.Array:
    """y = conv(x, kernel) for NHWC x and HWIO kernel, symmetric zero padding, float32
    result.

    ``exact``: both operands lie on 8-bit fixed-point grids (the second pass of a quantized
    layer): bfloat16 operands (``compute.exact_operands()``), float32 accumulation,
    bit-identical to float32 while the integer partial sums stay below 2^24. Otherwise the
    products use ``compute.dtype``.
    The backward always uses ``compute.dtype``.
    """
    backend = compute.resolve()
    if backend == "onednn":
        return train_onednn.conv2d(x.astype(jnp.float32), kernel.astype(jnp.float32),
                                   _out_shape(x.shape, kernel.shape, strides, padding),
                                   strides, padding, groups)
    forward = compute.exact_operands() if exact else compute.dtype
    if forward == "float32" and compute.dtype == "float32":
        return _xla_conv(x, kernel, strides, padding, groups,
                         precision=jax.lax.Precision.HIGHEST)
    return _xla_mixed_conv(x, kernel, strides, padding, groups, forward, compute.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed_matmul(x, w, forward_dtype, backward_dtype):
    dt = _lowp(forward_dtype)
    return jnp.matmul(x.astype(dt), w.astype(dt), precision=_highest(forward_dtype),
                      preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(x, w, forward_dtype, backward_dtype):
    return _mixed_matmul(x, w, forward_dtype, backward_dtype), (x, w)


def _mixed_matmul_bwd(forward_dtype, backward_dtype, residuals, g):
    x, w = residuals
    dt = _lowp(backward_dtype)
    hi = _highest(backward_dtype)
    g = g.astype(dt)
    dx = jnp.matmul(g, w.astype(dt).T, precision=hi, preferred_element_type=jnp.float32)
    dw = jnp.matmul(x.astype(dt).T, g, precision=hi, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, *, exact: bool = False,
           compute: ComputePolicy = ComputePolicy()) -> jax.Array:
    """x @ w with float32 result; ``exact`` and ``compute`` as in ``conv2d``."""
    forward = compute.exact_operands() if exact else compute.dtype
    if forward == "float32" and compute.dtype == "float32":
        return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
    return _mixed_matmul(x, w, forward, compute.dtype)


# --------------------------------------------------------------------------------------
# Max pooling.
#
# Autodiff of a window max would use select-and-scatter, which on XLA:CPU costs more than a
# ResNet-18 convolution (170 ms for the stem's pool at batch 8); both backends here route
# the gradient to the first maximum of each window in row-major order, as XLA's and
# PyTorch's do.


def _window_views(xp, window, strides, out_h, out_w):
    """(i, j, view): the window offset and the strided view of the padded input it sees."""
    n, _, _, c = xp.shape
    for i in range(window):
        for j in range(window):
            yield i, j, jax.lax.slice(xp, (0, i, j, 0),
                                      (n, i + (out_h - 1) * strides + 1,
                                       j + (out_w - 1) * strides + 1, c),
                                      (1, strides, strides, 1))


def _xla_max_pool_forward(x, window, strides, padding):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, strides, strides, 1),
                                 [(0, 0), (padding, padding), (padding, padding), (0, 0)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _xla_max_pool(x, window, strides, padding):
    return _xla_max_pool_forward(x, window, strides, padding)


def _xla_max_pool_fwd(x, window, strides, padding):
    y = _xla_max_pool_forward(x, window, strides, padding)
    return y, (x, y)


def _xla_max_pool_bwd(window, strides, padding, residuals, g):
    x, y = residuals
    n, h, w, c = x.shape
    xp = jnp.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)],
                 constant_values=-jnp.inf)
    out_h, out_w = y.shape[1], y.shape[2]
    # The input, padded up to multiples of the stride, split by the phase of its position:
    # input row r = strides * R + a. Window offset i sends output row o to r = strides * o
    # + i - padding, i.e. to phase a = (i - padding) % strides at R = o + (i - padding) //
    # strides: every offset's share is a shifted copy of an output-sized array.
    rows, cols = -(-h // strides), -(-w // strides)
    phases = {}
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), g.dtype)
    for i, j, view in _window_views(xp, window, strides, out_h, out_w):
        hit = (view == y) & ~taken
        taken = taken | hit
        (di, a), (dj, b) = divmod(i - padding, strides), divmod(j - padding, strides)
        share = jax.lax.pad(jnp.where(hit, g, zero), zero, [
            (0, 0, 0), (di, rows - out_h - di, 0), (dj, cols - out_w - dj, 0), (0, 0, 0)])
        phases[a, b] = share if (a, b) not in phases else phases[a, b] + share
    empty = jnp.zeros((n, rows, cols, c), g.dtype)
    grid = jnp.stack([jnp.stack([phases.get((a, b), empty) for b in range(strides)], axis=3)
                      for a in range(strides)], axis=2)  # [N, rows, a, cols, b, C]
    dx = grid.reshape(n, rows * strides, cols * strides, c)
    return (dx[:, :h, :w, :],)


_xla_max_pool.defvjp(_xla_max_pool_fwd, _xla_max_pool_bwd)


def _pool_shape(x_shape, window, strides, padding):
    n, h, w, c = x_shape
    return (n, window_output_size(h, window, strides, padding),
            window_output_size(w, window, strides, padding), c)


def max_pool(x: jax.Array, *, window: int, strides: int, padding: int,
             compute: ComputePolicy = ComputePolicy()) -> jax.Array:
    """Max pooling of NHWC x over window x window, symmetric padding (padded positions
    never win); the gradient goes to the first maximum of each window."""
    if not 0 <= padding < window:
        raise ValueError(f"max_pool padding must be in [0, window), got {padding} for "
                         f"window {window}")
    if compute.resolve() == "onednn":
        return train_onednn.max_pool(x.astype(jnp.float32),
                                     _pool_shape(x.shape, window, strides, padding), window,
                                     strides, padding)
    return _xla_max_pool(x, window, strides, padding)
