"""Integer-only inference: export a fixed-point model to an integer program, run it with
8-bit multiplications, shifts and int32 additions only, and check it against the
simulation (docs/METHOD.md 6 and 8).

    program = integer.export(variables, model)    # any fixed-point model of our layers
    program = integer.export(variables, config.model, config)  # or a model by name
    integer.save(program, "model")            # model.json + model.npz
    logits = integer.Executor(integer.load("model"))(images)   # int32, at logits_fraclen
"""

from f8net_jax.integer.executor import Executor, deserialize, serialize
from f8net_jax.integer.exporter import export
from f8net_jax.integer.program import VERSION, IntegerProgram, load, save

__all__ = ["Executor", "IntegerProgram", "VERSION", "deserialize", "export",
           "load", "save", "serialize"]
