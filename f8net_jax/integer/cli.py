"""What the export and verify commands share: loading a fixed-point workdir, clean errors."""

from __future__ import annotations

import sys

from f8net_jax import checkpoints
from f8net_jax.integer.exporter import export
from f8net_jax.integer import ops
from f8net_jax.integer.program import IntegerProgram

ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, OSError)


def fail(message: str) -> None:
    sys.exit(f"f8net_jax.integer: {message}")


def load_fixed_point(workdir: str):
    """(model, variables, config, image_shape) of a workdir's latest fixed-point checkpoint."""
    model, variables, config, image_shape = checkpoints.load_workdir(workdir)
    if config.quant.mode != "fixed":
        raise ValueError(f"{workdir} holds a float-mode (quant.mode={config.quant.mode!r}) "
                         f"checkpoint: integer inference needs a fixed-point one")
    if "quant_stats" not in variables:
        raise ValueError(f"{workdir}: the checkpoint has no quant_stats (running formats)")
    return model, variables, config, image_shape


def export_loaded(variables, config, image_shape) -> IntegerProgram:
    """The integer program of a workdir loaded by ``load_fixed_point``."""
    return export(variables, config.model, config, image_shape=image_shape)


def describe(program: IntegerProgram) -> list:
    """Lines summing up a program and its static checks."""
    checks = program.checks()
    layers = sum(ops.kind_of(op).accumulating for op in program.ops)
    worst = max(checks, key=lambda c: c["accumulator_bound"])
    inexact = [c["layer"] for c in checks if not c["float32_exact"]]
    saturating = program.saturating_ops()
    h, w, c = program.image_shape
    lines = [
        f"program: {program.model}, {layers} layers, {len(program.ops)} ops, "
        f"images {h}x{w}x{c} uint8, int32 logits at fraclen {program.logits_fraclen}",
        f"static check: largest accumulator bound {worst['accumulator_bound']:,} "
        f"({worst['layer']}); float32 exact (bound < 2^24) in {len(checks) - len(inexact)}"
        f"/{len(checks)} accumulating ops ({', '.join(dict.fromkeys(c['op'] for c in checks))})"
        + (f", could exceed in {', '.join(inexact)}" if inexact else ""),
        f"int32 overflow: {len(saturating)} ops rely on saturation"
        + (f" ({', '.join(saturating)})" if saturating else
           " (the static bounds rule out overflow everywhere)"),
    ]
    return lines
