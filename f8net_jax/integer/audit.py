"""An audit of a jaxpr for integer-only, 8-bit-multiply-only arithmetic.

Walks every equation, nested jaxprs included (jit, custom rules, control flow), and lists:
* any float or complex value (inputs, constants, outputs of any equation);
* any multiplication (mul, square, integer_pow, reduce_prod, cumprod, conv_general_dilated,
  dot_general, ragged dots) with an operand wider than 8 bits;
* any division or remainder;
* any custom call other than the known integer kernels: ``KERNELS`` names each one with
  the operands it multiplies (which must be 8-bit) and the result dtypes it may have (the
  kernel's source is then what multiplies: kernels/conv_u8s8.cc multiplies uint8 by int8
  with vpdpbusd and adds int32; kernels/int8_onednn.cc asks oneDNN for 8-bit x int8
  products summed in int32 with no scale, zero point, bias or post-op, and its operand 1
  is the int8 weights packed as bytes).
"""

from __future__ import annotations

import numpy as np
from jax import core as jax_core

try:  # jax >= 0.4.30 keeps the internal classes here
    from jax.extend import core as _ext_core
    _JAXPR_TYPES = (_ext_core.Jaxpr, _ext_core.ClosedJaxpr)
except (ImportError, AttributeError):  # pragma: no cover
    _JAXPR_TYPES = (jax_core.Jaxpr, jax_core.ClosedJaxpr)

MULTIPLIES = ("mul", "square", "integer_pow", "reduce_prod", "cumprod", "conv_general_dilated",
              "dot_general", "ragged_dot", "ragged_dot_general")
DIVISIONS = ("div", "rem")
# custom-call target: (indices of the multiplied operands, allowed result dtypes)
KERNELS = {"f8net_conv_u8s8": ((0, 1), ("int32",)),
           "f8net_int8_conv": ((0, 1), ("int32",)),
           "f8net_int8_dense": ((0, 1), ("int32",))}


def _dtype(var):
    aval = getattr(var, "aval", None)
    return getattr(aval, "dtype", None)


def _is_float(dtype) -> bool:
    return dtype is not None and (np.issubdtype(dtype, np.floating)
                                  or np.issubdtype(dtype, np.complexfloating))


def _subjaxprs(value):
    if isinstance(value, _JAXPR_TYPES):
        yield value.jaxpr if hasattr(value, "consts") else value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _subjaxprs(v)


def audit(jaxpr) -> list:
    """The violations found in a (closed) jaxpr, as readable strings; [] if it is clean."""
    problems: list = []
    root = jaxpr.jaxpr if hasattr(jaxpr, "consts") else jaxpr

    def visit(j, where):
        for var in list(j.invars) + list(j.constvars):
            if _is_float(_dtype(var)):
                problems.append(f"{where}: float input {var} ({_dtype(var)})")
        for eqn in j.eqns:
            name = eqn.primitive.name
            for var in list(eqn.invars) + list(eqn.outvars):
                if _is_float(_dtype(var)):
                    problems.append(f"{where}: {name} uses float {_dtype(var)}")
                    break
            if name in MULTIPLIES:
                wide = [str(_dtype(v)) for v in eqn.invars
                        if _dtype(v) is not None and np.dtype(_dtype(v)).itemsize > 1]
                if wide:
                    problems.append(f"{where}: {name} multiplies operands wider than 8 bits "
                                    f"({', '.join(wide)})")
            if name == "ffi_call" or "custom_call" in name:
                target = eqn.params.get("target_name", eqn.params.get("call_target_name"))
                if target not in KERNELS:
                    problems.append(f"{where}: unknown custom call {target!r}")
                else:
                    multiplied, results = KERNELS[target]
                    wide = [str(_dtype(eqn.invars[i])) for i in multiplied
                            if np.dtype(_dtype(eqn.invars[i])).itemsize > 1]
                    if wide:
                        problems.append(f"{where}: {target} multiplies operands wider than "
                                        f"8 bits ({', '.join(wide)})")
                    odd = [str(_dtype(v)) for v in eqn.outvars if str(_dtype(v)) not in results]
                    if odd:
                        problems.append(f"{where}: {target} returns {', '.join(odd)}")
            if name in DIVISIONS:
                problems.append(f"{where}: {name} (division)")
            for param in eqn.params.values():
                for sub in _subjaxprs(param):
                    visit(sub, f"{where}/{name}")

    visit(root, "executor")
    return problems
