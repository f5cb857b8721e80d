"""Training and evaluation: the loop, its checkpoints and its logging.

    result = train_and_evaluate(config, workdir)

``train_and_evaluate`` checks the config (f8net_jax/run_config.py), builds the model and
the train state (f8net_jax/steps.py), resumes from the workdir's latest checkpoint with
the same data order (or starts from ``config.init_from``), runs the pmapped train step,
evaluates every ``eval_every_epochs`` epochs, writes metrics and per-layer formats, and
checkpoints into the workdir.
"""


import json
import math
import os
import time
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import jax_utils

from f8net_jax import data as data_lib
from f8net_jax import analysis, checkpoints, writers
from f8net_jax.run_config import check_config, check_init_from, check_same_run
from f8net_jax.steps import (TrainState, create_model, create_train_state, learning_rate_fn,
                             pmap_eval_step, pmap_train_step, quant_config, unreplicate)


# --------------------------------------------------------------------------------------
# Starting: resume, or initialize from another run.


def _first_state(config, workdir: str, model, image_shape, lr_fn) -> tuple[TrainState, int]:
    """(state, step) to start from: the workdir's latest verified checkpoint, else a new
    state, from config.init_from's weights when given."""
    state = create_train_state(jax.random.PRNGKey(config.seed), config, model, image_shape,
                               lr_fn)
    restored, start = checkpoints.restore_latest(workdir, state)
    if restored is not None:
        logging.info("Resumed from %s at step %d", workdir, start)
        return restored, start
    if config.init_from:
        state = _init_from(state, config, config.init_from)
    return state, 0


def _init_from(state: TrainState, config, init_from: str) -> TrainState:
    """Params and batch_stats of another run's newest verified checkpoint. The source must
    be the same model (its config.json); a fixed-point source is allowed into a fixed-point
    run only, and logged. Every variable of ours must be there with its shape, except the
    clipping levels a float run may lack (they keep their initial value), and the source
    may hold no variable we do not use."""
    their_mode = check_init_from(config)
    if their_mode == "fixed":
        logging.warning("config.init_from %s is a fixed-point run: starting fixed point "
                        "from fixed-point weights", init_from)
    source, step = checkpoints.restore_latest(init_from, move_aside=False)
    if source is None:
        raise FileNotFoundError(f"config.init_from {init_from!r} holds no checkpoint")
    merged = {}
    for col in ("params", "batch_stats"):
        ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(getattr(state, col)))
        theirs = flax.traverse_util.flatten_dict(source.get(col, {}))
        missing = [k for k in ours if k not in theirs
                   and not (k[-1] == "alpha" and their_mode != "fixed")]
        unused = [k for k in theirs if k not in ours]
        for problem, keys in (("lacks", missing), ("has variables this model does not use:",
                                                  unused)):
            if keys:
                shown = ", ".join(f"{col}/{'/'.join(k)}" for k in keys[:3])
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                raise ValueError(f"config.init_from {init_from!r} is not a checkpoint of this "
                                 f"model: it {problem} {shown}{more}")
        for k, v in theirs.items():
            if np.shape(v) != np.shape(ours[k]):
                raise ValueError(f"config.init_from: {col}/{'/'.join(k)} has shape "
                                 f"{np.shape(v)}, expected {np.shape(ours[k])}")
        merged[col] = flax.traverse_util.unflatten_dict(
            {k: jnp.asarray(theirs.get(k, v)) for k, v in ours.items()})
    logging.info("Initialized params and batch_stats from %s (step %d)", init_from, step)
    return state.replace(params=merged["params"], batch_stats=merged["batch_stats"])


# --------------------------------------------------------------------------------------
# The loop.


