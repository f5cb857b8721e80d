"""What every model shares: image input and its checks."""

from __future__ import annotations

import jax.numpy as jnp

from f8net_jax.layers import QuantConfig


def stem_input_kind(quant: QuantConfig) -> str:
    """Pixels p in [0, 255] enter as p at fl 8 ('image'); a normalized image is signed."""
    return "signed" if quant.normalized_input else "image"


def prepare_image(x, *, total_stride: int, model: str):
    """Checks an NHWC image batch and returns it as float32.

    uint8 pixels p become p / 256 (the value of p stored at fl 8, exact); float input is
    taken as the value the stem reads (pixels / 256, or a normalized image). The spatial
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
        return x.astype(jnp.float32) / 256.0
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{model}: images must be uint8 pixels or float, got dtype {x.dtype}")
    return x.astype(jnp.float32)
