"""Inference throughput: the integer executor against float32 eval of the same model.

    python benchmarks/integer_inference.py [--repeats 10] [--resnet18_batch 8]
                                           [--resnet20_batch 128]

For ResNet-18 at 224x224 and ResNet-20 at 32x32 (ImageNet-style 1000 and 10 classes):
initializes a fixed-point model, runs one training-mode forward so BatchNorm statistics
and running formats are not at their initial values, exports it, and times on the same
uint8 batch, after warm-up (compilation) and interleaved over ``repeats`` rounds:
* integer: the jitted integer executor (8-bit operands, int32 accumulation) with the
  default backend ('vnni' on a CPU with AVX-512 VNNI, 'im2col' on a GPU), and on such a
  CPU also with the 'xla' backend (XLA's own int8 convolution);
* float: the same model and parameters in float mode (float32 conv + BatchNorm), jitted
  eval forward;
* simulation: the fixed-point eval forward (fake quantization in float32), for reference.
Reports the median images/s of each and, as its last line,
`integer/float eval throughput ratio: R` for the ResNet-18 case.
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import integer, layers, models


def _median_rate(fn, images, repeats):
    jax.block_until_ready(fn(images))  # compile
    jax.block_until_ready(fn(images))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(images))
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def measure(name, size, channels, classes, batch, repeats):
    quant = layers.QuantConfig(mode="fixed")
    model = models.create(name, num_classes=classes, quant=quant)
    float_model = models.create(name, num_classes=classes,
                                quant=dataclasses.replace(quant, mode="float"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
    _, updates = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats", "quant_stats"]))(variables, images)
    variables = {**variables, **updates}
    program = integer.export(variables, name, {"quant": quant}, image_shape=images.shape[1:])
    executor = integer.Executor(program)
    float_vars = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    float_eval = jax.jit(lambda x: float_model.apply(float_vars, x, train=False))
    sim_eval = jax.jit(lambda x: model.apply(variables, x, train=False))
    fns = {"integer": executor, "float": float_eval, "simulation": sim_eval}
    if executor.backend == "vnni":  # XLA's own int8 convolution, for comparison
        fns["integer (xla)"] = integer.Executor(program, backend="xla")
    rates = {k: [] for k in fns}
    images = jnp.asarray(images)
    for _ in range(3):  # interleave so that machine noise hits every path alike
        for k, fn in fns.items():
            rates[k].append(_median_rate(fn, images, repeats))
    rates = {k: max(v) for k, v in rates.items()}
    xla = (f", integer with the xla backend {rates['integer (xla)']:.1f} img/s"
           if "integer (xla)" in rates else "")
    print(f"{name} {size}x{size} batch {batch}: integer ({executor.backend}) "
          f"{rates['integer']:.1f} img/s, float {rates['float']:.1f} img/s, simulation "
          f"{rates['simulation']:.1f} img/s{xla}, integer/float "
          f"{rates['integer'] / rates['float']:.2f}")
    return rates["integer"] / rates["float"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--resnet18_batch", type=int, default=8)
    parser.add_argument("--resnet20_batch", type=int, default=128)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    measure("resnet20", 32, 3, 10, args.resnet20_batch, args.repeats)
    ratio = measure("resnet18", 224, 3, 1000, args.resnet18_batch, args.repeats)
    print(f"integer/float eval throughput ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
