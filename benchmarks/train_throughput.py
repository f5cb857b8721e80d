"""Training throughput of full precision and F8Net fixed point, measured in one run.

    python benchmarks/train_throughput.py [--model resnet20 --image_size 28 --channels 1
                                          --batch_size 128 --steps 10]

Times the pmapped train step (forward, both BatchNorm passes in fixed point, backward,
optimizer) on random uint8 images after two warm-up steps (both compile), on all local
devices. Prints images/s of each mode and, as its last line,
`fixed/float train throughput ratio: R`. Needs no TensorFlow.
"""

import argparse
import functools
import time

import jax
import numpy as np
from flax import jax_utils

from configs import default
from f8net_jax import train


def images_per_second(mode: str, args) -> float:
    config = default.get_config()
    config.model, config.quant.mode, config.batch_size = args.model, mode, args.batch_size
    devices = jax.local_device_count()
    model = train.create_model(config, num_classes=args.num_classes)
    shape = (args.image_size, args.image_size, args.channels)
    lr_fn = train.learning_rate_fn(config, steps_per_epoch=100, total_steps=100)
    state = jax_utils.replicate(
        train.create_train_state(jax.random.PRNGKey(0), config, model, shape, lr_fn))
    step = jax.pmap(functools.partial(train.train_step, model=model), axis_name="batch",
                    donate_argnums=(0,))
    rng = np.random.default_rng(0)
    per_device = args.batch_size // devices
    batch = {"image": rng.integers(0, 256, (devices, per_device) + shape, dtype=np.uint8),
             "label": rng.integers(0, args.num_classes, (devices, per_device)).astype(np.int32),
             "mask": np.ones((devices, per_device), bool)}
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rates = {mode: images_per_second(mode, args) for mode in ("float", "fixed")}
    print(f"device: {jax.devices()[0].device_kind} x{jax.local_device_count()}, {args.model} "
          f"{args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size}")
    for mode, rate in rates.items():
        print(f"{mode:>6} train: {rate:9.1f} images/s ({args.batch_size / rate * 1e3:.1f} ms/step)")
    print(f"fixed/float train throughput ratio: {rates['fixed'] / rates['float']:.2f}")


if __name__ == "__main__":
    main()
