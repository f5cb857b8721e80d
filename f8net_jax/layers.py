"""F8Net's quantized layers as Flax linen modules (docs/METHOD.md, sections 3 to 5): the
input quantizer, conv + BatchNorm and the classifier. What runs between them (the scale
plan, relu, residual_add, the pools) is f8net_jax/streams.py.

One definition serves full precision and fixed point; ``QuantConfig.mode`` picks.

Units. In fixed point every activation travels in the *stored units* of the layer that
reads it: a layer whose input has scale s receives x = a / s (a: the real activation) and
produces its output already divided by its consumer's scale. The consumer's quantizer
Q(x; fl) then performs ReLU, PACT's clip at alpha and the rounding at once. In float mode
activations are real values and the consumer applies clip(., 0, alpha) (or ReLU).

State. 'params': kernels, BatchNorm scale/bias, alpha (one per chain), classifier bias;
'batch_stats': BatchNorm running mean/var; 'quant_stats': each layer's running input
fraclen. Weight formats are recomputed from the folded weight at every call; input formats
come from 'quant_stats'. Nothing derived is stored.

Where we choose differently from the official code, or where it has no single answer:
* granularity 'channel' gives per-output-channel *weight* formats; input formats stay per
  layer, since integer accumulation over input channels needs one input format;
* BatchNorm's running variance is updated with the unbiased batch variance, as in PyTorch;
* the classifier rejects 'channel': its logits must share one integer format;
* ``consistent_clip`` (off by default) is the consistent training variant of METHOD.md 8.6;
* ``share_alpha=False`` (an ablation) gives every reader its own alpha, also those that read
  a residual stream; the operands of an add then differ by a learned, non-power-of-two
  factor, which simulation and integer inference both keep (they add the stored values, as
  the official code does at the classifier, METHOD.md 8.7), so the integer program stays
  exact;
* ``wide_fraclen`` (beyond the paper) lets weight formats take fraclens past the word
  length where the statistic asks for them (still 8-bit codes, see fixed_point). Input
  formats keep the word length: under PACT a layer's input arrives in its own stored
  units (x = a / s, s proportional to 2^fl), so its codes do not depend on its fraclen,
  and the std rule, which then sees a std that halves with each step up, drives the
  running fraclen to whatever cap it has (8 here, 16 when widened: measured in the
  ablations, where the climb from 6 to 16 during fine-tuning cost accuracy).
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from f8net_jax import ops, recording
from f8net_jax import fixed_point as fp
from f8net_jax import folding
from f8net_jax.quant_config import GRANULARITIES, MODES, QuantConfig, _choice  # noqa: F401

INPUT_KINDS = ("unsigned", "signed", "image")


# --------------------------------------------------------------------------------------
# The input side of a quantized layer: alpha, running format, quantization.


class InputQuantizer(nn.Module):
    """The input of one quantized layer: its running format ('quant_stats'), the PACT
    clipping level alpha ('params', only in the layer that starts a chain) and the scale.

    ``kind``: 'unsigned' (after a ReLU), 'signed' (a linear stream, a normalized image) or
    'image' (pixels p in [0, 255] stored as p at fl 8, scale 1, no clipping).
    """

    kind: str
    owns_alpha: bool
    quant: QuantConfig

    def setup(self):
        _choice("input kind", self.kind, INPUT_KINDS)
        q = self.quant
        self.has_alpha = ((self.owns_alpha or not q.share_alpha) and q.clipping
                          and self.kind != "image")
        if self.has_alpha:
            self.alpha = self.param("alpha", nn.initializers.constant(q.alpha_init), (),
                                    jnp.float32)
        if q.fixed and self.kind != "image":
            self.fraclen = self.variable("quant_stats", "fraclen",
                                         lambda: jnp.asarray(q.input_format[1], jnp.float32))

    @property
    def signed(self) -> bool:
        return self.kind == "signed"

    def own_alpha(self) -> Optional[jax.Array]:
        return self.alpha if self.has_alpha else None

    def resolve(self, alpha):
        """The alpha this layer clips at: its own if it has one, else its chain's."""
        return self.alpha if self.has_alpha else alpha

    def _scale(self, alpha, fraclen):
        if alpha is None or not self.quant.clipping:
            return jnp.float32(1.0)
        return folding.activation_scale(alpha, fraclen, signed=self.signed, bits=self.quant.bits)

    def eval_fraclen(self) -> jax.Array:
        """The input format of eval and of every scale: clip(round(buf))."""
        return folding.running_fraclen(self.fraclen.value, signed=self.signed,
                                       bits=self.quant.bits)

    def input_scale(self, alpha) -> jax.Array:
        """The scale in which a producer must deliver this layer's input (from the running
        format before this step's update)."""
        if not self.quant.fixed or self.kind == "image":
            return jnp.float32(1.0)
        return self._scale(self.resolve(alpha), self.eval_fraclen())

    def _record(self, x, x_q) -> None:
        layer = recording.module_path(self, up=1)  # the layer it belongs to
        recording.emit("input", [x], x_q, reader=layer, layer=layer, signed=self.signed)

    def __call__(self, x, *, alpha, train: bool):
        """Returns (x_q, fraclen, s): the quantized input in stored units, its format and the
        scale s_self for folding. Float mode: (the clipped real activation, None, 1)."""
        q = self.quant
        alpha = self.resolve(alpha)
        if not q.fixed:
            if self.kind == "image":
                return x, None, jnp.float32(1.0)
            if alpha is None:
                return (x if self.signed else nn.relu(x)), None, jnp.float32(1.0)
            return (fp.pact_clip(x, jnp.abs(alpha), signed=self.signed), None,
                    jnp.float32(1.0))
        if self.kind == "image":
            # Pixels p arrive as p / 256, already on the grid; the gradient passes to every
            # pixel (0 and 255 included), as in the official code, whose stem reads the
            # image unquantized.
            fraclen = jnp.float32(fp.max_fraclen(signed=False, bits=q.bits))
            x_q = jax.lax.stop_gradient(fp.quantize(x, fraclen, signed=False, bits=q.bits))
            x_q = x_q + (x - jax.lax.stop_gradient(x))
            self._record(x, x_q)
            return x_q, fraclen, jnp.float32(1.0)
        old_fraclen = self.eval_fraclen()
        if not train:
            x_q = fp.quantize(x, old_fraclen, signed=self.signed, bits=q.bits)
            self._record(x, x_q)
            return x_q, old_fraclen, self._scale(alpha, old_fraclen)
        batch_fraclen = folding.choose_fraclen(x, q.format_rule, signed=self.signed, bits=q.bits,
                                               axis_name=q.batch_axis_name)
        new_running = folding.update_running_fraclen(self.fraclen.value, batch_fraclen,
                                                     q.format_momentum)
        if not self.is_initializing():
            self.fraclen.value = new_running
        if q.consistent_clip:
            # Quantize with the format the producer's scale assumed: the clip is exactly alpha.
            fraclen, scale = old_fraclen, self._scale(alpha, old_fraclen)
        else:
            # The official training step: batch format for the quantizer, updated running
            # format for the scale (effective clip alpha * 2^(round(buf) - fl_batch)).
            fraclen = batch_fraclen
            scale = self._scale(alpha, folding.running_fraclen(
                new_running, signed=self.signed, bits=q.bits))
        return fp.quantize(x, fraclen, signed=self.signed, bits=q.bits), fraclen, scale


