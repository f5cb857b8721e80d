"""The op record of a fixed-point eval forward: what the integer exporter builds from.

While ``record`` traces a model, the image input (``models.common.prepare_image``), every
quantized module of ``f8net_jax.layers`` (a layer's input quantizer, conv + BN with its
padding and groups, dense) and every function of ``f8net_jax.streams`` that moves a stream between layers (ReLU, residual add,
max and average pool) appends one event: its kind, the tensors it reads and writes and its
static attributes. Each event kind is replayed by the op kind of the integer program that
declares it (``f8net_jax.integer.ops``, ``OpKind.events``). Tensors are the
traced arrays themselves, named here in the order they appear, so the record is the
model's own wiring: a model built from those modules and functions exports with no code
that knows it. Outside ``record`` nothing is kept and nothing costs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Optional

import jax
import numpy as np


@dataclasses.dataclass
class Event:
    kind: str
    inputs: list       # tensor keys it reads
    output: str        # tensor key it writes
    attrs: dict


class Recorder:
    def __init__(self):
        self.events: list = []
        self._keys: dict = {}   # id(array) -> tensor key
        self._alive: list = []  # the arrays, so that no id is reused while recording
        self.output: Optional[str] = None

    def key(self, x, reader: str) -> str:
        try:
            return self._keys[id(x)]
        except KeyError:
            raise ValueError(
                f"{reader} reads a tensor that no recorded op wrote: between quantized layers "
                f"a fixed-point model may only use f8net_jax.streams' relu, residual_add, "
                f"max_pool and global_average_pool, so that its integer program can be "
                f"built") from None

    def add(self, kind: str, inputs, output, reader: str, **attrs) -> None:
        keys = [self.key(x, reader) for x in inputs]
        out = f"t{len(self._keys)}"
        self._keys[id(output)] = out
        self._alive.append(output)
        self.events.append(Event(kind, keys, out, attrs))


_state = threading.local()


def emit(kind: str, inputs, output, reader: str = "", **attrs) -> None:
    """Appends an event when a record is being made; nothing otherwise."""
    recorder = getattr(_state, "recorder", None)
    if recorder is not None:
        recorder.add(kind, inputs, output, reader or kind, **attrs)


def alias(x, like) -> None:
    """Records ``x`` as the tensor ``like`` already is (one value held by two arrays)."""
    recorder = getattr(_state, "recorder", None)
    if recorder is not None and id(like) in recorder._keys:
        recorder._keys[id(x)] = recorder._keys[id(like)]
        recorder._alive.append(x)


def module_path(module, up: int = 0) -> str:
    """'stage1_block1/body_0': the names of a bound module's scope (less the last ``up``),
    as its collections are keyed."""
    path = module.scope.path
    return "/".join(str(p) for p in path[:len(path) - up])


@contextlib.contextmanager
def _recording():
    if getattr(_state, "recorder", None) is not None:
        raise RuntimeError("a record is already being made in this thread")
    _state.recorder = Recorder()
    try:
        yield _state.recorder
    finally:
        _state.recorder = None


def record(model, variables: Any, image_shape: tuple) -> Recorder:
    """The events of ``model``'s eval forward on one uint8 image of ``image_shape``, traced
    abstractly (nothing is computed); ``.output`` names the logits."""
    variables = {k: v for k, v in variables.items()
                 if k in ("params", "batch_stats", "quant_stats")}
    image = jax.ShapeDtypeStruct((1, *image_shape), np.uint8)
    with _recording() as recorder:
        def forward(variables, x):
            logits = model.apply(variables, x, train=False)
            recorder.output = recorder.key(logits, "the model's output")
            return logits

        jax.eval_shape(forward, variables, image)
    return recorder
