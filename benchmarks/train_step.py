"""Training step time of full precision and F8Net fixed point, in one process, alternating;
optionally beside the official PyTorch code's step of the same shape, in the same run.

    python benchmarks/train_step.py --model=resnet18 --batch=8 --image_size=224 \
        [--channels=3 --num_classes=1000 --steps=10 --warmup=2] \
        [--precision=float32 --conv_backend=auto] \
        [--official=DIR --torch_python=PY [--official_float]] [--json=FILE]

Our step is the pmapped ``steps.train_step`` (forward, both passes of every quantized
layer in fixed point, backward, SGD) on one fixed batch of random uint8 images, on all
local devices. Each engine is compiled (ahead of time, timed) and warmed up; then
``--steps`` rounds each time one step of every engine in turn (block_until_ready), and
the median is reported. Memory: XLA's own accounting of each compiled step (arguments,
outputs, temporaries) and the process's peak RSS.

``--official`` (default $OFFICIAL_F8NET): an unmodified tree of snap-research/F8Net;
``--torch_python`` (default $TORCH_PYTHON): a Python with CPU torch and pyyaml. The
official step runs in a worker process (benchmarks/official_step.py) that steps when
told, so its steps interleave with ours. The last lines are
``ours/official f8 step time ratio: R`` (with --official) and ``f8/fp step time ratio: R``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from flax import jax_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from f8net_jax.configs import default  # noqa: E402
from f8net_jax import machine, steps  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model() -> str:
    return machine.describe()


class Ours:
    """One of our modes: compiled pmapped step, its state and batch."""

    def __init__(self, mode: str, args):
        config = default.get_config()
        config.model, config.quant.mode, config.batch_size = args.model, mode, args.batch
        config.quant.precision, config.quant.conv_backend = args.precision, args.conv_backend
        self.name = f"ours {'f8' if mode == 'fixed' else 'float'}"
        self.backend = steps.quant_config(config).compute.resolve()
        devices = jax.local_device_count()
        if args.batch % devices:
            raise SystemExit(f"--batch {args.batch} must be a multiple of the {devices} devices")
        model = steps.create_model(config, num_classes=args.num_classes)
        shape = (args.image_size, args.image_size, args.channels)
        lr_fn = steps.learning_rate_fn(config, steps_per_epoch=100, total_steps=100)
        self.state = jax_utils.replicate(
            steps.create_train_state(jax.random.PRNGKey(0), config, model, shape, lr_fn))
        rng = np.random.default_rng(0)
        per_device = args.batch // devices
        self.batch = {
            "image": rng.integers(0, 256, (devices, per_device) + shape, dtype=np.uint8),
            "label": rng.integers(0, args.num_classes, (devices, per_device)).astype(np.int32),
            "mask": np.ones((devices, per_device), bool)}
        step = steps.pmap_train_step(model)
        start = time.perf_counter()
        self.step = step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.memory = _memory(self.step)
        self.loss = None
        for _ in range(args.warmup):
            self.run(1)

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        self.loss = float(steps.unreplicate(metrics).compute()["loss"])
        return times


def _memory(compiled) -> str:
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        return f"{total / 2**20:.0f} MiB (temp {m.temp_size_in_bytes / 2**20:.0f})"
    except Exception:  # not every backend reports it
        return "n/a"


class Official:
    """The official PyTorch step in a worker process (benchmarks/official_step.py)."""

    def __init__(self, mode: str, args):
        self.name = f"official {'f8' if mode == 'fixed' else 'floating'}"
        command = [args.torch_python, os.path.join(HERE, "official_step.py"),
                   f"--official={args.official}", f"--model={args.model}", f"--mode={mode}",
                   f"--batch={args.batch}", f"--image_size={args.image_size}",
                   f"--num_classes={args.num_classes}", f"--threads={args.threads}",
                   f"--warmup={args.warmup}"]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            raise SystemExit(f"{self.name} worker failed: {err[-1] if err else 'no output'}")
        self.info = json.loads(line)
        self.compile_s = self.info["build_and_warmup_s"]
        self.memory = "n/a"
        self.loss = None

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        self.loss = reply["loss"]
        return reply["times"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (>= 1)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="float32", help="config.quant.precision")
    parser.add_argument("--conv_backend", default="auto", help="config.quant.conv_backend")
    parser.add_argument("--official", default=os.environ.get("OFFICIAL_F8NET", ""))
    parser.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON", ""))
    parser.add_argument("--official_float", action="store_true",
                        help="also time the official 'floating' step")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.official:
        if not os.path.isfile(os.path.join(args.official, "fix_train.py")):
            parser.error(f"--official {args.official!r} is not a tree of snap-research/F8Net "
                         "(no fix_train.py)")
        if not args.torch_python:
            parser.error("--official needs --torch_python (or $TORCH_PYTHON): a Python with torch")
        if args.channels != 3:
            parser.error("the official models read 3-channel images: use --channels=3")
        args.official = os.path.abspath(args.official)

    load_start = os.getloadavg()
    engines = []
    if args.official:  # built first: its build does not overlap our compiles
        engines.append(Official("fixed", args))
        if args.official_float:
            engines.append(Official("float", args))
    engines = [Ours("float", args), Ours("fixed", args)] + engines
    times = {e.name: [] for e in engines}
    for _ in range(args.steps):
        for engine in engines:
            times[engine.name] += engine.run(1)
    load_end = os.getloadavg()
    for engine in engines:
        if isinstance(engine, Official):
            engine.close()

    median = {name: statistics.median(t) for name, t in times.items()}
    ours = engines[0]
    print(f"machine: {cpu_model()}; jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"x{jax.local_device_count()}; load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    print(f"{args.model} {args.image_size}x{args.image_size}x{args.channels}, "
          f"{args.num_classes} classes, batch {args.batch}; our conv backend {ours.backend}, "
          f"precision {args.precision}; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'engine':18s} {'compile s':>9s} {'median s':>9s} {'min s':>7s} {'max s':>7s} "
          f"{'img/s':>8s} {'loss':>8s}  memory")
    for engine in engines:
        t = times[engine.name]
        print(f"{engine.name:18s} {engine.compile_s:9.1f} {median[engine.name]:9.3f} "
              f"{min(t):7.3f} {max(t):7.3f} {args.batch / median[engine.name]:8.1f} "
              f"{engine.loss:8.3f}  {engine.memory}")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    ratios = {"f8/fp": median["ours f8"] / median["ours float"]}
    if args.official:
        ratios["ours/official f8"] = median["ours f8"] / median["official f8"]
        print(f"ours/official f8 step time ratio: {ratios['ours/official f8']:.2f}")
    print(f"f8/fp step time ratio: {ratios['f8/fp']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": cpu_model(), "jax": jax.__version__,
                       "load_average": [load_start[0], load_end[0]], "median_s": median,
                       "times_s": times, "compile_s": {e.name: e.compile_s for e in engines},
                       "ratios": ratios, "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
