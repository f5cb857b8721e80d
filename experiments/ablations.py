"""The paper's ablations as one launcher: named settings (sets of config overrides) over a
base config, each run for several seeds, every finished result appended to a CSV at once.

    python -m experiments.ablations --base=configs/fashion_mnist_resnet20_f8.py \
        --workdir=workdirs/ablations [--settings=fp,f8,f8_grid] [--seeds=0,1] \
        [--fp_epochs=3 --f8_epochs=1 --set=train_examples=20000] \
        [--results=experiments/results/fashion_mnist_ablations.csv]

``--base`` is the fixed-point config (e.g. configs/imagenet_resnet18_f8.py on a pod);
the full-precision run uses ``--fp_base``, by default the base's name with ``_f8``
replaced by ``_fp`` (configs/imagenet_resnet18_fp.py), else the base in float mode. The
settings (``SETTINGS``; the names are the ``setting`` column of the results):

* ``fp``: full precision with PACT clipping (the fp config);
* ``f8``: the paper's conventional recipe from the ``fp`` run of the same seed: std rule,
  per-layer formats, PACT, shared clipping levels;
* ``f8_mae``, ``f8_rms``, ``f8_grid``: the other format rules (METHOD.md 2);
* ``f8_per_channel``: per-output-channel weight formats;
* ``f8_no_clip``: no PACT (s = 1);
* ``f8_no_sharing``: every layer its own alpha, also the readers of a residual stream
  (quant.share_alpha=False); alphas the fp run lacks start at alpha_init;
* ``f8_consistent_clip``: the consistent training scale of METHOD.md 8.6;
* ``f8_scratch``: fixed point from random initialization for fp + f8 epochs, at the fp
  config's learning rate;
* ``tiny_ft``: tiny fine-tuning from the ``fp`` run: no clipping, grid-searched formats,
  ``--tiny_steps`` steps at the constant ``--tiny_lr`` (METHOD.md 7; ResNet-18's recipe is
  100 steps at lr 0: only BatchNorm statistics and input formats are re-estimated);
* ``f8_wide_fraclen``: ``f8`` with weight formats whose fraclen may pass the word length
  (quant.wide_fraclen, beyond the paper).

Each run lives in WORKDIR/<setting>/seed<k>/ (a training workdir: resumes when killed)
and, once finished, holds result.json: setting, seed, test top-1 (%), for fixed-point runs
the integer executor's top-1 on the same eval images and whether its logits and every
intermediate tensor equal the simulation's (checked on the first 256 images), wall time,
the machine and its load, the git commit, and the full config. Finished runs are
skipped; the CSV gets its row the moment a run finishes (and any finished run missing from
it is appended at the next start), so nothing finished is lost or rerun. The table and the
plot come from the CSV: ``python -m experiments.report``.
"""

from __future__ import annotations

import copy
import csv
import json
import logging as python_logging
import os
import sys
import time

from absl import app, flags, logging

from f8net_jax.run_config import load_config_file as load_config

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "Fixed-point config file (configs/*_f8.py).")
flags.DEFINE_string("fp_base", "", "Full-precision config file (default: from --base).")
flags.DEFINE_string("workdir", None, "Folder of all runs.")
flags.DEFINE_list("settings", [], "Settings to run (default: all, in order).")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds.")
flags.DEFINE_string("results", "", "CSV of results (default: WORKDIR/results.csv).")
flags.DEFINE_multi_string("set", [], "field=value override of every run's config, e.g. "
                          "train_examples=20000 or quant.precision=bfloat16.")
flags.DEFINE_integer("fp_epochs", 0, "Epochs of the fp run (0: the fp config's).")
flags.DEFINE_integer("f8_epochs", 0, "Epochs of each run from fp (0: the base config's).")
flags.DEFINE_integer("tiny_steps", 100, "Steps of tiny_ft.")
flags.DEFINE_float("tiny_lr", 0.0, "Constant learning rate of tiny_ft.")
flags.DEFINE_bool("integer", True, "Run each fixed-point model's integer program on the "
                  "eval split and check it against the simulation.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (run the "
                  "same command on every host of a pod; process 0 writes the results).")
flags.mark_flags_as_required(["base", "workdir"])

# name: (start from the fp run?, config overrides). 'fp' and 'f8_scratch' are special
# in budget and learning rate (see build_config).
SETTINGS = {
    "fp": (False, {"quant.mode": "float"}),
    "f8": (True, {}),
    "f8_mae": (True, {"quant.format_rule": "mae"}),
    "f8_rms": (True, {"quant.format_rule": "rms"}),
    "f8_grid": (True, {"quant.format_rule": "grid"}),
    "f8_per_channel": (True, {"quant.granularity": "channel"}),
    "f8_no_clip": (True, {"quant.clipping": False}),
    "f8_no_sharing": (True, {"quant.share_alpha": False}),
    "f8_consistent_clip": (True, {"quant.consistent_clip": True}),
    "f8_scratch": (False, {}),
    "tiny_ft": (True, {"quant.clipping": False, "quant.format_rule": "grid",
                       "lr_schedule": "constant"}),
    "f8_wide_fraclen": (True, {"quant.wide_fraclen": True}),
}
CSV_FIELDS = ("setting", "seed", "top1", "integer_top1", "integer_exact", "wall_s")


