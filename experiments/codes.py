"""How much of the 8-bit codes the weights of trained fixed-point runs use, and what wide
fraclens change: per run, from its latest checkpoint's eval forward, the weight fraclens
the rule chose, the largest |code| per layer, the effective bits log2(2 max|q| + 1) and
the relative quantization error ||W_f - Q(W_f)|| / ||W_f|| of the folded weights.

    python -m experiments.codes --workdir=workdirs/ablations [--settings=f8,f8_wide_fraclen]
        [--output=experiments/results/fashion_mnist_codes.md]

Averages are over the conv and dense layers of a run, then over its seeds.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np


def layer_codes(run_dir: str) -> list:
    """Per conv/dense layer: (name, weight fraclens, max |code|, effective bits, relative
    quantization error)."""
    import jax

    from f8net_jax import analysis
    from f8net_jax import fixed_point as fp
    from f8net_jax.integer import cli

    model, variables, config, image_shape = cli.load_fixed_point(run_dir)
    table = analysis.layer_formats(model, variables, image_shape,
                                   collections=("formats", "folded"))
    wide = bool(config.quant.get("wide_fraclen", False))
    rows = []
    for name, entry in table.items():
        if "weight" not in entry or "weight_fraclen" not in entry:
            continue
        w = np.asarray(entry["weight"], np.float32)
        fl = np.asarray(entry["weight_fraclen"], np.float32)
        axis = -1 if fl.ndim else None
        q = np.asarray(jax.jit(lambda w, fl: fp.quantize(
            w, fl, signed=True, axis=axis, wide=wide))(w, fl))
        codes = np.round(q * np.exp2(np.broadcast_to(fl, w.shape[-1:]) if fl.ndim else fl))
        top = float(np.max(np.abs(codes)))
        error = float(np.linalg.norm(w - q) / max(np.linalg.norm(w), 1e-30))
        rows.append((name, fl.ravel().tolist(), top, float(np.log2(2 * top + 1)), error))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.codes",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the ablation launcher's workdir")
    parser.add_argument("--settings", default="f8,f8_wide_fraclen")
    parser.add_argument("--output", default="", help="markdown file to write the table to")
    args = parser.parse_args(argv)
    lines = ["| setting | seeds | weight fraclens | mean max \\|code\\| | mean effective bits "
             "| mean relative weight error |", "| --- | --- | --- | --- | --- | --- |"]
    for setting in args.settings.split(","):
        runs = sorted(glob.glob(os.path.join(args.workdir, setting, "seed*", "result.json")))
        if not runs:
            sys.exit(f"experiments.codes: no finished run of {setting!r} in {args.workdir}")
        per_seed = [layer_codes(os.path.dirname(r)) for r in runs]
        fls = [v for rows in per_seed for row in rows for v in row[1]]
        mean = lambda k: float(np.mean([np.mean([row[k] for row in rows]) for rows in per_seed]))
        lines.append(f"| {setting} | {len(runs)} | {int(min(fls))}..{int(max(fls))} | "
                     f"{mean(2):.1f} | {mean(3):.2f} | {mean(4):.4f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
