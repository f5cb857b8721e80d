"""The integer program against the simulation: logits and every intermediate tensor.

For a conv or dense op the simulation's stored values are its quantized input (the
layer's InputQuantizer output, a multiple of 2^-fl_in) and its output (accumulator plus
rounded bias); for a residual add, the block's output. Each must equal the integers of the
program times 2^-fraclen exactly. Comparisons are in float64, where both sides are exact.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import numpy as np

from f8net_jax.integer.executor import Executor
from f8net_jax.integer import ops
from f8net_jax.integer.program import IntegerProgram


def simulation_fn(model):
    """The simulation's jitted eval forward capturing every module's output (to reuse across
    ``simulate`` calls)."""
    apply = functools.partial(model.apply, train=False, capture_intermediates=True,
                              mutable=["intermediates"])
    return jax.jit(apply)


def simulate(model, variables, images, fn=None):
    """(eval logits, {module path: first output}) of the fixed-point simulation, with
    float32 matmuls and convolutions at highest precision (no TF32 or bf16 passes)."""
    fn = fn or simulation_fn(model)
    variables = {k: v for k, v in variables.items()
                 if k in ("params", "batch_stats", "quant_stats")}
    with jax.default_matmul_precision("highest"):
        logits, state = fn(variables, images)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]))
    captured = {}
    for path, outputs in flat.items():
        if path[-1] != "__call__":
            continue
        out = outputs[0]
        captured["/".join(path[:-1])] = out[0] if isinstance(out, tuple) else out
    return logits, captured


def _as_float64(ints, fraclen) -> np.ndarray:
    return np.asarray(ints, np.float64) * np.exp2(-np.asarray(fraclen, np.float64))


@dataclasses.dataclass
class Report:
    images: int = 0
    agree: int = 0
    correct: int = 0
    max_logit_diff: float = 0.0      # in int32 units of the logits
    tensors_compared: int = 0        # (tensor, batch) pairs
    tensors_differing: list = dataclasses.field(default_factory=list)
    observed_max: dict = dataclasses.field(default_factory=dict)  # op -> max |integer|

    @property
    def exact(self) -> bool:
        return (self.images > 0 and self.agree == self.images and self.max_logit_diff == 0
                and not self.tensors_differing)

    def last_line(self) -> str:
        n = max(self.images, 1)
        return (f"integer vs simulation: agreement {100 * self.agree / n:.2f}% top-1 over "
                f"{self.images} images, max |logit diff| {self.max_logit_diff:g} (int32 units), "
                f"integer top-1 {100 * self.correct / n:.2f}%")


def pairs(program: IntegerProgram):
    """(simulation module path, program tensor, required) triples that must hold the same
    numbers, as each op's kind pairs them (``OpKind.pairs``): a layer's quantized input and
    output; a residual add where its name is a module whose output it is (a block); an add
    outside any module has no captured value and is covered by its readers."""
    return [pair for op in program.ops for pair in ops.kind_of(op).pairs(op)]


class Verifier:
    """Compares ``program`` with ``model``'s simulation batch by batch into one Report."""

    def __init__(self, program: IntegerProgram, model, variables, backend=None, sim_fn=None):
        self.program, self.model, self.variables = program, model, variables
        self.executor = Executor(program, backend=backend)
        self.sim_fn = sim_fn or simulation_fn(model)
        self.pairs = pairs(program)
        self.report = Report()

    def batch(self, images, labels=None) -> None:
        program, report = self.program, self.report
        int_logits, seen = self.executor.collect(images)
        sim_logits, captured = simulate(self.model, self.variables, images, self.sim_fn)
        fl = program.logits_fraclen
        int_logits = np.asarray(int_logits, np.int64)
        scaled = np.asarray(sim_logits, np.float64) * 2.0 ** fl
        report.max_logit_diff = max(report.max_logit_diff,
                                    float(np.max(np.abs(int_logits - scaled))))
        int_top1 = np.argmax(int_logits, -1)
        report.images += len(images)
        report.agree += int(np.sum(int_top1 == np.argmax(np.asarray(sim_logits), -1)))
        if labels is not None:
            report.correct += int(np.sum(int_top1 == np.asarray(labels)))
        for path, tensor, required in self.pairs:
            if path not in captured:
                if not required:
                    continue
                raise ValueError(f"the simulation has no module {path!r} to compare with")
            expected = np.asarray(captured[path], np.float64)
            got = _as_float64(seen[tensor], program.tensors[tensor]["fraclen"])
            report.tensors_compared += 1
            if expected.shape != got.shape or not np.array_equal(expected, got):
                report.tensors_differing.append(path)
        for op in program.ops:
            if "check" in op:
                m = int(np.max(np.abs(np.asarray(seen[op["out"]], np.int64))))
                report.observed_max[op["name"]] = max(report.observed_max.get(op["name"], 0), m)


def verify(program: IntegerProgram, model, variables, images, labels=None,
           batch_size: int = 64, backend=None, sim_fn=None) -> Report:
    """Runs both paths on ``images`` (uint8 NHWC) and returns the Report (``backend``: the
    executor's, see Executor; ``sim_fn``: a compiled simulation to reuse)."""
    verifier = Verifier(program, model, variables, backend=backend, sim_fn=sim_fn)
    for i in range(0, len(images), batch_size):
        verifier.batch(images[i:i + batch_size],
                       None if labels is None else labels[i:i + batch_size])
    return verifier.report
