"""f8net_jax: F8Net (fixed-point 8-bit only multiplication) in JAX/Flax."""

from f8net_jax import fixed_point

__version__ = "0.1.0"
__all__ = ["fixed_point", "quantize"]


def __getattr__(name):
    # f8net_jax.quantize(module, quant=...) loads Flax and the layers only when used.
    if name == "quantize":
        from f8net_jax.quantized import quantize
        return quantize
    raise AttributeError(f"module 'f8net_jax' has no attribute {name!r}")
