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


def plot(summary: list, path: str, title: str, rows: list = ()) -> None:
    """Bars of the mean with one-std error bars, each seed as a dot. The axis spans the
    settings near the median; a setting far below it is cut at the axis and labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s[0] for s in summary]
    means = [s[2] for s in summary]
    stds = [0.0 if math.isnan(s[3]) else s[3] for s in summary]
    seeds = {n: [float(r["top1"]) for r in rows if r["setting"] == n] for n in names}
    middle = sorted(means)[len(means) // 2]
    near = [m for m in means if m > middle - 5.0]
    low = max(0.0, min(min(near) - 1.0, min(v for n in names for v in seeds[n] or [middle]
                                            if v > middle - 5.0) - 0.5))
    cut = [m < low or any(v < low for v in seeds[n]) for n, m in zip(names, means)]
    high = min(100.0, max(m + s for m, s, c in zip(means, stds, cut) if not c) + 0.5)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    colors = ["#888888" if n == "fp" else "#1f77b4" for n in names]
    ax.bar(range(len(names)), [max(m, low) for m in means], color=colors)
    kept = [i for i in range(len(names)) if not cut[i]]
    ax.errorbar(kept, [means[i] for i in kept], yerr=[stds[i] for i in kept], fmt="none",
                ecolor="black", capsize=4)
    for i, n in enumerate(names):
        shown = [v for v in seeds[n] if v >= low]
        ax.plot([i] * len(shown), shown, "o", color="#d62728", markersize=3)
        if cut[i]:
            below = ", ".join(f"{v:.1f}%" for v in seeds[n] if v < low)
            ax.annotate(f"mean {means[i]:.1f}%\n(a seed at\n{below})", (i, low),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7,
                        va="bottom", color="#d62728")
    ax.set_ylim(low, high)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=10)
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
    plot(summary, stem + ".png", args.title or os.path.basename(stem), rows)
    print(table, end="")
    print(f"wrote {stem}.md and {stem}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
