"""The demo: full-precision ResNet-20, then F8Net initialized from it, on Fashion-MNIST.

    python -m f8net_jax.demo --workdir=workdirs/demo [--dataset=fashion_mnist_offline]

Trains configs/fashion_mnist_resnet20_fp.py, then configs/fashion_mnist_resnet20_f8.py with
init_from pointing at the first run, and prints test top-1 of both, the training
throughput, and the per-layer formats the fixed-point model chose. Falls back to the
5,000 MNIST digits (mnist5k) when the Fashion-MNIST files are not installed. Rerunning
resumes (finished runs are only evaluated).
"""

import json
import logging as python_logging
import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/demo", "Where both runs keep their checkpoints.")
flags.DEFINE_string("dataset", "fashion_mnist_offline", "fashion_mnist_offline or mnist5k.")


def _configs(dataset: str):
    from f8net_jax import configs
    from f8net_jax.run_config import load_config_file

    fp, f8 = (load_config_file(configs.path(f"fashion_mnist_resnet20_{mode}"))
              for mode in ("fp", "f8"))
    for config in (fp, f8):
        config.dataset = dataset
    return fp, f8


def format_table(formats: dict) -> str:
    lines = [f"{'layer':<28} {'input fl':>8} {'weight fl':>9} {'alpha':>8}"]
    for layer, f in formats.items():
        alpha = f"{f['alpha']:.3f}" if "alpha" in f else "-"
        lines.append(f"{layer:<28} {f['input_fraclen']:>8.0f} {f['weight_fraclen']:>9.0f} "
                     f"{alpha:>8}")
    return "\n".join(lines)


def main(argv):
    del argv
    logging.get_absl_logger().addFilter(
        lambda r: "/orbax/" not in r.pathname or r.levelno >= python_logging.WARNING)
    from f8net_jax import runtime, train

    runtime.configure_cpu_devices()
    from f8net_jax.data import builders

    dataset = FLAGS.dataset
    if dataset == "fashion_mnist_offline":
        try:
            builders.fashion_mnist_arrays(builders.FASHION_MNIST_DIR, "test")
        except FileNotFoundError as e:
            print(f"{e}\nFalling back to mnist5k.", file=sys.stderr)
            dataset = "mnist5k"
    fp, f8 = _configs(dataset)
    fp_dir, f8_dir = os.path.join(FLAGS.workdir, "fp"), os.path.join(FLAGS.workdir, "f8")
    f8.init_from = fp_dir
    start = time.time()
    fp_result = train.train_and_evaluate(fp, fp_dir)
    fp_time = time.time() - start
    f8_result = train.train_and_evaluate(f8, f8_dir)
    total = time.time() - start
    formats = json.load(open(os.path.join(f8_dir, "formats.json")))["layers"]
    print()
    print(f"ResNet-20 on {dataset} ({fp.num_epochs} float epochs, then {f8.num_epochs} "
          f"fixed-point epoch(s) from the float weights)")
    print(f"{'model':<24} {'test top-1':>10} {'train images/s':>15}")
    print(f"{'full precision (PACT)':<24} {100 * fp_result['eval_accuracy']:>9.2f}% "
          f"{fp_result.get('train_images_per_sec', float('nan')):>15.0f}")
    print(f"{'F8Net fixed point':<24} {100 * f8_result['eval_accuracy']:>9.2f}% "
          f"{f8_result.get('train_images_per_sec', float('nan')):>15.0f}")
    print()
    print("Per-layer formats of the fixed-point model (eval):")
    print(format_table(formats))
    print(f"\nwall time: {total:.0f} s (float {fp_time:.0f} s, fixed point {total - fp_time:.0f} s)")


if __name__ == "__main__":
    app.run(main)
