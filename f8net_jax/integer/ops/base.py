"""An op kind of the integer program, and the registry of them.

Each kind is one class, derived from ``OpKind`` and decorated with ``@register``; it holds
everything about its ops, and the program (``validate``), the exporter, the executor,
verification and ONNX export look a kind up in ``REGISTRY`` by the op's 'op' field:

  name, arity, fields  the JSON op: how many tensors it reads ('in'), the fields it needs
                       and their JSON types; ``arrays``: the fields naming an array, with
                       its dtype; ``minimums``: the lower limit of integer fields
  check, format_rule   validation: shapes and kinds against the tensors it reads and
                       writes (``Checker``), and whether its shifts and output format follow
                       from its inputs' fraclens
  build                (exporter) appends the op with its static bounds: the output's kind,
                       fraclen and per-channel [lo, hi], its 'check' and 'saturate'
  events, replay       (exporter) the recorded events (f8net_jax.recording) that become it,
                       and how: an op, nothing, or a deferral to the first reader
                       (``materialize``)
  output_size          (executor) the (height, width) of its output
  prepare, run         (executor) what the Plan keeps of the op (arrays, a backend's
                       choices), and its reference semantics in integer JAX ops; a backend
                       overrides ``run`` for a kind it accelerates with a method of the
                       kind's name (integer/backends.py)
  pairs                (verification) the simulation's module outputs its tensors equal
  lower                (ONNX) its nodes of the QDQ graph (integer/onnx_export.py)

``accumulating`` marks the layers (int8 x int8 products into int32, with a bias),
``gives_logits`` the kind whose output a program ends with (the classifier's dense).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from f8net_jax import fixed_point as fp

FLOAT_EXACT = 2 ** 24  # below it, float32 sums of integers are exact
UNSIGNED, SIGNED = fp.integer_range(signed=False), fp.integer_range(signed=True)


class OpKind:
    """One kind of op. Subclasses set the class attributes and override what applies."""

    name: str = ""
    arity: int = 1
    fields: dict = {}
    arrays: dict = {}
    minimums: dict = {}
    events: tuple = ()
    accumulating: bool = False
    gives_logits: bool = False       # it may end the program: its output is the logits
    onnx_intermediate: bool = False  # its output is an 8-bit tensor of the ONNX graph

    # -- validation --------------------------------------------------------------------
    def check(self, op: dict, v: "Checker") -> None:
        """Raises (``v.fail``) where the op does not fit the tensors it reads and writes;
        ``validate_op`` has checked its fields, arrays and minimums already."""

    def format_rule(self, op: dict, tensors: dict) -> Optional[str]:
        """What about its output format or shifts does not follow from its inputs', or
        None."""
        return None

    # -- the exporter --------------------------------------------------------------------
    def replay(self, event, r) -> Optional[str]:
        """The program tensor that recorded ``event`` (one of ``events``) becomes: ``r``
        (exporter._Replay) resolves the event's inputs (``r.tensor``) and holds the builder
        (``r.b``), whose ``emit`` appends an op. None defers it (``r.defer``)."""
        raise ValueError(f"op kind {self.name!r} is not recorded")

    def materialize(self, event, r, reader) -> str:
        """The tensor of a deferred ``event``, built when ``reader`` (an event, or None)
        first needs it."""
        raise NotImplementedError

    # -- the executor --------------------------------------------------------------------
    def output_size(self, op: dict, program, sizes: dict) -> tuple:
        """(height, width) of its output, given ``sizes`` of the tensors before it."""
        if not op["in"]:
            return tuple(program.image_shape[:2])
        return sizes[op["in"][0]]

    def prepare(self, op: dict, program, plan) -> None:
        """Fills ``plan`` (executor.Plan) for the op: the arrays it reads, and any choice of
        the plan's backend (``op`` is the plan's copy, which ``run`` then receives)."""
        for field in self.arrays:
            plan.arrays[op[field]] = program.arrays[op[field]]

    def run(self, op: dict, args: list, run):
        """Its output from ``args`` (its inputs' arrays); ``run`` holds the images, the
        plan's arrays and the storage code of every tensor (executor._Run)."""
        raise NotImplementedError(f"op kind {self.name!r} has no reference semantics")

    # -- verification and ONNX -----------------------------------------------------------
    def pairs(self, op: dict) -> list:
        """(simulation module path, program tensor, required) for the numbers that must be
        equal (verification.pairs)."""
        return []

    def lower(self, op: dict, lo) -> None:
        """Adds its ONNX nodes: ``lo`` (onnx_export._Lowering) maps each program tensor to
        the ONNX tensor of its exact value (``lo.float_of``)."""
        raise ValueError(f"op {self.name!r} has no ONNX form")


REGISTRY: dict = {}  # op name -> its OpKind, in registration order


def register(cls):
    """Class decorator: registers an OpKind subclass (one instance) under its ``name``."""
    kind = cls()
    if not isinstance(kind.name, str) or not kind.name:
        raise ValueError(f"{cls.__name__} needs a name")
    if kind.name in REGISTRY:
        raise ValueError(f"op kind {kind.name!r} is already registered")
    taken = event_kinds()
    for event in kind.events:
        if event in taken:
            raise ValueError(f"{kind.name}: event {event!r} already becomes "
                             f"{taken[event].name!r}")
    REGISTRY[kind.name] = kind
    return cls


def unregister(name: str) -> None:
    """Removes a kind that ``register`` added."""
    del REGISTRY[name]


def kind_of(op: dict) -> OpKind:
    return REGISTRY[op["op"]]


def event_kinds() -> dict:
    """Recorded event kind -> the OpKind that replays it."""
    return {event: kind for kind in REGISTRY.values() for event in kind.events}


# --------------------------------------------------------------------------------------
# Validation: the generic part, then the kind's.


def validate_op(program, i: int, op: dict, known: set, fail) -> None:
    """One op's fields, arrays and limits, then its kind's ``check`` and ``format_rule``;
    ``known`` holds the tensors written before it, ``fail(message)`` raises."""
    kind = REGISTRY.get(op.get("op")) if isinstance(op.get("op"), str) else None
    if kind is None:
        fail(f"op {i} has unknown type {op.get('op')!r}; allowed {list(REGISTRY)}")
    name = op.get("name", op.get("out"))
    label = f"op {i} ({kind.name}{' ' + name if isinstance(name, str) else ''})"
    inputs = op.get("in")
    if not isinstance(inputs, list) or len(inputs) != kind.arity:
        fail(f"{label}: 'in' must list {kind.arity} tensor(s), got {inputs!r}")
    for name in inputs:
        if name not in known:
            fail(f"{label} reads tensor {name!r} before it is written")
    for field, type_ in kind.fields.items():
        value = op.get(field)
        if field not in op:
            fail(f"{label} lacks the field {field!r}")
        if not is_json(value, type_):
            fail(f"{label}: {field!r} must be {type_.__name__}, got {value!r}")
    out = op.get("out")
    if not isinstance(out, str) or out not in program.tensors:
        fail(f"{label} writes tensor {out!r}, which has no entry in 'tensors'")
    for field, dtype in kind.arrays.items():
        array = program.arrays.get(op.get(field))
        if array is None:
            fail(f"{label} needs array {op.get(field)!r}, which is missing")
        if array.dtype != dtype:
            fail(f"array {op[field]!r} must be {np.dtype(dtype).name}, got {array.dtype}")
    for field, minimum in kind.minimums.items():
        if op[field] < minimum:
            fail(f"{label}: {field!r} must be >= {minimum}, got {op[field]}")
    v = Checker(program, op, label, fail)
    kind.check(op, v)
    problem = kind.format_rule(op, program.tensors)
    if problem:
        v.fail(problem)


class Checker:
    """What a kind's ``check`` reads and how it fails: the program's tensors, arrays and
    image shape, the op's input (``src``) and output (``dst``) tensors."""

    def __init__(self, program, op: dict, label: str, fail):
        self.tensors, self.arrays = program.tensors, program.arrays
        self.image_shape = program.image_shape
        self.op, self.label, self._fail = op, label, fail
        self.src = self.tensors[op["in"][0]] if op["in"] else None
        self.dst = self.tensors[op["out"]]

    def fail(self, message: str) -> None:
        self._fail(f"{self.label}: {message}")

    def expect(self, what: str, got, wanted) -> None:
        if tuple(got) != tuple(wanted):
            self.fail(f"{what} is {tuple(got)}, expected {tuple(wanted)}")

    def expect_kind(self, tensor: str, kinds: tuple) -> None:
        """``tensor`` (a name) is one of ``kinds``."""
        if self.tensors[tensor]["kind"] not in kinds:
            self.fail(f"tensor {tensor!r} is {self.tensors[tensor]['kind']}, expected "
                      f"{' or '.join(kinds)}")

    def same_channels(self) -> None:
        """The output has the input's channels."""
        self.expect(f"the channels of {self.op['out']!r}", (self.dst["channels"],),
                    (self.src["channels"],))


def is_json(value, type_) -> bool:
    """isinstance for JSON types, taking numpy scalars and arrays as JSON would."""
    if type_ is bool:
        return isinstance(value, (bool, np.bool_))
    if type_ is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if type_ is list:
        return isinstance(value, (list, tuple, np.ndarray))
    return isinstance(value, type_)


# --------------------------------------------------------------------------------------
# Format rules: the fraclens an op's inputs imply.


def brief(values) -> str:
    """Per-channel integers, one if they agree, else the first few."""
    values = list(values)
    if not all(is_json(v, int) for v in values):
        return repr(values)
    values = [int(v) for v in values]
    if len(set(values)) == 1:
        return str(values[0])
    return str(values) if len(values) <= 8 else f"[{str(values[:8])[1:-1]}, ...]"


def follows(what, got, wanted, sources) -> Optional[str]:
    """None if ``got`` (per channel) equals ``wanted``, else the message naming
    ``sources`` ({tensor name: its fraclens}) it should have followed from."""
    if list(got) == [int(v) for v in wanted]:
        return None
    names = " and ".join(f"{n!r} ({brief(fl)})" for n, fl in sources.items())
    return f"{what} is {brief(got)}, which does not follow from the fraclens of {names}: " \
           f"expected {brief(wanted)}"


def fraclens(op, tensors) -> tuple:
    """(the fraclens of the op's inputs as arrays, those of its output)."""
    ins = [np.asarray(tensors[n]["fraclen"], np.int64) for n in op["in"]]
    return ins, np.asarray(tensors[op["out"]]["fraclen"], np.int64)


def same_format(op, tensors) -> Optional[str]:
    """The format rule of an op whose output keeps its input's format."""
    (fl_in,), out = fraclens(op, tensors)
    return follows(f"the fraclen of {op['out']!r}", out, fl_in, {op["in"][0]: fl_in})


# --------------------------------------------------------------------------------------
# Static bounds: per-channel [lo, hi] of a tensor's integers.


def magnitude(lo, hi) -> int:
    """The largest |integer| of per-channel bounds [lo, hi]."""
    return int(max(np.max(np.abs(lo)), np.max(np.abs(hi))))


def to_int32(bounds):
    return np.clip(bounds, -fp.INT32_MAX, fp.INT32_MAX)


def static_check(name: str, op: str, bound: int, partial: int = 0) -> dict:
    """The static check of one accumulating op: its worst-case magnitude in integer units
    (``partial``: of the product sums before the bias), float32 exactness, int32 safety."""
    return {"layer": name, "op": op, "accumulator_bound": int(bound),
            "float32_exact": bool(max(bound, partial) < FLOAT_EXACT),
            "int32_safe": bool(bound <= fp.INT32_MAX)}