def _write_formats(writer, tensorboard, step: int, formats: dict, workdir: str) -> None:
    lines = ["| layer | input fl | weight fl | alpha |", "| --- | --- | --- | --- |"]
    for layer, f in formats.items():
        alpha = f"{f['alpha']:.4g}" if "alpha" in f else ""
        lines.append(f"| {layer} | {f.get('input_fraclen', '')} | {f.get('weight_fraclen')} | "
                     f"{alpha} |")
        tensorboard.write_scalars(step, {f"formats/{layer}/{k}": v for k, v in f.items()
                                         if isinstance(v, float)})
    writer.write_texts(step, {"formats": "\n" + "\n".join(lines)})
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "formats.json"), "w") as f:
            json.dump({"step": step, "layers": formats}, f, indent=1,
                      default=lambda a: np.asarray(a).tolist())


def _check_finite(pending, last_good: Optional[int], workdir: str) -> None:
    """Raises on the first non-finite training loss among the pending (step, metrics)."""
    for step, step_metrics in pending:
        loss = float(step_metrics.loss.compute())
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {step}: stopping; "
                                     + _kept(last_good, workdir))


def _non_finite(host_state) -> str:
    """The first variable (params, batch_stats, quant_stats, opt_state) holding a NaN or
    an infinity, or ''."""
    for col in ("params", "batch_stats", "quant_stats", "opt_state"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(host_state, col))[0]:
            a = np.asarray(leaf)
            if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
                return col + jax.tree_util.keystr(path)
    return ""


def _kept(last_good: Optional[int], workdir: str) -> str:
    if last_good is None:
        return "no checkpoint was written"
    return (f"the last good checkpoint (step {last_good}) is kept in "
            f"{os.path.join(workdir, 'checkpoints')}")


def _evaluator(config, workdir: str, model, data, writer, tensorboard):
    """evaluate(replicated state, step): the eval split's metrics (written, and returned),
    and in fixed point the per-layer formats (TensorBoard, formats.json, a table)."""
    p_eval = pmap_eval_step(model)
    fixed = quant_config(config).fixed

    def evaluate(state, step):
        collected = None
        for i, batch in enumerate(data.eval_batches()):
            if 0 <= config.eval_batches <= i:
                break
            m = unreplicate(p_eval(state, batch))
            collected = m if collected is None else collected.merge(m)
        if collected is None:
            raise ValueError("evaluation saw no batch: config.eval_batches must be -1 or "
                             "positive, and the eval split must not be empty")
        result = {f"eval_{k}": float(v) for k, v in collected.compute().items()}
        writer.write_scalars(step, result)
        if fixed:
            host = unreplicate(state)
            variables = {"params": host.params, "batch_stats": host.batch_stats,
                         "quant_stats": host.quant_stats}
            _write_formats(writer, tensorboard, step,
                           analysis.layer_formats(model, variables, data.image_shape), workdir)
        writer.flush()
        return result

    return evaluate


def _save_checkpoint(mngr, state, step: int, last_good: Optional[int], workdir: str) -> int:
    """Saves the replicated ``state`` at ``step`` unless it holds a non-finite value (then
    raises); returns ``step``, the new last good checkpoint."""
    host_state = jax.device_get(unreplicate(state))
    bad = _non_finite(host_state)
    if bad:
        raise FloatingPointError(f"non-finite values in {bad} at step {step}: stopping; "
                                 + _kept(last_good, workdir))
    checkpoints.save(mngr, step, host_state)
    return step