def fp_config_path(base: str, fp_base: str = "") -> str:
    if fp_base:
        return fp_base
    guess = base.replace("_f8", "_fp")
    return guess if guess != base and os.path.isfile(guess) else ""


def _parse_value(text: str, current):
    """A command-line value in the type of the field it replaces."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a bool, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float, str)):
        return type(current)(text)
    if isinstance(current, (tuple, list)):
        return tuple(int(v) for v in text.strip("()").split(","))
    raise ValueError(f"cannot override a field of type {type(current).__name__}")


def apply_overrides(config, overrides: dict) -> None:
    for path, value in overrides.items():
        node, *rest = path.split(".")
        target, key = config, path
        if rest:
            target, key = config[node], rest[0]
        if key not in target:
            raise ValueError(f"config field {path!r} does not exist (configs/default.py)")
        if isinstance(value, str) and not isinstance(target[key], str):
            try:
                value = _parse_value(value, target[key])
            except ValueError as e:
                raise ValueError(f"--set {path}={value}: {e}") from None
        target[key] = value


def build_config(setting: str, seed: int, *, base: str, fp_base: str, workdir: str,
                 sets=(), fp_epochs: int = 0, f8_epochs: int = 0, tiny_steps: int = 100,
                 tiny_lr: float = 0.0):
    """The full config of one run (``setting`` at ``seed``)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; the settings are {list(SETTINGS)}")
    from_fp, overrides = SETTINGS[setting]
    fp_path = fp_config_path(base, fp_base)
    fp = load_config(fp_path) if fp_path else load_config(base)
    fp.quant.mode = "float"
    fp_epochs = fp_epochs or fp.num_epochs
    if setting == "fp":
        config = fp
        config.num_epochs = fp_epochs
    else:
        config = load_config(base)
        config.quant.mode = "fixed"
        config.num_epochs = f8_epochs or config.num_epochs
    apply_overrides(config, overrides)
    if setting == "f8_scratch":  # the whole budget of fp + f8, from random weights
        config.num_epochs = fp_epochs + config.num_epochs
        config.learning_rate = fp.learning_rate
        config.init_from = ""
    if setting == "tiny_ft":
        config.num_train_steps = tiny_steps
        config.learning_rate = tiny_lr
    config.init_from = os.path.join(workdir, "fp", f"seed{seed}") if from_fp else ""
    config.seed = seed
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set needs field=value, got {item!r}")
        path, value = item.split("=", 1)
        apply_overrides(config, {path: value})
    return config


def source_commit() -> str:
    """The git commit of this checkout ('+changes' if files differ from it), or ''."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+changes" if dirty.strip() else "")


def machine() -> dict:
    import jax

    from f8net_jax import machine as this_machine

    cpu = " ".join([this_machine.cpu_model()]
                   + this_machine.x86_features(("avx512_vnni", "amx_int8")))
    return {"cpu": cpu, "cores": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()], "load_avg": os.getloadavg()}


def integer_check(run_dir: str, verify_images: int = 256) -> dict:
    """The integer program of a fixed-point run: its top-1 over the eval images the run's
    own evaluation saw (the executor alone), and on the first ``verify_images`` of them
    whether the logits and every intermediate tensor equal the simulation's."""
    import jax
    import numpy as np

    from f8net_jax.integer import Executor, cli
    from f8net_jax.integer.verification import Verifier
    from f8net_jax.integer.verify_program import eval_images

    with jax.default_matmul_precision("highest"):
        model, variables, config, image_shape = cli.load_fixed_point(run_dir)
        program = cli.export_loaded(variables, config, image_shape)
        executor, verifier = Executor(program), Verifier(program, model, variables)
        correct = seen = 0
        for i, (images, labels) in enumerate(eval_images(config)):
            if 0 <= config.eval_batches <= i:
                break
            logits = np.asarray(executor(images))
            correct += int(np.sum(np.argmax(logits, axis=-1) == labels))
            seen += len(images)
            if verifier.report.images < verify_images:
                n = verify_images - verifier.report.images
                verifier.batch(images[:n], labels[:n])
    report = verifier.report
    return {"integer_top1": 100.0 * correct / seen, "integer_images": seen,
            "integer_exact": bool(report.exact), "integer_verified_images": report.images,
            "integer_line": report.last_line()}


