"""Exports a training workdir's fixed-point model to an integer program.

    python -m f8net_jax.integer.export_program --workdir=DIR --output=FILE [--jax_export_batch=N]

writes FILE.json (op graph, formats, static checks) and FILE.npz (int8 weights, int32
biases); with --jax_export_batch also FILE.jaxexport, the executor for batches of N uint8
images serialized with jax.export (for CPU and CUDA). Nothing is written if the export
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from f8net_jax.integer import cli
from f8net_jax.integer.executor import serialize
from f8net_jax.integer.program import file_paths, save


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m f8net_jax.integer.export_program",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (fixed point)")
    parser.add_argument("--output", required=True, help="FILE: writes FILE.json and FILE.npz; "
                        "a folder (or a path ending in /): writes <model>.json/.npz in it")
    parser.add_argument("--jax_export_batch", type=int, default=0,
                        help="also write FILE.jaxexport for batches of this many images")
    args = parser.parse_args(argv)
    if args.jax_export_batch < 0:
        cli.fail(f"--jax_export_batch must be >= 0 (0: none), got {args.jax_export_batch}")
    output = args.output
    if output.endswith(os.sep) or os.path.isdir(output):  # a folder: <model>.json inside
        try:
            output = os.path.join(output, json.load(open(os.path.join(
                args.workdir, "config.json")))["model"])
        except (OSError, ValueError, KeyError) as e:
            cli.fail(f"{args.workdir}: cannot read the model name from config.json ({e})")
    artifact = os.path.splitext(file_paths(output)[0])[0] + ".jaxexport"
    tmp = artifact + ".partial"
    try:
        _, variables, config, image_shape = cli.load_fixed_point(args.workdir)
        program = cli.export_loaded(variables, config, image_shape)
        if args.jax_export_batch:
            os.makedirs(os.path.dirname(os.path.abspath(artifact)), exist_ok=True)
            with open(tmp, "wb") as f:  # written aside first, renamed once the program is
                f.write(serialize(program, args.jax_export_batch))
        json_path, npz_path = save(program, output)
        written = [json_path, npz_path]
        if args.jax_export_batch:
            os.replace(tmp, artifact)
            written.append(artifact)
        elif os.path.exists(artifact):  # an older export's executor: it no longer matches
            os.remove(artifact)
            written.append(f"(removed the stale {artifact})")
    except cli.ERRORS as e:
        cli.fail(str(e))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for line in cli.describe(program):
        print(line)
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main(sys.argv[1:])
