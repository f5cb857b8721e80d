"""Four virtual CPU devices meet at a psum after device 0 alone has computed for about
SECONDS; prints, as JSON, how late device 0 was.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/scripts/late_device.py SECONDS
"""

import json
import sys
import time

from f8net_jax import runtime

runtime.configure_cpu_devices()

import jax  # noqa: E402  (XLA_FLAGS is read when the backend starts)
import jax.numpy as jnp  # noqa: E402


def late_step(iterations):
    def busy(x):
        w = jnp.eye(256, dtype=jnp.float32) * 0.5
        return jax.lax.fori_loop(0, iterations, lambda i, y: jnp.tanh(y @ w) + 1.0, x)

    def step(x):
        x = jax.lax.cond(jax.lax.axis_index("d") == 0, busy, lambda y: y, x)
        return jax.lax.psum(x, "d")

    x = jnp.ones((jax.local_device_count(), 256, 256), jnp.float32)
    compiled = jax.pmap(step, axis_name="d").lower(x).compile()
    start = time.perf_counter()
    compiled(x).block_until_ready()
    return time.perf_counter() - start


def main(seconds):
    probe = 2000
    iterations = int(seconds * probe / late_step(probe))
    took = late_step(iterations)
    # The probe may have run faster than the long loop does on a loaded machine: aim again
    # until device 0 is at least nine tenths of SECONDS late.
    for _ in range(2):
        if took >= 0.9 * seconds:
            break
        iterations = int(iterations * seconds / took * 1.05)
        took = late_step(iterations)
    print(json.dumps({"devices": jax.local_device_count(), "seconds": took}))


if __name__ == "__main__":
    main(float(sys.argv[1]))
