"""Exports a training workdir's fixed-point model to an integer program.

    python -m f8net_jax.integer.export_program --workdir=DIR --output=FILE [--onnx]
                                               [--jax_export_batch=N]

writes FILE.json (op graph, formats, static checks) and FILE.npz (int8 weights, int32
biases); with --onnx also FILE.onnx, the program as a QDQ ONNX graph for ONNX Runtime or
OpenVINO (f8net_jax.integer.onnx_export; it names any op where a runtime's float32 sums
might round; OpenVINO is exact with INFERENCE_PRECISION_HINT=f32); with --jax_export_batch
also FILE.jaxexport, the executor for batches of N uint8 images serialized with jax.export
(for CPU and CUDA). Nothing is written if the export fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from f8net_jax.integer import cli, onnx_export
from f8net_jax.integer.executor import choose_backend, serialize
from f8net_jax.integer.program import file_paths, save
from f8net_jax.writers import record_backends


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m f8net_jax.integer.export_program",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (fixed point)")
    parser.add_argument("--output", required=True, help="FILE: writes FILE.json and FILE.npz; "
                        "a folder (or a path ending in /): writes <model>.json/.npz in it")
    parser.add_argument("--onnx", action="store_true",
                        help="also write FILE.onnx (uint8 NCHW images in, float logits out)")
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
    stem = os.path.splitext(file_paths(output)[0])[0]
    extras = {".jaxexport": args.jax_export_batch > 0, ".onnx": args.onnx}
    inexact = []
    try:
        _, variables, config, image_shape = cli.load_fixed_point(args.workdir)
        program = cli.export_loaded(variables, config, image_shape)
        contents = {}
        if args.jax_export_batch:
            contents[".jaxexport"] = serialize(program, args.jax_export_batch)
        if args.onnx:
            contents[".onnx"] = onnx_export.to_onnx(program, warn=False).SerializeToString()
            inexact = onnx_export.inexact_ops(program)
        for suffix, data in contents.items():  # written aside, renamed after the program
            os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
            with open(stem + suffix + ".partial", "wb") as f:
                f.write(data)
        json_path, npz_path = save(program, output)
        written = [json_path, npz_path]
        for suffix, wanted in extras.items():
            if wanted:
                os.replace(stem + suffix + ".partial", stem + suffix)
                written.append(stem + suffix)
            elif os.path.exists(stem + suffix):  # an older export's: it no longer matches
                os.remove(stem + suffix)
                written.append(f"(removed the stale {stem + suffix})")
    except cli.ERRORS as e:
        cli.fail(str(e))
    finally:
        for suffix in extras:
            if os.path.exists(stem + suffix + ".partial"):
                os.remove(stem + suffix + ".partial")
    for line in cli.describe(program):
        print(line)
    backend, why = choose_backend()
    print(record_backends(args.workdir, "export_program", {"executor here": backend, "why": why}))
    if args.onnx:
        print("onnx: exact in a runtime's float32 sums wherever they stay below 2^24; the "
              "static check cannot rule out 2^24 for " + (", ".join(inexact) or "no op"))
        print("openvino: " + onnx_export.OPENVINO)
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main(sys.argv[1:])
