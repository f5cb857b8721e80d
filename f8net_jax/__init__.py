"""f8net_jax: F8Net (fixed-point 8-bit only multiplication) in JAX/Flax."""

from f8net_jax import fixed_point

__version__ = "0.1.0"
__all__ = ["fixed_point"]
