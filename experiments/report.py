"""The ablation table (markdown) and bar plot, regenerated from the launcher's CSV.

    python -m experiments.report --csv=experiments/results/fashion_mnist_ablations.csv

writes NAME.md (mean +- sample std of test top-1 per setting over its seeds, the integer
executor's top-1 and whether it equals the simulation's on every seed) and NAME.png (bars
with error bars of one std) beside the CSV, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

from experiments.ablations import SETTINGS


def summarize(rows: list) -> list:
    """Per setting, in the launcher's order: (setting, n, mean, std, integer mean, all
    integer runs equal to the simulation, or None for float runs)."""
    by_setting: dict = {}
    for row in rows:
        by_setting.setdefault(row["setting"], []).append(row)
    order = [s for s in SETTINGS if s in by_setting] + sorted(set(by_setting) - set(SETTINGS))
    out = []
    for setting in order:
        runs = by_setting[setting]
        top1 = [float(r["top1"]) for r in runs]
        mean = sum(top1) / len(top1)
        std = (math.sqrt(sum((v - mean) ** 2 for v in top1) / (len(top1) - 1))
               if len(top1) > 1 else float("nan"))
        ints = [r for r in runs if r.get("integer_top1", "") != ""]
        if ints:
            int_mean = sum(float(r["integer_top1"]) for r in ints) / len(ints)
            equal = all(r["integer_exact"] == "True"
                        and abs(float(r["integer_top1"]) - float(r["top1"])) < 0.006
                        for r in ints)
        else:
            int_mean, equal = None, None
        out.append((setting, len(runs), mean, std, int_mean, equal))
    return out


def markdown(summary: list) -> str:
    lines = ["| setting | seeds | test top-1 (%) | integer top-1 (%) | integer = simulation |",
             "| --- | --- | --- | --- | --- |"]
    for setting, n, mean, std, int_mean, equal in summary:
        spread = f" ± {std:.2f}" if not math.isnan(std) else ""
        integer = "-" if int_mean is None else f"{int_mean:.2f}"
        same = "-" if equal is None else ("yes, every seed" if equal else "**no**")
        lines.append(f"| {setting} | {n} | {mean:.2f}{spread} | {integer} | {same} |")
    return "\n".join(lines) + "\n"


def plot(summary: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s[0] for s in summary]
    means = [s[2] for s in summary]
    stds = [0.0 if math.isnan(s[3]) else s[3] for s in summary]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    colors = ["#888888" if n == "fp" else "#1f77b4" for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    low = min(m - s for m, s in zip(means, stds))
    high = max(m + s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 2 * (high - low + 0.1)), min(100.0, high + 0.5 * (high - low + 0.1)))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    if "fp" in names:
        ax.axhline(means[names.index("fp")], color="#888888", lw=0.8, ls="--")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--csv", required=True, help="the launcher's results CSV")
    parser.add_argument("--title", default="", help="plot title (default: the CSV's name)")
    args = parser.parse_args(argv)
    if not os.path.exists(args.csv):
        sys.exit(f"experiments.report: {args.csv} does not exist")
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"setting", "seed", "top1"} - set(rows[0] if rows else {})
    if not rows or missing:
        sys.exit(f"experiments.report: {args.csv} has no rows with setting, seed, top1")
    summary = summarize(rows)
    stem = os.path.splitext(args.csv)[0]
    table = markdown(summary)
    with open(stem + ".md", "w") as f:
        f.write(table)
    plot(summary, stem + ".png", args.title or os.path.basename(stem))
    print(table, end="")
    print(f"wrote {stem}.md and {stem}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
