"""Trains ResNet-20 for 3 steps with one global batch split over all (virtual CPU) devices
and over one device, and prints, as JSON, the largest difference of each collection after
each step.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/scripts/pmap_equivalence.py MODE
"""

import functools
import json
import sys

from f8net_jax import runtime

runtime.configure_cpu_devices()

import jax  # noqa: E402  (XLA_FLAGS is read when the backend starts)
import numpy as np  # noqa: E402
from flax import jax_utils  # noqa: E402

from f8net_jax.configs import default  # noqa: E402
from f8net_jax import steps  # noqa: E402


def run(config, devices, batches):
    model = steps.create_model(config, num_classes=10)
    lr_fn = steps.learning_rate_fn(config, steps_per_epoch=10, total_steps=10)
    state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (16, 16, 1), lr_fn)
    state = jax_utils.replicate(state, devices=devices)
    step = jax.pmap(functools.partial(steps.train_step, model=model), axis_name="batch",
                    devices=devices)
    states = []
    for batch in batches:
        sharded = {k: v.reshape((len(devices), -1) + v.shape[1:]) for k, v in batch.items()}
        state, _ = step(state, sharded)
        states.append(jax.device_get(steps.unreplicate(state)))
    return states


def max_diff(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max((float(np.max(np.abs(x - y))) for x, y in pairs), default=0.0)


def main(mode):
    config = default.get_config()
    config.quant.mode = mode
    config.quant.rescale_classifier = False
    # XLA computes each conv output element in the same order whatever the batch split;
    # oneDNN may not, and this network amplifies an ulp in a weight gradient to a few
    # percent (measured: a 1e-7 relative change of the parameters moves some gradients by
    # 3%), so the per-element check runs on XLA.
    config.quant.conv_backend = "xla"
    config.batch_size = 16
    config.learning_rate = 0.05
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
                "label": rng.integers(0, 10, 16).astype(np.int32),
                "mask": np.ones(16, bool)} for _ in range(3)]
    many = run(config, jax.devices(), batches)
    one = run(config, jax.devices()[:1], batches)
    report = {"devices": jax.device_count(), "steps": []}
    for a, b in zip(many, one):
        report["steps"].append({col: max_diff(getattr(a, col), getattr(b, col))
                                for col in ("params", "batch_stats", "quant_stats")})
    report["params_moved"] = max_diff(one[-1].params, many[0].params)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