def _sow_formats(module: nn.Module, in_fraclen, w_fraclen, alpha) -> None:
    """Reports a layer's formats in the 'formats' collection when the caller asks for it
    (apply(..., mutable=['formats'])); nothing is stored otherwise."""
    module.sow("formats", "input_fraclen", in_fraclen)
    module.sow("formats", "weight_fraclen", w_fraclen)
    if alpha is not None:
        module.sow("formats", "alpha", jnp.abs(alpha))


# --------------------------------------------------------------------------------------
# Quantized conv + BatchNorm.


def _mean_over_batch(y, axis_name):
    """Per-channel mean over N, H, W, and over the devices of ``axis_name`` (equal shards)."""
    mean = jnp.mean(y, axis=(0, 1, 2))
    return mean if axis_name is None else jax.lax.pmean(mean, axis_name)


class Reader:
    """The reader interface (see streams.scale_plan) of a module whose ``input`` is the
    InputQuantizer of the stream it reads."""

    def own_alpha(self):
        return self.input.own_alpha()

    def input_scale(self, alpha):
        return self.input.input_scale(alpha)


class QuantConvBN(Reader, nn.Module):
    """Conv (no bias) + BatchNorm whose output is in its consumer's units (METHOD.md 4).

    Fixed point, training: x_q = Q(x; fl) with the batch's format; a first pass
    conv(s * x_q, W) gives the batch statistics (and updates the running ones); the second
    pass computes conv(x_q, Q(W_f; fl_w)) + b_f with the folded W_f, b_f of
    ``folding.fold_conv_bn``. Gradients flow through both passes. Eval: running statistics,
    one pass, and the bias rounded to the accumulator format fl_in + fl_w (METHOD.md 8.3).
    Float: conv, then BatchNorm, in one pass and real units.

    Padding is symmetric, kernel_size // 2 (as in PyTorch); ``depthwise`` convs have one
    filter per channel (features == in_features).
    """

    in_features: int
    features: int
    kernel_size: int
    quant: QuantConfig
    strides: int = 1
    depthwise: bool = False
    input_kind: str = "unsigned"
    owns_alpha: bool = True

    def setup(self):
        if self.depthwise and self.in_features != self.features:
            raise ValueError(f"a depthwise conv needs features == in_features, got "
                             f"{self.features} and {self.in_features}")
        k, fan_in = self.kernel_size, 1 if self.depthwise else self.in_features
        self.kernel = self.param(
            "kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (k, k, fan_in, self.features), jnp.float32)
        self.scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        self.mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), jnp.float32)
        self.var = self.variable("batch_stats", "var", jnp.ones, (self.features,), jnp.float32)
        self.input = InputQuantizer(kind=self.input_kind, owns_alpha=self.owns_alpha,
                                    quant=self.quant)

    def _conv(self, x, kernel, exact: bool = False):
        return ops.conv2d(x, kernel, strides=self.strides, padding=self.kernel_size // 2,
                           groups=self.features if self.depthwise else 1, exact=exact,
                           compute=self.quant.compute)

    def _batch_norm_statistics(self, y, train: bool):
        if not train:
            return self.mean.value, self.var.value
        axis_name = self.quant.batch_axis_name
        mean = _mean_over_batch(y, axis_name)
        var = _mean_over_batch(jnp.square(y - mean), axis_name)
        if not self.is_initializing():
            devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
            n = y.shape[0] * y.shape[1] * y.shape[2] * devices
            m = self.quant.bn_momentum
            unbiased = var * (n / max(n - 1, 1))
            self.mean.value = (1 - m) * self.mean.value + m * jax.lax.stop_gradient(mean)
            self.var.value = (1 - m) * self.var.value + m * jax.lax.stop_gradient(unbiased)
        return mean, var

    def __call__(self, x, *, alpha=None, out_scale=1.0, train: bool = False):
        q = self.quant
        alpha = self.input.resolve(alpha)
        x_q, in_fraclen, in_scale = self.input(x, alpha=alpha, train=train)
        if not q.fixed:
            y = self._conv(x_q, self.kernel)
            mean, var = self._batch_norm_statistics(y, train)
            return (y - mean) * (self.scale / jnp.sqrt(var + q.bn_eps)) + self.bias
        if train:
            mean, var = self._batch_norm_statistics(self._conv(in_scale * x_q, self.kernel), train)
        else:
            mean, var = self.mean.value, self.var.value
        w_f, b_f = folding.fold_conv_bn(self.kernel, self.scale, self.bias, mean, var,
                                        eps=q.bn_eps, in_scale=in_scale, out_scale=out_scale)
        axis = -1 if q.granularity == "channel" else None
        w_fraclen = folding.choose_fraclen(w_f, q.format_rule, signed=True, bits=q.bits, axis=axis,
                                           wide=q.wide_fraclen)
        w_q = fp.quantize(w_f, w_fraclen, signed=True, bits=q.bits, axis=axis,
                          wide=q.wide_fraclen)
        if not train:
            b_f = folding.round_bias(b_f, in_fraclen + w_fraclen)
            self.sow("folded", "bias", b_f)  # eval: on the accumulator's grid
        _sow_formats(self, in_fraclen, w_fraclen, alpha)
        self.sow("folded", "weight", w_f)
        # Exact: products of two 8-bit grids, sums below 2^24 in integer units.
        y = self._conv(x_q, w_q, exact=True) + b_f
        path = recording.module_path(self)
        recording.emit("conv", [x_q], y, reader=path, layer=path, strides=self.strides,
                       padding=self.kernel_size // 2, groups=self.features if self.depthwise else 1)
        return y


class QuantDense(Reader, nn.Module):
    """The classifier, the last consumer (METHOD.md 4).

    Fixed point, training: y = s * ws * (Q(x) @ Q(w)) + b, ws the constant rescaling of
    ``folding.classifier_weight_scale``; eval (and integer inference):
    Q(x) @ Q(w) + round(b / (s * ws)), logits scaled by the positive constant 1 / (s * ws).
    ``input_factor`` f is a positive constant the input is to be multiplied by (the integer
    average pool's leftover factor 2^n / (H*W), see ``streams.global_average_pool``); it
    joins the constant s * ws, so the quantized weight and its format do not see it.
    Formats per layer only.
    """

    in_features: int
    features: int
    quant: QuantConfig
    owns_alpha: bool = True
    input_kind: str = "unsigned"
    granularity: Optional[str] = None  # defaults to per layer; 'channel' is rejected

    def setup(self):
        if self.granularity not in (None, "layer"):
            raise ValueError(
                f"granularity {self.granularity!r} is not available for the classifier "
                f"(QuantDense): allowed ['layer'], since its logits share one integer format")
        self.kernel = self.param("kernel", nn.initializers.normal(0.01),
                                 (self.in_features, self.features), jnp.float32)
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        self.input = InputQuantizer(kind=self.input_kind, owns_alpha=self.owns_alpha,
                                    quant=self.quant)

    def _rescale(self, kernel):
        if not self.quant.rescale_classifier:
            return jnp.float32(1.0)
        return folding.classifier_weight_scale(kernel, self.features)

    def __call__(self, x, *, alpha=None, input_factor=1.0, train: bool = False):
        q = self.quant
        alpha = self.input.resolve(alpha)
        x_q, in_fraclen, in_scale = self.input(x, alpha=alpha, train=train)
        if not q.fixed:
            return ops.matmul(input_factor * x_q, self._rescale(self.kernel) * self.kernel,
                               compute=q.compute) + self.bias
        w_fraclen = folding.choose_fraclen(self.kernel, q.format_rule, signed=True, bits=q.bits,
                                           wide=q.wide_fraclen)
        w_q = fp.quantize(self.kernel, w_fraclen, signed=True, bits=q.bits, wide=q.wide_fraclen)
        ws = self._rescale(w_q)
        _sow_formats(self, in_fraclen, w_fraclen, alpha)
        self.sow("folded", "weight", self.kernel)
        scale = in_scale * input_factor * ws  # one constant: logits = scale * (Q(x) @ Q(w))
        product = ops.matmul(x_q, w_q, exact=True, compute=q.compute)
        if train:
            return scale * product + self.bias
        bias = folding.round_bias(self.bias / scale, in_fraclen + w_fraclen)
        self.sow("formats", "logit_scale", scale)  # eval logits * this = train units
        self.sow("folded", "bias", bias)
        y = product + bias
        path = recording.module_path(self)
        recording.emit("dense", [x_q], y, reader=path, layer=path)
        return y


def count_params(params) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