def _read_rows(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: str, result: dict) -> None:
    """Appends one finished run to the CSV (header first if new), flushed to disk."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        row = dict(result)
        for key in ("top1", "integer_top1"):
            if isinstance(row.get(key), float):
                row[key] = f"{row[key]:.2f}"
        row["wall_s"] = f"{row['wall_s']:.0f}"
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def run_one(setting: str, seed: int, config, run_dir: str, integer: bool,
            chief: bool = True, commit: str = "") -> dict:
    from f8net_jax import train

    resumed = os.path.isdir(os.path.join(run_dir, "checkpoints"))
    start = time.time()
    load_before = os.getloadavg()
    metrics = train.train_and_evaluate(config, run_dir)
    train_s = time.time() - start
    result = {"setting": setting, "seed": seed, "top1": 100.0 * metrics["eval_accuracy"],
              "integer_top1": "", "integer_exact": "", "train_s": train_s,
              "resumed": resumed, "load_avg_before": load_before}
    if integer and config.quant.mode == "fixed":
        result.update(integer_check(run_dir))
        if abs(result["integer_top1"] - result["top1"]) > 1e-3 or not result["integer_exact"]:
            logging.warning("%s seed %d: integer top-1 %.2f%% vs simulation %.2f%% (exact: %s)",
                            setting, seed, result["integer_top1"], result["top1"],
                            result["integer_exact"])
    result["wall_s"] = time.time() - start
    result["machine"] = machine()
    result["commit"] = commit  # of the code this process loaded, at its start
    result["config"] = json.loads(config.to_json_best_effort())
    if not chief:
        return result
    tmp = os.path.join(run_dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "result.json"))
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_logger().addFilter(
        lambda r: "/orbax/" not in r.pathname or r.levelno >= python_logging.WARNING)
    from f8net_jax import runtime

    runtime.configure_cpu_devices()
    import jax
    if FLAGS.distributed:
        jax.distributed.initialize()
    chief = jax.process_index() == 0
    commit = source_commit()
    settings = FLAGS.settings or list(SETTINGS)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        sys.exit(f"experiments.ablations: unknown setting(s) {unknown}; the settings are "
                 f"{list(SETTINGS)}")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        sys.exit(f"experiments.ablations: --seeds must be integers, got {FLAGS.seeds}")
    results = FLAGS.results or os.path.join(FLAGS.workdir, "results.csv")
    common = dict(base=FLAGS.base, fp_base=FLAGS.fp_base, workdir=FLAGS.workdir,
                  sets=FLAGS.set, fp_epochs=FLAGS.fp_epochs, f8_epochs=FLAGS.f8_epochs,
                  tiny_steps=FLAGS.tiny_steps, tiny_lr=FLAGS.tiny_lr)
    # Every config first, so that a bad flag fails before any training.
    plan = []
    try:
        for seed in seeds:
            for setting in settings:
                plan.append((setting, seed, build_config(setting, seed, **common)))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"experiments.ablations: {e}")
    from f8net_jax import run_config
    for setting, seed, config in plan:
        try:
            check = copy.deepcopy(config)
            check.init_from = ""  # the fp run it starts from may not exist yet
            run_config.check_config(check)
        except ValueError as e:
            sys.exit(f"experiments.ablations: setting {setting}: {e}")
    # Finished runs missing from the CSV (a launcher killed between the two writes).
    listed = {(r["setting"], r["seed"]) for r in _read_rows(results)}
    for setting, seed, _ in plan:
        path = os.path.join(FLAGS.workdir, setting, f"seed{seed}", "result.json")
        if chief and os.path.exists(path) and (setting, str(seed)) not in listed:
            append_row(results, json.load(open(path)))
    # fp runs first: the others start from them.
    plan.sort(key=lambda item: (item[0] != "fp", item[1]))
    for setting, seed, config in plan:
        run_dir = os.path.join(FLAGS.workdir, setting, f"seed{seed}")
        if os.path.exists(os.path.join(run_dir, "result.json")):
            logging.info("%s seed %d: finished, skipped", setting, seed)
            continue
        if config.init_from and not os.path.exists(os.path.join(config.init_from,
                                                                "result.json")):
            sys.exit(f"experiments.ablations: {setting} seed {seed} starts from "
                     f"{config.init_from}, which has not finished: include 'fp' in --settings")
        logging.info("%s seed %d: training in %s", setting, seed, run_dir)
        try:
            result = run_one(setting, seed, config, run_dir, FLAGS.integer, chief, commit)
        except (ValueError, FileNotFoundError, FloatingPointError) as e:
            sys.exit(f"experiments.ablations: {setting} seed {seed}: {e}")
        if chief:
            append_row(results, result)
        if jax.process_count() > 1:  # the others wait for result.json before going on
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"ablations {setting} {seed}")
        if not chief:
            continue
        print(f"{setting} seed {seed}: top-1 {result['top1']:.2f}%"
              + (f", integer {result['integer_top1']:.2f}% (exact: {result['integer_exact']})"
                 if result["integer_top1"] != "" else "")
              + f", {result['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
