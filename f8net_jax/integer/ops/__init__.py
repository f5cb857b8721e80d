"""The op kinds of the integer program, one class each (base.py says what a kind holds).

Adding an op kind: one class in a module here, derived from ``OpKind`` and decorated with
``@register`` (imported below); a backend kernel only where a backend accelerates it.
"""

from f8net_jax.integer.ops.base import (REGISTRY, Checker, OpKind, event_kinds, kind_of,
                                        register, unregister)
# Registration order is the order validate() lists the kinds in.
from f8net_jax.integer.ops import image, layers, requantize, elementwise, pools  # noqa: F401, E402

__all__ = ["REGISTRY", "Checker", "OpKind", "event_kinds", "kind_of", "register",
           "unregister"]
