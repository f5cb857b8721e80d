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

import functools
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


def has_alpha(kind: str, owns_alpha: bool, quant: QuantConfig) -> bool:
    """Whether a layer's input quantizer holds an alpha of its own (else it clips at its
    chain's)."""
    return (owns_alpha or not quant.share_alpha) and quant.clipping and kind != "image"


def _activation_scale(alpha, fraclen, *, signed: bool, quant: QuantConfig):
    if alpha is None or not quant.clipping:
        return jnp.float32(1.0)
    return folding.activation_scale(alpha, fraclen, signed=signed, bits=quant.bits)


def input_scale(kind: str, alpha, running, quant: QuantConfig) -> jax.Array:
    """The scale s in which a producer delivers the input of a layer of input ``kind`` that
    clips at ``alpha`` (already resolved) and whose running format is ``running`` (the
    'quant_stats' value before this step's update)."""
    if not quant.fixed or kind == "image":
        return jnp.float32(1.0)
    fraclen = folding.running_fraclen(running, signed=kind == "signed", bits=quant.bits)
    return _activation_scale(alpha, fraclen, signed=kind == "signed", quant=quant)


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
        self.has_alpha = has_alpha(self.kind, self.owns_alpha, q)
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
        return _activation_scale(alpha, fraclen, signed=self.signed, quant=self.quant)

    def eval_fraclen(self) -> jax.Array:
        """The input format of eval and of every scale: clip(round(buf))."""
        return folding.running_fraclen(self.fraclen.value, signed=self.signed,
                                       bits=self.quant.bits)

    def input_scale(self, alpha) -> jax.Array:
        """The scale in which a producer must deliver this layer's input (from the running
        format before this step's update)."""
        running = self.fraclen.value if self.quant.fixed and self.kind != "image" else None
        return input_scale(self.kind, self.resolve(alpha), running, self.quant)

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


def batch_norm_statistics(y, running, *, train: bool, axis_name, momentum: float):
    """(mean, var, new running (mean, var) or None) of BatchNorm over y: the batch's (biased
    variance) in training, whose running update uses the unbiased variance as PyTorch;
    ``running`` (mean, var) in eval."""
    if not train:
        return running[0], running[1], None
    mean = _mean_over_batch(y, axis_name)
    var = _mean_over_batch(jnp.square(y - mean), axis_name)
    devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    n = y.shape[0] * y.shape[1] * y.shape[2] * devices
    unbiased = var * (n / max(n - 1, 1))
    new = ((1 - momentum) * running[0] + momentum * jax.lax.stop_gradient(mean),
           (1 - momentum) * running[1] + momentum * jax.lax.stop_gradient(unbiased))
    return mean, var, new


def conv_bn(module: nn.Module, x, *, quantizer: "InputQuantizer", kernel, gamma, beta, running,
            quant: QuantConfig, strides: int, padding: int, groups: int, alpha, out_scale,
            train: bool, momentum: float, eps: float):
    """The computation of a quantized conv + BatchNorm (see QuantConvBN), shared by our
    layer and by ``f8net_jax.quantize``: ``module`` is the one whose path names the layer
    (its formats are sown there, its conv event names it). Returns (y, the new running
    BatchNorm statistics or None)."""
    q = quant
    alpha = quantizer.resolve(alpha)
    x_q, in_fraclen, in_scale = quantizer(x, alpha=alpha, train=train)
    conv = lambda inputs, w, exact=False: ops.conv2d(
        inputs, w, strides=strides, padding=padding, groups=groups, exact=exact,
        compute=q.compute)
    stats = functools.partial(batch_norm_statistics, running=running, train=train,
                              axis_name=q.batch_axis_name, momentum=momentum)
    if not q.fixed:
        y = conv(x_q, kernel)
        mean, var, new = stats(y)
        return (y - mean) * (gamma / jnp.sqrt(var + eps)) + beta, new
    if train:
        mean, var, new = stats(conv(in_scale * x_q, kernel))
    else:
        (mean, var), new = running, None
    w_f, b_f = folding.fold_conv_bn(kernel, gamma, beta, mean, var, eps=eps,
                                    in_scale=in_scale, out_scale=out_scale)
    axis = -1 if q.granularity == "channel" else None
    w_fraclen = folding.choose_fraclen(w_f, q.format_rule, signed=True, bits=q.bits, axis=axis,
                                       wide=q.wide_fraclen)
    w_q = fp.quantize(w_f, w_fraclen, signed=True, bits=q.bits, axis=axis, wide=q.wide_fraclen)
    if not train:
        b_f = folding.round_bias(b_f, in_fraclen + w_fraclen)
        module.sow("folded", "bias", b_f)  # eval: on the accumulator's grid
    _sow_formats(module, in_fraclen, w_fraclen, alpha)
    module.sow("folded", "weight", w_f)
    # Exact: products of two 8-bit grids, sums below 2^24 in integer units.
    y = conv(x_q, w_q, exact=True) + b_f
    path = recording.module_path(module)
    recording.emit("conv", [x_q], y, reader=path, layer=path, strides=strides,
                   padding=padding, groups=groups)
    return y, new


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
    Float: conv, then BatchNorm, in one pass and real units. The computation is
    ``conv_bn``; this module holds its variables.

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

    def __call__(self, x, *, alpha=None, out_scale=1.0, train: bool = False):
        q = self.quant
        y, new = conv_bn(self, x, quantizer=self.input, kernel=self.kernel, gamma=self.scale,
                         beta=self.bias, running=(self.mean.value, self.var.value), quant=q,
                         strides=self.strides, padding=self.kernel_size // 2,
                         groups=self.features if self.depthwise else 1, alpha=alpha,
                         out_scale=out_scale, train=train, momentum=q.bn_momentum,
                         eps=q.bn_eps)
        if new is not None and not self.is_initializing():
            self.mean.value, self.var.value = new
        return y


