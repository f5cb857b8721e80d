"""Runs a workdir's fixed-point model both ways on its eval data, integer program and
simulation, and checks they agree exactly.

    python -m f8net_jax.integer.verify_program --workdir=DIR [--num_images=N] [--program=FILE]
                                       [--layers]

Exports the workdir's latest checkpoint (or checks the saved program FILE against it),
audits the executor's jaxpr, compares the int32 logits with the simulation's eval logits
times 2^fl and every intermediate tensor with the simulation's stored values, and prints
as its last line

    integer vs simulation: agreement 100.00% top-1 over N images, max |logit diff| 0
    (int32 units), integer top-1 X.XX%

(one line). Exits non-zero unless everything agrees exactly. The simulation runs with
highest-precision float32 matmuls and convolutions.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from f8net_jax.integer import audit, cli
from f8net_jax.integer.executor import choose_backend
from f8net_jax.integer.program import load
from f8net_jax.integer.verification import Verifier
from f8net_jax.writers import record_backends


def eval_images(config):
    """Batches of (uint8 eval images, labels) of the workdir's data, padding dropped."""
    from f8net_jax import data as data_lib
    dataset = data_lib.create(config, local_devices=1)
    for batch in dataset.eval_batches():
        mask = np.asarray(batch["mask"]).reshape(-1)
        images = np.asarray(batch["image"]).reshape((-1,) + dataset.image_shape)[mask]
        labels = np.asarray(batch["label"]).reshape(-1)[mask]
        yield images, labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m f8net_jax.integer.verify_program",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (fixed point)")
    parser.add_argument("--num_images", type=int, default=0,
                        help="eval images to check (default: the whole eval split)")
    parser.add_argument("--program", default="",
                        help="a saved program to check instead of exporting the workdir")
    parser.add_argument("--layers", action="store_true",
                        help="also print each accumulating op's static bound and measured maximum")
    args = parser.parse_args(argv)
    if args.num_images < 0:
        cli.fail(f"--num_images must be >= 0 (0: the whole eval split), got {args.num_images}")
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        model, variables, config, image_shape = cli.load_fixed_point(args.workdir)
        if args.program:
            program = load(args.program)
            if program.model != config.model or tuple(program.image_shape) != image_shape:
                raise ValueError(
                    f"{args.program} is a {program.model} program for images "
                    f"{tuple(program.image_shape)}; {args.workdir} trains {config.model} "
                    f"on {image_shape}")
        else:
            program = cli.export_loaded(variables, config, image_shape)
        verifier = Verifier(program, model, variables)
        backend, why = choose_backend()  # what Verifier's executor took
        print(record_backends(args.workdir, "verify_program", {"executor": backend, "why": why}))
        problems = audit.audit(verifier.executor.jaxpr())
        for line in cli.describe(program):
            print(line)
        print("audit: " + ("the executor's jaxpr has no float value, multiplies 8-bit operands "
                           "only and never divides" if not problems else
                           f"{len(problems)} violations: " + "; ".join(problems[:5])))
        remaining = args.num_images or None
        for images, labels in eval_images(config):
            if remaining is not None:
                images, labels = images[:remaining], labels[:remaining]
                remaining -= len(images)
            if len(images):
                verifier.batch(images, labels)
            if remaining is not None and remaining <= 0:
                break
    except cli.ERRORS as e:
        cli.fail(str(e))
    report = verifier.report
    if report.images == 0:
        cli.fail(f"{args.workdir}: the eval data yielded no images")
    if args.layers:
        print(f"{'op':34s} {'static bound':>14s} {'measured max':>14s}  float32 exact  int32 safe")
        for check in program.checks():
            name = check["layer"]
            print(f"{name:34s} {check['accumulator_bound']:14,d} "
                  f"{report.observed_max.get(name, 0):14,d}  "
                  f"{'yes' if check['float32_exact'] else 'NO':>13s}  "
                  f"{'yes' if check['int32_safe'] else 'NO (saturates)':>10s}")
    worst = max(report.observed_max.items(), key=lambda kv: kv[1])
    print(f"measured: largest accumulator |{worst[1]:,}| ({worst[0]}) over "
          f"{report.images} images")
    differing = sorted(set(report.tensors_differing))
    print(f"intermediates: {report.tensors_compared - len(report.tensors_differing)}/"
          f"{report.tensors_compared} tensor comparisons exact"
          + (f"; differing: {', '.join(differing[:8])}" if differing else ""))
    print(report.last_line())
    if not report.exact or problems:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