def _train_loop(config, workdir: str, data, state, start: int, total_steps: int, *, p_train,
                lr_fn, mngr, writer, report, evaluate) -> dict:
    """Steps start + 1 .. total_steps of the replicated ``state``: train metrics every
    log_every_steps, checkpoints at every epoch's end (and every checkpoint_every_steps),
    evaluations every eval_every_epochs and at the end. Returns the last evaluation's
    metrics with the training throughput (images/s)."""
    steps_per_epoch = data.steps_per_epoch
    # Throughput of the training steps alone: from the end of the second (compiling) step,
    # without the time spent in evaluation and checkpointing.
    timing = {"start": None, "other": 0.0}
    result, pending, train_metrics, last_good = {}, [], None, start or None
    step = start
    t0 = time.time()
    epoch, offset = divmod(start, steps_per_epoch)
    while step < total_steps:
        for batch in data.train_batches(epoch, offset):
            state, step_metrics = p_train(state, batch)
            step += 1
            if timing["start"] is None and step - start == min(2, total_steps - start):
                # The first two steps compile (the second sees pmap-output arrays).
                jax.block_until_ready(step_metrics)
                timing["start"], first_step = time.time(), step
            step_metrics = unreplicate(step_metrics)
            pending.append((step, step_metrics))
            train_metrics = (step_metrics if train_metrics is None
                             else train_metrics.merge(step_metrics))
            report(step)
            end_of_epoch = step % steps_per_epoch == 0
            checkpoint = (step == total_steps or end_of_epoch
                          or (config.checkpoint_every_steps > 0
                              and step % config.checkpoint_every_steps == 0))
            if step % config.log_every_steps == 0 or checkpoint:
                _check_finite(pending, last_good, workdir)
                pending = []
                scalars = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
                writer.write_scalars(step, {**scalars, "learning_rate": float(lr_fn(step - 1))})
                train_metrics = None
            other_start = time.time()
            if checkpoint:
                last_good = _save_checkpoint(mngr, state, step, last_good, workdir)
            if step == total_steps or (end_of_epoch and (step // steps_per_epoch)
                                       % config.eval_every_epochs == 0):
                result = evaluate(state, step)
            if timing["start"] is not None:
                timing["other"] += time.time() - other_start
            if step >= total_steps:
                break
        epoch, offset = epoch + 1, 0
    jax.block_until_ready(state)
    train_time = time.time() - (timing["start"] or 0.0) - timing["other"]
    if timing["start"] is not None and step > first_step and train_time > 0:
        result["train_images_per_sec"] = (step - first_step) * data.global_batch_size / train_time
    logging.info("Trained %d steps in %.1f s (%.0f images/s)", step - start, time.time() - t0,
                 result.get("train_images_per_sec", float("nan")))
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: Optional[data_lib.InputData] = None) -> dict:
    """Trains and evaluates ``config`` in ``workdir``; resumes from its latest checkpoint.

    ``data`` replaces the dataset named by the config (any ``InputData``, e.g. from
    ``data.from_arrays``). Returns the last evaluation's metrics.
    """
    check_config(config)
    check_same_run(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    if data is None:
        data = data_lib.create(config, local_devices=jax.local_device_count(),
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
    model = create_model(config, data.num_classes)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else int(config.num_epochs * data.steps_per_epoch))
    lr_fn = learning_rate_fn(config, data.steps_per_epoch, total_steps)
    state, start = _first_state(config, workdir, model, data.image_shape, lr_fn)
    mngr = checkpoints.manager(workdir, config.max_checkpoints)
    if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, "config.json")):
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))

    # Metrics go to TensorBoard (process 0) and the console; per-layer formats to
    # TensorBoard, formats.json and one console table per evaluation.
    writer, tensorboard, report = writers.create(workdir, is_chief=jax.process_index() == 0,
                                                 num_train_steps=total_steps)
    backends = writers.record_backends(workdir, "train", quant_config(config).compute.describe())
    tensorboard.write_texts(start, {"backends": backends})
    p_train = pmap_train_step(model)
    evaluate = _evaluator(config, workdir, model, data, writer, tensorboard)
    if start >= total_steps:
        logging.info("Training already finished at step %d; evaluating only.", start)
        return evaluate(jax_utils.replicate(state), start)
    result = _train_loop(config, workdir, data, jax_utils.replicate(state), start, total_steps,
                         p_train=p_train, lr_fn=lr_fn, mngr=mngr, writer=writer, report=report,
                         evaluate=evaluate)
    writer.flush()
    mngr.close()
    return result