def dense(module: nn.Module, x, *, quantizer: "InputQuantizer", kernel, bias,
          quant: QuantConfig, alpha, input_factor, train: bool):
    """The computation of the classifier (see QuantDense), shared by our layer and by
    ``f8net_jax.quantize``; ``module`` names the layer."""
    q = quant
    features = kernel.shape[-1]
    rescale = lambda w: (folding.classifier_weight_scale(w, features) if q.rescale_classifier
                         else jnp.float32(1.0))
    alpha = quantizer.resolve(alpha)
    x_q, in_fraclen, in_scale = quantizer(x, alpha=alpha, train=train)
    if not q.fixed:
        return ops.matmul(input_factor * x_q, rescale(kernel) * kernel,
                          compute=q.compute) + bias
    w_fraclen = folding.choose_fraclen(kernel, q.format_rule, signed=True, bits=q.bits,
                                       wide=q.wide_fraclen)
    w_q = fp.quantize(kernel, w_fraclen, signed=True, bits=q.bits, wide=q.wide_fraclen)
    ws = rescale(w_q)
    _sow_formats(module, in_fraclen, w_fraclen, alpha)
    module.sow("folded", "weight", kernel)
    scale = in_scale * input_factor * ws  # one constant: logits = scale * (Q(x) @ Q(w))
    product = ops.matmul(x_q, w_q, exact=True, compute=q.compute)
    if train:
        return scale * product + bias
    bias = folding.round_bias(bias / scale, in_fraclen + w_fraclen)
    module.sow("formats", "logit_scale", scale)  # eval logits * this = train units
    module.sow("folded", "bias", bias)
    y = product + bias
    path = recording.module_path(module)
    recording.emit("dense", [x_q], y, reader=path, layer=path)
    return y


class QuantDense(Reader, nn.Module):
    """The classifier, the last consumer (METHOD.md 4).

    Fixed point, training: y = s * ws * (Q(x) @ Q(w)) + b, ws the constant rescaling of
    ``folding.classifier_weight_scale``; eval (and integer inference):
    Q(x) @ Q(w) + round(b / (s * ws)), logits scaled by the positive constant 1 / (s * ws).
    ``input_factor`` f is a positive constant the input is to be multiplied by (the integer
    average pool's leftover factor 2^n / (H*W), see ``streams.global_average_pool``); it
    joins the constant s * ws, so the quantized weight and its format do not see it.
    Formats per layer only. The computation is ``dense``.
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

    def __call__(self, x, *, alpha=None, input_factor=1.0, train: bool = False):
        return dense(self, x, quantizer=self.input, kernel=self.kernel, bias=self.bias,
                     quant=self.quant, alpha=alpha, input_factor=input_factor, train=train)


def count_params(params) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
