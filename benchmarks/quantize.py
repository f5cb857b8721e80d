"""Cost of the fake quantizer: forward+backward of quantize() against the same computation
without it, measured in one run on the same inputs.

    python benchmarks/quantize.py [--size 4194304] [--repeats 20]

Prints the time of each and, as its last line, `quantize/identity time ratio: R`.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from f8net_jax import fixed_point as fp
from f8net_jax import format_rules


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 22)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(args.size, np.float32))
    w = jnp.asarray(rng.standard_normal(args.size, np.float32))

    def metric_format(v):
        return format_rules.fraclen_from_metric(format_rules.tensor_metric(v, "std"),
                                                signed=True)

    identity = jax.jit(jax.grad(lambda v, fl: jnp.sum(v * w)))
    quantized = jax.jit(jax.grad(lambda v, fl: jnp.sum(fp.quantize(v, fl, signed=True) * w)))
    with_rule = jax.jit(jax.grad(
        lambda v: jnp.sum(fp.quantize(v, jax.lax.stop_gradient(metric_format(v)), signed=True) * w)))
    fl = jnp.float32(5.0)
    t_id = _time(identity, x, fl, repeats=args.repeats)
    t_q = _time(quantized, x, fl, repeats=args.repeats)
    t_rule = _time(with_rule, x, repeats=args.repeats)
    print(f"device: {jax.devices()[0].device_kind}, elements: {args.size}")
    print(f"identity grad:              {t_id * 1e3:8.2f} ms")
    print(f"quantize grad:              {t_q * 1e3:8.2f} ms")
    print(f"std rule + quantize grad:   {t_rule * 1e3:8.2f} ms")
    print(f"quantize/identity time ratio: {t_q / t_id:.2f}")


if __name__ == "__main__":
    main()
