"""Runs integer programs on inputs that break a 16-bit pair sum (every pixel 255, every
conv weight +127) with the default executor backend and with XLA's, and prints as JSON
what oneDNN's int8 path said of this machine and the largest difference in any tensor.

    ONEDNN_MAX_CPU_ISA=AVX2 python tests/scripts/capped_isa.py resnet20:16 resnet18:32

Also imported by the tests for ``adversarial_program``.
"""

import json
import sys

import jax
import numpy as np

from f8net_jax import integer, models
from f8net_jax.integer import executor as executor_lib
from f8net_jax.integer import onednn
from f8net_jax.layers import QuantConfig


def adversarial_program(name: str, size: int):
    """The program of ``name`` at ``size`` with every conv weight +127, and images of 255:
    the first layer's u8 x s8 pairs sum to 64,770, past int16 (each layer alone still fits
    int32: 255 * 127 * fan-in < 2^31)."""
    quant = QuantConfig(mode="fixed")
    model = models.create(name, num_classes=10, quant=quant)
    x = np.zeros((1, size, size, 3), np.uint8)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
    program = integer.export(variables, name, {"quant": quant}, image_shape=(size, size, 3))
    for op in program.ops:
        if op["op"] == "conv":
            program.arrays[op["weight"]] = np.full_like(program.arrays[op["weight"]], 127)
    return program, np.full((2, size, size, 3), 255, np.uint8)


def max_difference(program, images, backend: str, reference: str = "xla") -> int:
    """The largest difference between two backends over every tensor of the program."""
    _, got = integer.Executor(program, backend=backend).collect(images)
    _, want = integer.Executor(program, backend=reference).collect(images)
    return max(int(np.max(np.abs(np.asarray(got[k], np.int64) - np.asarray(want[k], np.int64))))
               for k in want)


def main(cases):
    ok, why = onednn.available()
    backend, reason = executor_lib.choose_backend()
    out = {"onednn_available": ok, "onednn_why": why, "backend": backend, "reason": reason}
    for case in cases:
        name, size = case.split(":")
        program, images = adversarial_program(name, int(size))
        out[case] = max_difference(program, images, backend)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
