"""What every model shares: image input and its checks."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from f8net_jax import recording
from f8net_jax.layers import QuantConfig, QuantDense, Reader


def stem_input_kind(quant: QuantConfig) -> str:
    """Pixels p in [0, 255] enter as p at fl 8 ('image'); a normalized image is signed."""
    return "signed" if quant.normalized_input else "image"


def is_identity(strides: int, in_features: int, features: int) -> bool:
    """Whether a block's shortcut is the identity: same shape in and out. Its output then
    continues the input's clipping chain."""
    return strides == 1 and in_features == features


class Block(Reader, nn.Module):
    """A block that reads one stream and writes one (a residual block, an inverted
    residual). As a reader (see streams.scale_plan) it reads its input stream through its
    first layer's quantizer, ``owns_alpha`` telling whether that stream starts a chain."""

    in_features: int
    features: int           # output channels
    strides: int
    owns_alpha: bool
    quant: QuantConfig

    @property
    def identity(self) -> bool:
        """True if the shortcut is the identity (the output continues the input's chain)."""
        return is_identity(self.strides, self.in_features, self.features)

    @property
    def input(self):
        """The quantizer of the block's input (its first layer's)."""
        return self.first_layer().input


def make_classifier(in_features: int, num_classes: int, quant: QuantConfig, starts_chain: bool):
    """The classifier: owns its clipping level where its input starts a chain, or always
    unless ``share_classifier_alpha`` (METHOD.md 8.7)."""
    return QuantDense(in_features, num_classes, quant,
                      owns_alpha=starts_chain or not quant.share_classifier_alpha,
                      name="classifier")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def prepare_image(x, *, total_stride: int, model: str, normalize: bool = False):
    """Checks an NHWC image batch and returns it as float32.

    uint8 pixels p become p / 256 (the value of p stored at fl 8, exact), or, with
    ``normalize``, (p / 255 - mean) / std with ImageNet's channel statistics (their mean
    for other channel counts). Float input is taken as the value the stem reads. The spatial
    size must be a positive multiple of the model's total stride, so that every
    downsampling halves exactly and the global pool sees a whole window.
    """
    if x.ndim != 4:
        raise ValueError(f"{model}: images must be NHWC (4 dimensions), got shape {x.shape}")
    height, width = x.shape[1], x.shape[2]
    if height % total_stride or width % total_stride:
        raise ValueError(
            f"{model}: image size {height}x{width} is not allowed: height and width must be "
            f"positive multiples of {total_stride} (e.g. {8 * total_stride if total_stride >= 32 else 32})")
    if x.dtype == jnp.uint8:
        if not normalize:
            out = x.astype(jnp.float32) / 256.0
        else:
            out = normalize_pixels(x)
        # The integer program reads the pixels themselves (through a table if normalized).
        recording.emit("image", [], out, normalized=normalize, channels=int(x.shape[-1]))
        return out
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{model}: images must be uint8 pixels or float, got dtype {x.dtype}")
    return x.astype(jnp.float32)


def normalize_pixels(x):
    """(p / 255 - mean) / std of uint8 pixels p with ImageNet's channel statistics (their
    mean for other channel counts)."""
    three = x.shape[-1] == 3
    mean = jnp.asarray(IMAGENET_MEAN if three else sum(IMAGENET_MEAN) / 3, jnp.float32)
    std = jnp.asarray(IMAGENET_STD if three else sum(IMAGENET_STD) / 3, jnp.float32)
    return (x.astype(jnp.float32) / 255.0 - mean) / std
