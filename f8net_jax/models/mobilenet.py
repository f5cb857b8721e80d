"""MobileNet V1 (standard 1.0 layout, 1000-way classifier: 4,231,976 parameters in float)
and MobileNet V2 (torchvision layout: 3,504,872), in float or fixed point.

MobileNet V1 has no residual streams: every layer owns its clipping level; there is no
explicit ReLU between a depthwise layer and its pointwise layer. In MobileNet V2
the output of an inverted-residual block is linear (no ReLU), so the first conv of every
block after the first reads a signed input; identity blocks pass their stream on and the
first conv of each block, like ResNet's, reads the chain of the stream it consumes
(METHOD.md 5). ReLU6 of the float originals is PACT's learned clip here (float mode with
clipping off uses ReLU).
"""

from __future__ import annotations

import flax.linen as nn

from f8net_jax import recording
from f8net_jax.layers import QuantConfig, QuantConvBN
from f8net_jax.streams import global_average_pool, relu, residual_add, run_readers, scale_plan
from f8net_jax.models.common import Block, make_classifier, prepare_image, stem_input_kind


def make_divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor``, never below 90% of ``value``
    (torchvision's rule for width multipliers)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class MobileNetV1(nn.Module):
    """Stem 3x3/2 (32 channels), 13 depthwise-separable layers, global pool, classifier."""

    num_classes: int
    quant: QuantConfig
    width_multiplier: float = 1.0

    # (output channels, stride) of each depthwise-separable layer.
    SETTING = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
               (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
    total_stride = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        q = self.quant
        x = prepare_image(x, total_stride=self.total_stride, model=type(self).__name__,
                          normalize=self.quant.normalized_input)
        width = lambda c: make_divisible(c * self.width_multiplier)
        channels = width(32)
        readers = [QuantConvBN(x.shape[-1], channels, 3, q, strides=2,
                               input_kind=stem_input_kind(q), name="stem")]
        for i, (out, stride) in enumerate(self.SETTING):
            readers.append(QuantConvBN(channels, channels, 3, q, strides=stride, depthwise=True,
                                       name=f"layer{i + 1}_depthwise"))
            readers.append(QuantConvBN(channels, width(out), 1, q, name=f"layer{i + 1}_pointwise"))
            channels = width(out)
        classifier = make_classifier(channels, self.num_classes, q, starts_chain=True)
        alphas, scales = scale_plan([*readers, classifier])
        for i, layer in enumerate(readers):
            x = layer(x, alpha=alphas[i], out_scale=scales[i + 1], train=train)
            # ReLU after the stem and each pointwise layer; a depthwise output goes to the
            # pointwise layer as it is, whose unsigned input quantizer is the ReLU, so its
            # input statistic is taken before rectification (METHOD.md 5, as the official
            # code).
            if not layer.depthwise:
                x = relu(x)
        x, factor = global_average_pool(x, q)
        return classifier(x, alpha=alphas[-1], input_factor=factor, train=train)


class InvertedResidual(Block):
    """Expand 1x1 (if expand_ratio > 1), depthwise 3x3, linear project 1x1; plus the input
    when the shape is unchanged."""

    expand_ratio: int = 1
    signed_input: bool = False

    def setup(self):
        q, hidden = self.quant, int(round(self.in_features * self.expand_ratio))
        kind = "signed" if self.signed_input else "unsigned"
        layers = []
        if self.expand_ratio != 1:
            layers.append(QuantConvBN(self.in_features, hidden, 1, q, input_kind=kind,
                                      owns_alpha=self.owns_alpha))
        layers.append(QuantConvBN(hidden, hidden, 3, q, strides=self.strides, depthwise=True,
                                  input_kind=kind if self.expand_ratio == 1 else "unsigned",
                                  owns_alpha=self.owns_alpha if self.expand_ratio == 1 else True))
        layers.append(QuantConvBN(hidden, self.features, 1, q))
        self.layers = layers

    def first_layer(self):
        return self.layers[0]

    def __call__(self, x, *, alpha, out_scale, train: bool):
        # The hidden layers read unsigned inputs: their quantizers apply the ReLU (clip).
        y = run_readers(self.layers, x, alpha=alpha, out_scale=out_scale, train=train)
        if not self.identity:
            return y
        return residual_add(y, x, name=recording.module_path(self))


class MobileNetV2(nn.Module):
    """Stem 3x3/2, 17 inverted-residual blocks, 1x1 conv to 1280 channels, pool, classifier."""

    num_classes: int
    quant: QuantConfig
    width_multiplier: float = 1.0

    # expand ratio t, output channels c, repeats n, first stride s
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))
    total_stride = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        q, w = self.quant, self.width_multiplier
        x = prepare_image(x, total_stride=self.total_stride, model=type(self).__name__,
                          normalize=self.quant.normalized_input)
        channels = make_divisible(32 * w)
        stem = QuantConvBN(x.shape[-1], channels, 3, q, strides=2,
                           input_kind=stem_input_kind(q), name="stem")
        blocks, starts_chain = [], True
        for t, c, n, s in self.SETTING:
            for j in range(n):
                block = InvertedResidual(in_features=channels, features=make_divisible(c * w),
                                         strides=s if j == 0 else 1, expand_ratio=t,
                                         signed_input=bool(blocks), owns_alpha=starts_chain,
                                         quant=q, name=f"block{len(blocks) + 1}")
                starts_chain = not block.identity
                channels = make_divisible(c * w)
                blocks.append(block)
        last = make_divisible(1280 * max(1.0, w))
        tail = QuantConvBN(channels, last, 1, q, input_kind="signed", owns_alpha=starts_chain,
                           name="tail")
        classifier = make_classifier(last, self.num_classes, q, starts_chain=True)
        alphas, scales = scale_plan([stem, *blocks, tail, classifier])
        x = relu(stem(x, alpha=alphas[0], out_scale=scales[1], train=train))
        for i, block in enumerate(blocks):
            x = block(x, alpha=alphas[i + 1], out_scale=scales[i + 2], train=train)
        x = relu(tail(x, alpha=alphas[-2], out_scale=scales[-1], train=train))
        x, factor = global_average_pool(x, q)
        return classifier(x, alpha=alphas[-1], input_factor=factor, train=train)
