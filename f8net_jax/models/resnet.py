"""ResNet-18/34/50 (ImageNet, torchvision layout, stride on the 3x3 conv of a bottleneck)
and the CIFAR-style ResNet-20/56 (3x3 stem, three stages of 16/32/64 channels, 1x1
projection shortcuts where the shape changes), in float or fixed point.

Clipping levels (METHOD.md 5): all layers that read one residual stream share one alpha.
The first conv of each block and the projection shortcut read the block's input stream; an
identity block passes its stream on, so the next block reads the same chain; a projection
block starts a new chain, owned by the first conv of the next block. Every layer keeps its
own input format. (The official ResNet-50 gives the projection shortcut of its first block
an alpha of its own although it reads the stem's stream; here it shares it.)
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from f8net_jax import recording
from f8net_jax.layers import QuantConfig, QuantConvBN
from f8net_jax.streams import (global_average_pool, max_pool, relu, residual_add, run_readers,
                               scale_plan)
from f8net_jax.models.common import Block, make_classifier, prepare_image, stem_input_kind


class ResidualBlock(Block):
    """A basic block (two 3x3 convs) or a bottleneck (1x1, 3x3, 1x1 with 4x expansion);
    output relu(body(x) + shortcut(x))."""

    bottleneck: bool = False

    def setup(self):
        q = self.quant
        if self.bottleneck:
            mid = self.features // 4
            self.body = [
                QuantConvBN(self.in_features, mid, 1, q, owns_alpha=self.owns_alpha),
                QuantConvBN(mid, mid, 3, q, strides=self.strides),
                QuantConvBN(mid, self.features, 1, q),
            ]
        else:
            self.body = [
                QuantConvBN(self.in_features, self.features, 3, q, strides=self.strides,
                            owns_alpha=self.owns_alpha),
                QuantConvBN(self.features, self.features, 3, q),
            ]
        if not self.identity:
            # Reads the block's input with the chain's alpha and its own input format.
            self.shortcut = QuantConvBN(self.in_features, self.features, 1, q,
                                        strides=self.strides, owns_alpha=False)

    def first_layer(self):
        return self.body[0]

    def __call__(self, x, *, alpha, out_scale, train: bool):
        y = run_readers(self.body, x, alpha=alpha, out_scale=out_scale, train=train)
        skip = x if self.identity else self.shortcut(x, alpha=alpha, out_scale=out_scale,
                                                     train=train)
        return residual_add(y, skip, relu=True, name=recording.module_path(self))


class ResNet(nn.Module):
    """ResNet for ImageNet (``cifar_stem=False``: 7x7/2 stem and 3x3/2 max-pool, widths
    64..512) or CIFAR (3x3/1 stem, no max-pool, widths 16/32/64)."""

    stage_sizes: Sequence[int]
    num_classes: int
    quant: QuantConfig
    bottleneck: bool = False
    cifar_stem: bool = False

    def _layers(self, in_channels: int):
        q = self.quant
        widths = (16, 32, 64) if self.cifar_stem else (64, 128, 256, 512)
        expansion = 4 if self.bottleneck else 1
        stem = QuantConvBN(in_channels, widths[0], 3 if self.cifar_stem else 7, q,
                           strides=1 if self.cifar_stem else 2,
                           input_kind=stem_input_kind(q), name="stem")
        blocks, channels, starts_chain = [], widths[0], True
        for i, (size, width) in enumerate(zip(self.stage_sizes, widths)):
            for j in range(size):
                block = ResidualBlock(in_features=channels, features=width * expansion,
                                      strides=2 if i > 0 and j == 0 else 1,
                                      bottleneck=self.bottleneck, owns_alpha=starts_chain,
                                      quant=q, name=f"stage{i + 1}_block{j + 1}")
                starts_chain = not block.identity
                channels = width * expansion
                blocks.append(block)
        return stem, blocks, make_classifier(channels, self.num_classes, q, starts_chain)

    @property
    def total_stride(self) -> int:
        return 2 ** (len(self.stage_sizes) - 1) * (1 if self.cifar_stem else 4)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = prepare_image(x, total_stride=self.total_stride, model=type(self).__name__,
                          normalize=self.quant.normalized_input)
        stem, blocks, classifier = self._layers(x.shape[-1])
        alphas, scales = scale_plan([stem, *blocks, classifier])
        x = relu(stem(x, alpha=alphas[0], out_scale=scales[1], train=train))
        if not self.cifar_stem:
            x = max_pool(x, 3, 2, 1, compute=self.quant.compute)
        for i, block in enumerate(blocks):
            x = block(x, alpha=alphas[i + 1], out_scale=scales[i + 2], train=train)
        x, factor = global_average_pool(x, self.quant)
        return classifier(x, alpha=alphas[-1], input_factor=factor, train=train)
