"""Exports a training workdir's fixed-point model to an integer program.

    python -m f8net_jax.integer.export --workdir=DIR --output=FILE [--jax_export_batch=N]

writes FILE.json (op graph, formats, static checks) and FILE.npz (int8 weights, int32
biases); with --jax_export_batch also FILE.jaxexport, the executor for batches of N uint8
images serialized with jax.export. Nothing is written if anything fails.
"""

from __future__ import annotations

import argparse
import os
import sys

from f8net_jax.integer import cli
from f8net_jax.integer.executor import serialize
from f8net_jax.integer.program import save


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m f8net_jax.integer.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (fixed point)")
    parser.add_argument("--output", required=True, help="FILE: writes FILE.json and FILE.npz")
    parser.add_argument("--jax_export_batch", type=int, default=0,
                        help="also write FILE.jaxexport for batches of this many images")
    args = parser.parse_args(argv)
    if args.jax_export_batch < 0:
        cli.fail(f"--jax_export_batch must be positive, got {args.jax_export_batch}")
    try:
        program, _ = cli.export_workdir(args.workdir)
        serialized = serialize(program, args.jax_export_batch) if args.jax_export_batch else None
        json_path, npz_path = save(program, args.output)
        written = [json_path, npz_path]
        if serialized is not None:
            path = os.path.splitext(json_path)[0] + ".jaxexport"
            tmp = path + ".partial"
            with open(tmp, "wb") as f:
                f.write(serialized)
            os.replace(tmp, path)
            written.append(path)
    except cli.ERRORS as e:  # save() writes its two files whole or not at all
        cli.fail(str(e))
    for line in cli.describe(program):
        print(line)
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main(sys.argv[1:])
