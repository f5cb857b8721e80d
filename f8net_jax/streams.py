"""What runs between F8Net's quantized layers: the scale plan that hands each layer its
alpha and its consumer's scale, and the functions of a stream between two layers (relu,
residual_add, max_pool, global_average_pool), each an op of the integer program.

Scale plan. A producer needs its consumer's scale s = 2^fl * |alpha| / 255 before the
consumer runs. Every layer that reads a stream (a *reader*: a conv, a block, the
classifier; layers.Reader) exposes ``owns_alpha``, ``own_alpha()`` and
``input_scale(alpha)``, and ``scale_plan(readers)`` walks them in order: a reader that owns
an alpha starts a chain, the others read the chain of the reader before them. Models
compute the plan first and pass each reader its alpha and its consumer's scale.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from f8net_jax import fixed_point as fp
from f8net_jax import folding, ops, recording
from f8net_jax.quant_config import QuantConfig


def scale_plan(readers: Sequence[Any], alpha=None):
    """Alphas and input scales of a sequence of readers that each consume the previous one's
    output. A reader that owns an alpha starts a chain; the others use the alpha of the
    chain they read (``alpha`` for the first). Returns (alphas, scales)."""
    alphas, scales = [], []
    for reader in readers:
        alpha = reader.own_alpha() if reader.owns_alpha else alpha
        alphas.append(alpha)
        scales.append(reader.input_scale(alpha))
    return alphas, scales


def run_readers(readers: Sequence[Any], x, *, alpha, out_scale, train: bool):
    """Runs readers in sequence, each delivering its output in the next one's units and the
    last in ``out_scale``."""
    alphas, scales = scale_plan(readers, alpha)
    for i, reader in enumerate(readers):
        next_scale = scales[i + 1] if i + 1 < len(readers) else out_scale
        x = reader(x, alpha=alphas[i], out_scale=next_scale, train=train)
    return x


def relu(x):
    """ReLU of a stream between layers (an op of the integer program)."""
    y = nn.relu(x)
    recording.emit("relu", [x], y)
    return y


def residual_add(a, b, *, relu: bool = False, name: Optional[str] = None):
    """a + b (then ReLU with ``relu``): the sum of two streams in the same units. In the
    integer program the operand in the coarser format is shifted left to the finer one
    first, so the sum is exact. ``name`` (the module whose output it is) names the op."""
    y = a + b
    if relu:
        y = nn.relu(y)
    recording.emit("add", [a, b], y, name=name, relu=relu)
    return y


def max_pool(x, window: int = 3, strides: int = 2, padding: int = 1,
             compute: ops.ComputePolicy = ops.ComputePolicy()):
    """Max pooling with symmetric padding (padded values never win); its gradient goes to
    the first maximum of each window (f8net_jax.ops.max_pool)."""
    y = ops.max_pool(x, window=window, strides=strides, padding=padding, compute=compute)
    recording.emit("max_pool", [x], y, window=window, strides=strides, padding=padding)
    return y


def global_average_pool(x, quant: QuantConfig):
    """Global average pool. Returns (pooled, input_factor for the consumer).

    Float: the mean. Fixed point: the sum over the H*W window shifted right by
    n = round(log2(H*W)) bits, in simulation and integer inference alike; the leftover
    factor 2^n / (H*W) is returned for the consumer (the classifier), which applies it in
    its output scale, so the network still computes the mean (METHOD.md 8.1: one pooling
    for all paths; unlike the official fusion, the skip path is not left out).
    """
    if not quant.fixed:
        return jnp.mean(x, axis=(1, 2)), 1.0
    window = x.shape[1] * x.shape[2]
    shift = folding.pool_shift(window)
    pooled = jnp.sum(x, axis=(1, 2)) * fp.pow2(-shift, x.dtype)
    recording.emit("avg_pool", [x], pooled, window=window)
    return pooled, (2.0 ** shift) / window
