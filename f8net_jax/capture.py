"""The graph of a plain Flax model, as ``f8net_jax.quantize`` needs it.

One abstract trace of the model's float forward (``jax.make_jaxpr`` of its
``init_with_output``, nothing computed) under ``flax.linen.intercept_methods``: every call
of a module is wrapped in a marker (a jitted identity named after the call), so that the
jaxpr shows which module calls read which values, and the values between them are the
model's own jax operations. ``capture`` reads them back as a small graph of ``Node``\\ s:
the image, the outputs of nn.Conv / nn.BatchNorm / nn.Dense calls, and the ops F8Net's
integer program has between its layers (relu, add, max pool, global average pool); any
other op that a layer's input depends on is a 'refused' node, reported by
``f8net_jax.plan`` with the module it sits in. Traced on uint8 pixels, the elementwise
arithmetic the model itself applies to them (its own normalization) is a chain of
'pixels' nodes: the integer program reads it as a per-channel table of the 256 values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

MARKER = "_f8net_call_"
LAYERS = {nn.Conv: "conv", nn.BatchNorm: "bn", nn.Dense: "dense"}
# Calls inlined into the graph (their inner jaxpr is read), by primitive name.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "closed_call": "call_jaxpr", "remat": "jaxpr",
          "checkpoint": "jaxpr"}
_TRANSPARENT = ("copy", "copy_p", "stop_gradient", "optimization_barrier")
# Elementwise arithmetic a model may apply to its uint8 pixels before its first conv.
_PIXEL_OPS = ("convert_element_type", "add", "sub", "mul", "div", "neg", "max", "min")


@dataclasses.dataclass(eq=False)
class Node:
    """A value of the forward: op 'image', 'pixels' (elementwise arithmetic on uint8 pixels,
    attrs['op'] names it), 'call' (attrs['call'] the Call), 'relu', 'add', 'max_pool',
    'avg_pool', 'sum' (a spatial sum not yet divided) or 'refused' (attrs['op'] names it);
    ``where``: the path of the module whose code computes it."""

    op: str
    inputs: tuple = ()
    attrs: dict = dataclasses.field(default_factory=dict)
    where: str = ""
    shape: tuple = ()


@dataclasses.dataclass(eq=False)
class Call:
    """One call of a Flax module: its path, type, the kind of layer ('conv', 'bn', 'dense',
    'container', or 'refused' for another module of flax.linen), the module itself (its
    attributes), the shapes in and out, and the node it reads."""

    index: int
    path: str
    kind: str
    module: Any
    in_shape: tuple
    out_shape: tuple
    train: Optional[bool] = None  # BatchNorm: whether it uses the batch's statistics
    input: Optional[Node] = None
    output: Optional[Node] = None

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


@dataclasses.dataclass
class Graph:
    calls: list
    output: Node
    image: Node
    container_outputs: dict  # id(node) -> path of the module whose output it is


def _kind(module) -> str:
    for cls, kind in LAYERS.items():
        if type(module) is cls:
            return kind
    if type(module).__module__.startswith("flax.") and not isinstance(module, nn.Sequential):
        return "refused"
    return "container"


def _marker(index: int):
    def mark(x, y):
        return y + 0.0 * jnp.sum(x).astype(y.dtype)
    mark.__name__ = f"{MARKER}{index}"
    return jax.jit(mark)


def _bn_train(module, kwargs) -> bool:
    use_running = nn.merge_param("use_running_average", module.use_running_average,
                                 kwargs.get("use_running_average"))
    return not use_running


def _trace(module, x_shape, args, kwargs, dtype):
    """The jaxpr of the float forward with every module call marked, and the calls."""
    calls: list = []

    def intercept(next_fun, call_args, call_kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not call_args:
            return next_fun(*call_args, **call_kwargs)
        y = next_fun(*call_args, **call_kwargs)
        x = call_args[0]
        path = "/".join(str(p) for p in m.scope.path)
        if not path or not isinstance(x, jax.Array) or not isinstance(y, jax.Array):
            return y
        kind = _kind(m)
        call = Call(len(calls), path, kind, m, tuple(x.shape), tuple(y.shape))
        if kind == "bn":
            call.train = _bn_train(m, call_kwargs)
        calls.append(call)
        return _marker(call.index)(x, y)

    def forward(x):
        with nn.intercept_methods(intercept):
            out, _ = module.init_with_output(jax.random.PRNGKey(0), x, *args, **kwargs)
        return jax.tree_util.tree_leaves(out)[0]

    closed = jax.make_jaxpr(forward)(jax.ShapeDtypeStruct(x_shape, dtype))
    return closed, calls


def _is_literal(v) -> bool:
    return isinstance(v, jax.extend.core.Literal)


def _literal(v):
    return float(np.asarray(v.val)) if _is_literal(v) and np.size(v.val) == 1 else None


class _Reader:
    """Reads a jaxpr into nodes: a value that depends on the image is a Node, one that does
    not (parameters, constants) is None."""

    def __init__(self, calls, pixels: bool = False):
        self.calls = calls
        self.pixels = pixels  # the image is uint8 pixels
        self.container_outputs: dict = {}

    def read(self, jaxpr, inputs, where_prefix=""):
        env = dict(zip(jaxpr.invars, inputs))
        value = lambda v: None if _is_literal(v) else env.get(v)
        for eqn in jaxpr.eqns:
            ins = [value(v) for v in eqn.invars]
            if all(n is None for n in ins):
                outs = [None] * len(eqn.outvars)
            else:
                where = str(eqn.source_info.name_stack)
                where = "/".join(where.split("/")[1 - bool(where_prefix):]) if where else ""
                if where_prefix:  # inside an inlined call: its name stack is relative
                    where = f"{where_prefix}/{where}" if where else where_prefix
                outs = self.eqn(eqn, ins, where)
            env.update(zip(eqn.outvars, outs))
        return [value(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins, where):
        name, p = eqn.primitive.name, eqn.params
        shape = tuple(eqn.outvars[0].aval.shape) if hasattr(eqn.outvars[0].aval, "shape") else ()
        if name in ("jit", "pjit") and str(p.get("name", "")).startswith(MARKER):
            return [self.mark(int(p["name"][len(MARKER):]), ins)]
        if name in _CALLS and _CALLS[name] in p:
            inner = p[_CALLS[name]]
            inner = getattr(inner, "jaxpr", inner)
            return self.read(inner, ins, where)
        refused = lambda op: [Node("refused", tuple(n for n in ins if n is not None),
                                   {"op": op}, where, shape)] * len(eqn.outvars)
        x = ins[0]
        dependent = [n for n in ins if n is not None]
        if self.pixels and name in _PIXEL_OPS and len(dependent) == 1 and \
                dependent[0].op in ("image", "pixels") and not (
                    name == "convert_element_type" and dependent[0].op == "image"
                    and p.get("new_dtype") == jnp.float32):
            return [Node("pixels", (dependent[0],), {"op": name}, where, shape)]
        if name in _TRANSPARENT or (name == "convert_element_type"
                                     and p.get("new_dtype") == jnp.float32):
            return [x] if len(eqn.outvars) == 1 else refused(name)
        if name in ("reshape", "squeeze"):
            kept = [d for d in x.shape if d != 1] if x is not None else None
            if x is not None and kept == [d for d in shape if d != 1] and shape[:1] == x.shape[:1]:
                return [x]
            return refused(name)
        if name == "max" and x is not None and ins[1] is None and _literal(eqn.invars[1]) == 0:
            return [Node("relu", (x,), {}, where, shape)]
        if name == "max" and ins[0] is None and ins[1] is not None and \
                _literal(eqn.invars[0]) == 0:
            return [Node("relu", (ins[1],), {}, where, shape)]
        if name == "add" and all(n is not None for n in ins):
            return [Node("add", tuple(ins), {}, where, shape)]
        if name == "reduce_window_max":
            return [self.max_pool(x, p, where, shape) or refused(name)[0]]
        if name == "reduce_sum" and x is not None and len(x.shape) == 4 and \
                tuple(p["axes"]) == (1, 2):
            return [Node("sum", (x,), {"window": x.shape[1] * x.shape[2]}, where, shape)]
        if name == "reduce_window_sum" and x is not None and len(x.shape) == 4 and \
                tuple(p["window_dimensions"]) == (1, x.shape[1], x.shape[2], 1) and \
                all(tuple(pad) == (0, 0) for pad in p["padding"]):
            return [Node("sum", (x,), {"window": x.shape[1] * x.shape[2]}, where, shape)]
        if name in ("div", "mul") and x is not None and x.op == "sum" and ins[1] is None:
            factor = _literal(eqn.invars[1])
            window = x.attrs["window"]
            if factor is not None and (factor == window if name == "div"
                                       else factor * window == 1.0):
                return [Node("avg_pool", x.inputs, {"window": window}, where, shape)]
        if name in ("div", "mul") and x is not None and x.op == "sum":
            return refused("average pool")
        return refused(name)

    def max_pool(self, x, p, where, shape) -> Optional[Node]:
        dims, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
        if x is None or len(dims) != 4 or dims[0] != 1 or dims[3] != 1 or dims[1] != dims[2]:
            return None
        if strides[0] != 1 or strides[3] != 1 or strides[1] != strides[2]:
            return None
        if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
            return None
        pad = pads[1][0]
        if tuple(pads[0]) != (0, 0) or tuple(pads[3]) != (0, 0) or \
                any(tuple(q) != (pad, pad) for q in pads[1:3]):
            return None
        return Node("max_pool", (x,), {"window": int(dims[1]), "strides": int(strides[1]),
                                       "padding": int(pad)}, where, shape)

    def mark(self, index, ins):
        call = self.calls[index]
        x, y = ins
        if call.kind == "container":
            if y is not None:
                self.container_outputs.setdefault(id(y), call.path)
            return y
        call.input = x
        call.output = Node("call", (), {"call": call}, call.path, call.out_shape)
        return call.output


def capture(module, x_shape: tuple, args: tuple = (), kwargs: Optional[dict] = None,
            dtype=jnp.float32) -> Graph:
    """The graph of ``module``'s float forward on an input of ``x_shape`` and ``dtype``
    (float32, or uint8 pixels), called with ``args`` and ``kwargs`` after it."""
    dtype = jnp.dtype(dtype)
    closed, calls = _trace(module, tuple(x_shape), tuple(args), dict(kwargs or {}), dtype)
    image = Node("image", (), {}, "", tuple(x_shape))
    reader = _Reader(calls, pixels=dtype == jnp.uint8)
    (output,) = reader.read(closed.jaxpr, [image])
    return Graph(calls, output, image, reader.container_outputs)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and 2 ** int(round(math.log2(n))) == n
